"""Checkpoints of every kind (backbone, detector, any future one): one layout, one pointer, one loader.

Layout (``StorageLayout.checkpoints(<kind>, <name>, <run_id>)``, local folder or object store)::

    checkpoints/<kind>/<name>/<run_id>/model.safetensors   # weights, loadable without unpickling
    checkpoints/<kind>/<name>/<run_id>/lineage.json        # what made it (written by the trainer, nobody else)
    checkpoints/<kind>/<name>/<run_id>/training_state.pt   # resume only: tensors/numbers, weights_only=True
    checkpoints/<kind>/<name>/<run_id>/...                 # files a trainer keeps (ultralytics' best.pt, ...)
    checkpoints/<kind>/<name>/latest.json                  # {"kind", "name", "run_id", ...}: last *completed* run

Every byte goes through :mod:`agssp_pipeline.artifact_io`, so ``storage_root: s3://...`` works unchanged.
:func:`recorded_inputs` says, from a run's ``lineage.json``, which artifacts it was made from.

For the detector stage (AGDP) the API is::

    run_dir = latest_checkpoint_dir(layout, "yolov8n")   # last completed backbone run
    state, lineage = load_checkpoint(run_dir)            # or: model.safetensors, or the <kind>/<name> dir
    weights = backbone_state_for_detector(state)         # yolov8 only: keys model.0.* ... model.9.*
    report = inject_weights(detection_model, InitialWeights("agbp", weights, BACKBONE_PREFIXES))
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from agssp_pipeline import artifact_io
from agssp_pipeline.records import KIND_OF_ASSET, NEWER, Input, Record, map_inputs, pick

MODEL_FILE = "model.safetensors"
LINEAGE_FILE = "lineage.json"
TRAINING_STATE_FILE = "training_state.pt"
LATEST_FILE = "latest.json"
BACKBONE = "backbone"
DETECTOR = "detector"
# the YOLOv8 layers that form the backbone (the AGBP checkpoint's keys, the ``freeze=10`` of the paper)
YOLO_BACKBONE_LAYERS = 10
BACKBONE_PREFIXES = tuple(f"model.{i}." for i in range(YOLO_BACKBONE_LAYERS))
YOLO_BACKBONE_KEY = re.compile(r"^model\.([0-9]+)\.")


# ---------------------------------------------------------------- layout, run ids, pointer


def new_run_id() -> str:
    """Sortable by time and unique: ``YYYYmmddTHHMMSS-<6 hex>`` (the one run-id generator)."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def checkpoint_dir(layout, name: str, *, kind: str = BACKBONE) -> str:
    """``checkpoints/<kind>/<name>``: the runs of one model and their ``latest.json``."""
    return layout.checkpoints(kind, name)


def backbone_dir(layout, name: str) -> str:
    return checkpoint_dir(layout, name, kind=BACKBONE)


def run_dir(layout, name: str, run_id: str, *, kind: str = BACKBONE) -> str:
    return layout.checkpoints(kind, name, run_id)


def write_latest_pointer(
    layout, name: str, run_id: str, extra: Mapping[str, Any] | None = None, *, kind: str = BACKBONE
) -> str:
    """Make ``run_id`` the latest run of ``<kind>/<name>``; refuses a run whose lineage says it is unfinished."""
    target = run_dir(layout, name, run_id, kind=kind)
    lineage = artifact_io.read_json_or(artifact_io.join(target, LINEAGE_FILE), {})
    if lineage.get("status", "complete") != "complete":
        raise ValueError(f"run {target} is {lineage['status']!r}: only a completed run becomes latest.json")
    pointer = {
        **dict(extra or {}),
        "kind": kind,
        "name": name,
        "run_id": run_id,
        "updated_at": (extra or {}).get("updated_at") or datetime.now(UTC).isoformat(),
    }
    if kind == BACKBONE:
        pointer["backbone"] = name  # the key readers of older pointers look for
    uri = artifact_io.join(checkpoint_dir(layout, name, kind=kind), LATEST_FILE)
    artifact_io.write_json(uri, pointer)
    return uri


def read_latest_pointer(layout, name: str, *, kind: str = BACKBONE) -> dict[str, Any] | None:
    return artifact_io.read_json_or(artifact_io.join(checkpoint_dir(layout, name, kind=kind), LATEST_FILE))


