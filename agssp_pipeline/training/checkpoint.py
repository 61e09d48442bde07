"""Backbone checkpoints: safetensors weights + a JSON lineage sidecar, loadable without unpickling.

Layout (``StorageLayout.checkpoints("backbone", <name>, <run_id>)``)::

    checkpoints/backbone/<name>/<run_id>/model.safetensors   # backbone weights (native keys, see backbones.py)
    checkpoints/backbone/<name>/<run_id>/lineage.json        # config + hash, sources, index/map versions, code, losses
    checkpoints/backbone/<name>/<run_id>/training_state.pt   # resume only: tensors/numbers, weights_only=True
    checkpoints/backbone/<name>/latest.json                  # {"run_id": ...} of the last *completed* run

For the detector stage (AGDP) the API is::

    run_dir = latest_checkpoint_dir(layout, "yolov8n")  # last *completed* run of that backbone
    state, lineage = load_backbone_checkpoint(run_dir)   # or: model.safetensors, or the backbone dir
    weights = backbone_state_for_detector(state)        # yolov8 only: keys model.0.* ... model.9.*
    loaded = load_backbone_into_detector(detection_model, weights)  # ultralytics DetectionModel, checked

``backbone_state_for_detector`` also accepts the path directly. Keys are exactly those of an ultralytics
YOLOv8 ``DetectionModel`` built from the same ``yolov8<scale>.yaml`` (layers 0..9: CSPDarknet + SPPF),
so ``detection_model.load_state_dict(weights, strict=False)`` works unchanged.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import fsspec
import safetensors.torch
import torch
from torch import nn

MODEL_FILE = "model.safetensors"
LINEAGE_FILE = "lineage.json"
TRAINING_STATE_FILE = "training_state.pt"
LATEST_FILE = "latest.json"
YOLO_BACKBONE_KEY = re.compile(r"^model\.([0-9]+)\.")
YOLO_BACKBONE_LAYERS = 10


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def _fs(uri: str):
    return fsspec.core.url_to_fs(uri)


def _exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.exists(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write via a temporary name then rename (local), so a crash never leaves a half-written file."""
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    fs, path = _fs(uri)
    with fs.open(path, "wb") as handle:
        handle.write(data)


def _read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_json(uri: str, payload: dict[str, Any]) -> None:
    write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> dict[str, Any]:
    return json.loads(_read_bytes(uri))


def save_backbone_checkpoint(
    run_dir: str, state_dict: dict[str, torch.Tensor], lineage: dict[str, Any]
) -> str:
    """Write ``model.safetensors`` + ``lineage.json`` into ``run_dir``; returns the weights path."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    model_uri = _join(run_dir, MODEL_FILE)
    metadata = {"backbone": str(lineage.get("backbone", "")), "run_id": str(lineage.get("run_id", ""))}
    write_bytes(model_uri, safetensors.torch.save(tensors, metadata=metadata))
    write_json(_join(run_dir, LINEAGE_FILE), lineage)
    return model_uri


def resolve_checkpoint_dir(path: str | Path) -> str:
    """A run dir, its ``model.safetensors``, or a backbone dir (follows ``latest.json``) -> run dir."""
    uri = str(path).rstrip("/")
    if uri.endswith(MODEL_FILE) or uri.endswith(LINEAGE_FILE):
        return uri.rsplit("/", 1)[0]
    if _exists(_join(uri, MODEL_FILE)):
        return uri
    if _exists(_join(uri, LATEST_FILE)):
        return _join(uri, read_json(_join(uri, LATEST_FILE))["run_id"])
    raise FileNotFoundError(f"no backbone checkpoint at {uri} (expected {MODEL_FILE} or {LATEST_FILE})")


def load_backbone_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, lineage_dict)`` of a checkpoint; no pickle involved (safetensors + json).

    ``path``: a run directory, its ``model.safetensors``, or ``checkpoints/backbone/<name>`` (latest run).
    """
    run_dir = resolve_checkpoint_dir(path)
    model_uri = _join(run_dir, MODEL_FILE)
    if "://" not in model_uri:
        state = safetensors.torch.load_file(model_uri)
    else:
        state = safetensors.torch.load(_read_bytes(model_uri))
    lineage_uri = _join(run_dir, LINEAGE_FILE)
    lineage = read_json(lineage_uri) if _exists(lineage_uri) else {}
    return state, lineage


def backbone_state_for_detector(
    state_or_path: dict[str, torch.Tensor] | str | Path,
) -> dict[str, torch.Tensor]:
    """YOLOv8 backbone weights keyed for an ultralytics ``DetectionModel`` (``model.0.*`` .. ``model.9.*``).

    Accepts a state dict from :func:`load_backbone_checkpoint` or a checkpoint path. Raises when the
    checkpoint is not a YOLOv8 backbone (e.g. resnet50), because its weights cannot seed the detector.
    """
    if isinstance(state_or_path, (str, Path)):
        state, lineage = load_backbone_checkpoint(state_or_path)
        backbone = str(lineage.get("backbone", ""))
        if backbone and not backbone.startswith("yolov8"):
            raise ValueError(
                f"checkpoint backbone '{backbone}' is not a YOLOv8 backbone; the detector cannot use it"
            )
    else:
        state = state_or_path
    selected = {}
    for key, value in state.items():
        match = YOLO_BACKBONE_KEY.match(key)
        if match and int(match.group(1)) < YOLO_BACKBONE_LAYERS:
            selected[key] = value
    if not selected:
        raise ValueError("no YOLOv8 backbone keys (model.0.* .. model.9.*) in this checkpoint")
    return selected


def load_backbone_into_detector(detection_model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy backbone weights into an ultralytics ``DetectionModel``; every key must exist with equal shape.

    Returns the loaded keys. A scale mismatch (yolov8s weights into a yolov8n detector) is a clear error
    rather than a silent partial load.
    """
    target = detection_model.state_dict()
    problems = [
        f"{k}: checkpoint {tuple(v.shape)} vs detector {tuple(target[k].shape) if k in target else 'missing'}"
        for k, v in weights.items()
        if k not in target or target[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:3])
        raise ValueError(f"backbone weights do not fit this detector ({len(problems)} keys), e.g. {shown}")
    result = detection_model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected keys: {result.unexpected_keys[:3]}")
    return sorted(weights)


# ---------------------------------------------------------------- latest pointer and run listing


def backbone_dir(layout, name: str) -> str:
    return layout.checkpoints("backbone", name)


def run_dir(layout, name: str, run_id: str) -> str:
    return layout.checkpoints("backbone", name, run_id)


def write_latest_pointer(layout, name: str, run_id: str, extra: dict[str, Any] | None = None) -> str:
    uri = _join(backbone_dir(layout, name), LATEST_FILE)
    write_json(uri, {"backbone": name, "run_id": run_id, **(extra or {})})
    return uri


def read_latest_pointer(layout, name: str) -> dict[str, Any] | None:
    uri = _join(backbone_dir(layout, name), LATEST_FILE)
    return read_json(uri) if _exists(uri) else None


def latest_checkpoint_dir(layout, name: str) -> str:
    """Run dir of the last completed run of backbone ``name`` (what the detector should load)."""
    pointer = read_latest_pointer(layout, name)
    if pointer is None:
        raise FileNotFoundError(
            f"no completed backbone checkpoint for '{name}' under {backbone_dir(layout, name)}"
        )
    return run_dir(layout, name, pointer["run_id"])


def list_runs(layout, name: str) -> list[tuple[str, dict[str, Any]]]:
    """(run_id, lineage) of every run of ``name`` with a lineage file, oldest first by creation time."""
    fs, root = _fs(backbone_dir(layout, name))
    if not fs.exists(root):
        return []
    runs = []
    for entry in fs.ls(root, detail=True):
        if entry["type"] != "directory":
            continue
        lineage_path = _join(entry["name"], LINEAGE_FILE)
        if fs.exists(lineage_path):
            with fs.open(lineage_path, "rb") as handle:
                lineage = json.loads(handle.read())
            runs.append((entry["name"].rstrip("/").rsplit("/", 1)[-1], lineage))
    runs.sort(key=lambda item: str(item[1].get("created_at", "")))
    return runs


# ---------------------------------------------------------------- resume state


def save_training_state(run_dir_uri: str, state: dict[str, Any]) -> str:
    """Optimiser/scheduler/module state for resuming; only tensors, numbers, strings, lists and dicts."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    uri = _join(run_dir_uri, TRAINING_STATE_FILE)
    write_bytes(uri, buffer.getvalue())
    return uri


def load_training_state(run_dir_uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    uri = _join(run_dir_uri, TRAINING_STATE_FILE)
    if not _exists(uri):
        return None
    return torch.load(io.BytesIO(_read_bytes(uri)), map_location=map_location, weights_only=True)