def latest_checkpoint_dir(layout, name: str, *, kind: str = BACKBONE) -> str:
    """Run dir of the last completed run of ``<kind>/<name>`` (what a consumer should load)."""
    pointer = read_latest_pointer(layout, name, kind=kind)
    if pointer is None:
        raise FileNotFoundError(
            f"no completed {kind} checkpoint for '{name}' under {checkpoint_dir(layout, name, kind=kind)}: "
            f"materialize {kind}_checkpoint first"
        )
    return run_dir(layout, name, pointer["run_id"], kind=kind)


def list_runs(layout, name: str, *, kind: str = BACKBONE) -> list[tuple[str, dict[str, Any]]]:
    """(run_id, lineage) of every run of ``<kind>/<name>`` with a lineage file, oldest first by creation time."""
    runs = []
    for entry in artifact_io.list_dir(checkpoint_dir(layout, name, kind=kind), dirs_only=True):
        lineage = artifact_io.read_json_or(artifact_io.join(entry, LINEAGE_FILE))
        if lineage is not None:
            runs.append((artifact_io.name(entry), lineage))
    runs.sort(key=lambda item: str(item[1].get("created_at", "")))
    return runs


# ---------------------------------------------------------------- writing and loading


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and values), for lineage and tests."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        values = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(
    run_dir_uri: str,
    state_dict: Mapping[str, torch.Tensor],
    lineage: Mapping[str, Any],
    files: Mapping[str, bytes] | None = None,
) -> str:
    """Write ``model.safetensors``, any extra ``files`` (relative name -> bytes), then ``lineage.json``.

    The lineage goes last, so a reader that finds it finds the weights it describes. Returns the weights URI.
    """
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    metadata = {k: str(lineage[k]) for k in ("kind", "name", "backbone", "run_id") if isinstance(lineage.get(k), str)}
    model_uri = artifact_io.join(run_dir_uri, MODEL_FILE)
    artifact_io.write_bytes(model_uri, safetensors.torch.save(tensors, metadata=metadata))
    for relative, data in (files or {}).items():
        artifact_io.write_bytes(artifact_io.join(run_dir_uri, relative), data)
    artifact_io.write_json(artifact_io.join(run_dir_uri, LINEAGE_FILE), dict(lineage))
    return model_uri


def resolve_checkpoint_dir(path: str | Path) -> str:
    """A run dir, its ``model.safetensors``/``lineage.json``, or a ``<kind>/<name>`` dir (follows latest) -> run dir."""
    uri = str(path).rstrip("/")
    if uri.endswith((MODEL_FILE, LINEAGE_FILE)):
        return artifact_io.parent(uri)
    if artifact_io.exists(artifact_io.join(uri, MODEL_FILE)):
        return uri
    pointer = artifact_io.read_json_or(artifact_io.join(uri, LATEST_FILE))
    if pointer is not None:
        return artifact_io.join(uri, pointer["run_id"])
    raise FileNotFoundError(f"no checkpoint at {uri} (expected {MODEL_FILE} or {LATEST_FILE})")


def load_checkpoint(path: str | Path, *, float32: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, lineage)`` of any checkpoint; no pickle involved (safetensors + json).

    ``path``: a run directory, its ``model.safetensors``, or ``checkpoints/<kind>/<name>`` (latest run).
    ``float32`` turns floating tensors into fp32 (what training starts from).
    """
    run = resolve_checkpoint_dir(path)
    model_uri = artifact_io.join(run, MODEL_FILE)
    if not artifact_io.is_file(model_uri):
        raise FileNotFoundError(f"no checkpoint at {run} ({MODEL_FILE} missing)")
    state = safetensors.torch.load(artifact_io.read_bytes(model_uri))
    if float32:
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    return state, read_lineage(run)


def read_lineage(path: str | Path) -> dict[str, Any]:
    """The ``lineage.json`` of a run (any accepted path form); {} when the run has none."""
    uri = str(path).rstrip("/")
    run = artifact_io.parent(uri) if uri.endswith((MODEL_FILE, LINEAGE_FILE)) else uri
    return artifact_io.read_json_or(artifact_io.join(run, LINEAGE_FILE), {})


def save_training_state(run_dir_uri: str, state: dict[str, Any]) -> str:
    """Optimiser/scheduler/module state for resuming; only tensors, numbers, strings, lists and dicts."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return artifact_io.write_bytes(artifact_io.join(run_dir_uri, TRAINING_STATE_FILE), buffer.getvalue())


def load_training_state(run_dir_uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    uri = artifact_io.join(run_dir_uri, TRAINING_STATE_FILE)
    if not artifact_io.exists(uri):
        return None
    return torch.load(io.BytesIO(artifact_io.read_bytes(uri)), map_location=map_location, weights_only=True)


# ---------------------------------------------------------------- what a checkpoint was made from


def _backbone_inputs(lineage: Mapping[str, Any]) -> list[dict[str, Any]]:
    data = lineage.get("data") or {}
    inputs: list[dict[str, Any]] = []
    for source, info in sorted((data.get("sources") or {}).items()):
        inputs.append({"asset": "image_index", "partition": source, "uri": info.get("index_path"),
                       "version": info.get("index_version")})
        inputs.append({"asset": "anomaly_maps", "partition": source, "uri": info.get("map_store"),
                       "version": info.get("map_store_version"), "encoder": info.get("encoder")})
    if data.get("threshold_table_version") is not None:  # made beside it, not from it
        inputs.append({"asset": "category_thresholds", "partition": None, "uri": data.get("threshold_table_path"),
                       "version": data["threshold_table_version"]})
    return inputs


def _detector_inputs(lineage: Mapping[str, Any]) -> list[dict[str, Any]]:
    inputs: list[dict[str, Any]] = []
    backbone = lineage.get("backbone")
    if isinstance(backbone, dict) and backbone.get("checkpoint"):
        parent_lineage = backbone.get("lineage") or {}
        inputs.append({"asset": "backbone_checkpoint", "partition": parent_lineage.get("backbone"),
                       "uri": backbone["checkpoint"], "version": backbone.get("weights_digest"),
                       "run_id": parent_lineage.get("run_id")})
    for source, info in sorted((lineage.get("pseudo_boxes") or {}).items()):
        inputs.append({"asset": "pseudo_boxes", "partition": source, "uri": info.get("path"),
                       "version": info.get("sha256"), "map_store_version": info.get("map_store_version")})
        inputs.append({"asset": "image_index", "partition": source, "uri": info.get("index_path"),
                       "version": info.get("index_sha256")})
    return inputs


INPUT_READERS: dict[str, Callable[[Mapping[str, Any]], list[dict[str, Any]]]] = {
    BACKBONE: _backbone_inputs,
    DETECTOR: _detector_inputs,
}


def checkpoint_kind(lineage: Mapping[str, Any]) -> str | None:
    """``backbone``/``detector``/...: the ``kind`` key, or (older backbone runs) inferred from their keys."""
    if isinstance(lineage.get("kind"), str):
        return lineage["kind"]
    return BACKBONE if isinstance(lineage.get("backbone"), str) and "config_hash" in lineage else None


def recorded_inputs(path: str | Path | Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a checkpoint was made from, read from its ``lineage.json`` (or a lineage dict).

    One dict per input: ``asset`` (the Dagster asset name: ``image_index``, ``anomaly_maps``,
    ``category_thresholds``, ``pseudo_boxes``, ``backbone_checkpoint``), ``partition`` (source / backbone
    name or None), ``uri`` (where it was, None if not recorded) and ``version`` (content hash, map store
    version or weights digest it had when the checkpoint was made), plus kind-specific extras. A trainer
    of a new kind either stores an ``inputs`` list in its lineage or registers a reader in ``INPUT_READERS``.
    """
    lineage = path if isinstance(path, Mapping) else read_lineage(path)
    if isinstance(lineage.get("inputs"), list):
        return [dict(item) for item in lineage["inputs"]]
    reader = INPUT_READERS.get(checkpoint_kind(lineage) or "")
    return reader(lineage) if reader is not None else []


# what a checkpoint's lineage shows of itself: label -> dotted key path
SUMMARIES: dict[str, dict[str, str]] = {
    BACKBONE: {"status": "status", "created": "created_at", "epochs completed": "epochs_completed",
               "base loss": "resolved.base_loss", "final losses": "final_losses", "config hash": "config_hash",
               "data hash": "data_hash", "classes": "data.classes", "code": "code", "device": "device"},
    DETECTOR: {"created": "created_at", "weights digest": "weights_digest", "training set": "training_set",
               "epochs": "settings.epochs", "image size": "settings.image_size",
               "frozen backbone layers": "settings.freeze_layers",
               "pseudo-box val mAP50": "ultralytics_metrics.metrics/mAP50(B)"},
}
# links a checkpoint of each kind is expected to record: input kind -> what is missing, in words
EXPECTED_INPUTS = {
    BACKBONE: {"index": "no data lineage", "thresholds": "no threshold table"},
    DETECTOR: {"backbone": "no backbone checkpoint", "pseudo_boxes": "no pseudo-box tables",
               "thresholds": "no threshold table"},
}


def later_run(layout, kind: str, name: str, run_id: str, lineage: Mapping[str, Any]) -> str | None:
    """The run that supersedes ``run_id`` for its consumers, or None.

    A run is superseded by ``latest.json``, except a backbone run with ``distill_weight: 0`` (the paper's mode 2
    baseline, never latest.json): only a newer completed baseline run supersedes it.
    """
    if kind == BACKBONE and lineage.get("distill_weight") == 0:
        baselines = [rid for rid, other in list_runs(layout, name)
                     if other.get("distill_weight") == 0 and other.get("status", "complete") == "complete"]
        newest = baselines[-1] if baselines else None
        return f"{newest} (newest distill_weight 0 run)" if newest not in (None, run_id) else None
    pointer = read_latest_pointer(layout, name, kind=kind)
    if pointer and pointer.get("run_id") not in (None, run_id):
        return f"{pointer['run_id']} (latest.json)"
    return None


def checkpoint_record(run_dir_uri: str, kind: str, layout, recorded: Mapping[str, Any] | None = None) -> Record:
    """What a checkpoint run is (its weights digest, a later run) and what its lineage says it was made from.

    ``recorded``: a consumer's copy of the lineage, shown when the run's files are gone.
    """
    on_disk = read_lineage(run_dir_uri) or None
    lineage = dict(on_disk or recorded or {})
    name = str(lineage.get("name") or lineage.get(BACKBONE if kind == BACKBONE else "model") or "?")
    run_id = str(lineage.get("run_id") or artifact_io.name(run_dir_uri))
    label = f"{name} run {run_id}"
    record = Record(f"{kind} {label}", label=label, partition=name if kind == BACKBONE else None, run_id=run_id,
                    fields={title: pick(lineage, path) for title, path in SUMMARIES[kind].items()})
    if on_disk is None:
        record.missing(f"checkpoint files no longer at {run_dir_uri}"
                       + ("; shown as recorded by its consumer" if recorded else ""))
    later = later_run(layout, kind, name, run_id, lineage) if name != "?" else None
    if later:
        record.flags.append((NEWER, f"a later {kind} {name} run exists: {later}"))
    if kind == BACKBONE:
        record.now["version"] = lambda: backbone_digest(run_dir_uri) if on_disk else None
    else:
        record.now["version"] = (on_disk or {}).get("weights_digest")
    record.inputs = _walk_inputs(lineage)
    found = {i.kind for i in record.inputs}
    for input_kind, missing in EXPECTED_INPUTS[kind].items():
        if input_kind not in found:
            extra = " (its pseudo-box tables carry the T_c values they used)" \
                if kind == DETECTOR and input_kind == "thresholds" else ""
            record.notes.append((input_kind, f"{missing} recorded in {kind} checkpoint {label}{extra}"))
    return record


def _walk_inputs(lineage: Mapping[str, Any]) -> list[Input]:
    """``recorded_inputs`` in the shared record shape (checkpoints by address, the rest by source)."""
    seen = lineage.get("dagster_upstream_data_versions") or {}
    inputs = []
    for item in recorded_inputs(lineage):
        kind = KIND_OF_ASSET.get(str(item.get("asset")))
        if kind in SUMMARIES and item.get("uri"):
            own = (lineage.get("backbone") or {}).get("lineage") if kind == BACKBONE else None
            inputs.append(Input(kind, artifact_io.canonical(item["uri"]), item["uri"], item.get("version"),
                                lineage=own))
        if kind is None or kind in SUMMARIES:
            continue
        key = item.get("partition") or "thresholds"
        dagster = (seen.get(item["asset"]) or {}).get(key)
        inputs.append(Input(kind, key, item.get("uri"), item.get("version"), dagster=dagster))
        if kind == "pseudo_boxes" and item.get("map_store_version"):
            inputs.extend(map_inputs(key, list(item["map_store_version"])))
    return inputs


def detectors_using(layout, backbone_run_dir: str) -> list[str]:
    """The detector runs under ``layout`` whose lineage names the backbone checkpoint at ``backbone_run_dir``."""
    found = []
    for lineage_uri in artifact_io.glob(layout.checkpoints(DETECTOR, "*", "*", LINEAGE_FILE)):
        backbone = artifact_io.read_json(lineage_uri).get("backbone") or {}
        if isinstance(backbone, dict) and backbone.get("checkpoint") \
                and artifact_io.same_location(backbone["checkpoint"], backbone_run_dir):
            found.append(artifact_io.canonical(artifact_io.parent(lineage_uri)))
    return found


def latest_run_of_any(layout, kind: str) -> str | None:
    """The run the most recently written ``latest.json`` of any model name of ``kind`` points at."""
    pointers = artifact_io.glob(layout.checkpoints(kind, "*", LATEST_FILE))
    if not pointers:
        return None
    newest = max(pointers, key=lambda uri: artifact_io.modified_time(uri) or 0.0)
    return resolve_checkpoint_dir(artifact_io.parent(newest))


def backbone_digest(run_dir_uri: str) -> str | None:
    """Digest of a backbone checkpoint's tensors keyed for its detector, as detector and finetune record it
    (``model.0..9`` for CSPDarknet, layer 0 of the hybrid detector for other backbones)."""
    from agssp_pipeline.training.yolo_backbones import detector_backbone_state

    try:
        state, lineage = load_checkpoint(run_dir_uri)
        return state_dict_digest(detector_backbone_state(state, str(lineage.get("backbone") or "yolov8n")))
    except (FileNotFoundError, ValueError, KeyError):  # KeyError: a backbone this code no longer registers
        return None


# ---------------------------------------------------------------- putting weights into a model


def backbone_state_for_detector(
    state_or_path: dict[str, torch.Tensor] | str | Path,
) -> dict[str, torch.Tensor]:
    """YOLOv8 backbone weights keyed for an ultralytics ``DetectionModel`` (``model.0.*`` .. ``model.9.*``).

    Accepts a state dict from :func:`load_checkpoint` or a checkpoint path. Raises when the checkpoint is
    not a YOLOv8 backbone (e.g. resnet50), because its weights cannot seed the detector.
    """
    if isinstance(state_or_path, (str, Path)):
        state, lineage = load_checkpoint(state_or_path)
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


@dataclass
class InitialWeights:
    """A state dict to start a model from; ``required_prefixes`` name keys that must all load."""

    name: str
    state_dict: dict[str, torch.Tensor]
    required_prefixes: tuple[str, ...] = ()
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return state_dict_digest(self.state_dict)


@dataclass
class InjectionReport:
    """What an initial state dict did to a freshly built model."""

    source: str
    loaded: list[str]
    shape_mismatch: list[str]  # in both, different shapes (e.g. class logits of another nc): left as initialised
    unused: list[str]  # in the state dict, not in the model
    not_covered: list[str]  # in the model, not in the state dict: left as initialised

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "loaded": len(self.loaded),
            "shape_mismatch": self.shape_mismatch,
            "unused": len(self.unused),
            "not_covered": len(self.not_covered),
        }


class WeightInjectionError(ValueError):
    """Initial weights do not fit the model (required keys missing or of another shape)."""


def inject_weights(model: nn.Module, initial: InitialWeights) -> InjectionReport:
    """Copy matching tensors of ``initial`` into ``model`` in place (parameters and buffers).

    The one way weights enter a model: required keys that do not load (another model scale) are an error
    rather than a silent partial load, which would turn a "pretrained" row into a scratch run.
    """
    target = model.state_dict()
    update = {
        k: v.to(dtype=target[k].dtype)
        for k, v in initial.state_dict.items()
        if k in target and tuple(target[k].shape) == tuple(v.shape)
    }
    mismatch = [k for k in initial.state_dict if k in target and k not in update]
    unused = sorted(set(initial.state_dict) - set(target))
    not_covered = sorted(set(target) - set(initial.state_dict))
    prefixes = initial.required_prefixes
    failed = [k for k in target if prefixes and k.startswith(prefixes) and k not in update]
    if failed:
        raise WeightInjectionError(
            f"initial weights '{initial.name}' do not cover {len(failed)} required tensors of the model "
            f"(e.g. {failed[:3]}; shape mismatches: {mismatch[:3]}; unused keys in the file: {unused[:3]}). "
            "Was the checkpoint made for another model scale?"
        )
    if not update:
        raise WeightInjectionError(
            f"initial weights '{initial.name}' share no tensor with the model "
            f"(file keys e.g. {list(initial.state_dict)[:3]})"
        )
    with torch.no_grad():
        for key, tensor in update.items():
            target[key].copy_(tensor)
    return InjectionReport(initial.name, list(update), mismatch, unused, not_covered)
