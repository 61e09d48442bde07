"""YOLOv8 training with our own initial weights (AGDP pretraining and every finetune variant).

Two ultralytics behaviours shape this module:

- ``YOLO.train()`` hands training to a ``DetectionTrainer`` that builds a *fresh* ``DetectionModel`` from the yaml
  (``get_model``) after seeding; weights set on the ``YOLO`` object beforehand are silently dropped for yaml-built
  models. We therefore pass our own trainer subclass whose ``get_model`` builds the model and then loads our state
  dict into it, with a report of what was loaded and what was skipped (e.g. the class-logit convs when the number of
  classes differs). Keys that the caller marks as required (the backbone layers model.0..model.9) must all load,
  or training refuses to start: a silent partial load would make a "pretrained" row in the comparison a scratch run.
- Nothing may download: models come from the packaged yaml (``yolov8n.yaml``, never ``yolov8n.pt``), AMP is enabled
  only on CUDA (its self-check would fetch yolo26n.pt, and it returns early on CPU), plots are off unless
  asked for (finetune keeps them; the font they need is provided offline by ``agssp_pipeline.env``), and
  ``agssp_pipeline`` sets YOLO_OFFLINE.

Checkpoints (AGDP) live at ``storage_root/checkpoints/detector/<name>/<run_id>/`` in the one checkpoint layout
(``checkpoint.py``): ``model.safetensors`` (fp32 state dict of the final EMA weights), ``lineage.json`` (backbone
lineage, pseudo-box table hashes, settings, metrics, ultralytics' best.pt/last.pt addresses) and ultralytics' run
folder ``ultralytics/``; ``<name>/latest.json`` points at the newest completed run. ultralytics trains in a local
scratch folder (``StorageLayout.scratch``); its files are then published to the checkpoint dir, local or on S3.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch

import agssp_pipeline  # noqa: F401  (offline defaults before ultralytics is imported)
from agssp_pipeline import artifact_io
from agssp_pipeline.storage import StorageLayout
from agssp_pipeline.training import checkpoint as ckpt
from agssp_pipeline.training.checkpoint import (
    BACKBONE_PREFIXES,
    InitialWeights,
    InjectionReport,
    WeightInjectionError,
    inject_weights,
    state_dict_digest,
)
from agssp_pipeline.training.lineage import file_hash

LOGGER = logging.getLogger(__name__)

YOLOV8_BACKBONE_LAYERS = ckpt.YOLO_BACKBONE_LAYERS  # the ``freeze=10`` of the paper
DETECTOR_KIND = ckpt.DETECTOR
PRETRAIN_CLASS_NAMES = ("defect",)

# model name -> packaged ultralytics cfg (built offline; the scale letter selects depth/width from yolov8.yaml)
YOLO_MODEL_CONFIGS: dict[str, str] = {f"yolov8{scale}": f"yolov8{scale}.yaml" for scale in "nsmlx"}


def model_config(model: str) -> str:
    """Packaged yaml of a model name, or a user's own yaml file; never a .pt (that would download)."""
    if model in YOLO_MODEL_CONFIGS:
        return YOLO_MODEL_CONFIGS[model]
    if model.endswith((".yaml", ".yml")) and Path(model).is_file():
        return model
    raise ValueError(f"unknown detector model '{model}' (known: {sorted(YOLO_MODEL_CONFIGS)} or a local .yaml file)")


def build_detection_model(model: str, num_classes: int):
    """An untrained ultralytics ``DetectionModel`` from the packaged cfg (offline)."""
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(model_config(model), nc=num_classes, verbose=False)


def resolve_device(device: str) -> str:
    """'auto' -> first CUDA device if present, else cpu (ultralytics' own '' would also pick mps)."""
    if device != "auto":
        return device
    return "0" if torch.cuda.is_available() else "cpu"


def make_trainer_class(initial: InitialWeights | None, reports: list[InjectionReport], backbone: str | None = None):
    """A DetectionTrainer whose freshly built model starts from ``initial`` (reports appended to ``reports``);
    a registered non-YOLO ``backbone`` replaces layers 0..9 first (``yolo_backbones.swap_backbone``)."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from agssp_pipeline.training.yolo_backbones import is_native, swap_backbone

    class InitialisedDetectionTrainer(DetectionTrainer):
        def get_model(self, cfg=None, weights=None, verbose=True):
            model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
            if not is_native(backbone):
                swap_backbone(model, backbone, int(self.args.imgsz))
            if initial is not None:
                reports.append(inject_weights(model, initial))
            return model

    return InitialisedDetectionTrainer


@dataclass
class YoloTrainSettings:
    """Everything that must be equal between variants for a fair comparison."""

    model: str = "yolov8n"
    backbone: str | None = None  # a registered backbone under the neck/head of ``model``; None/yolov8*: CSPDarknet
    epochs: int = 1
    image_size: int = 160
    batch_size: int = 16
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    freeze_layers: int | None = None  # None: train everything; 10: freeze the YOLOv8 backbone
    val: bool = True
    patience: int = 100
    plots: bool = False  # ultralytics' figures (results.png, PR curves, confusion matrix, batch images)
    extra_args: dict[str, Any] = field(default_factory=dict)  # further ultralytics train args (augmentation, lr...)

    def train_args(self) -> dict[str, Any]:
        device = resolve_device(self.device)
        args = {
            "epochs": self.epochs,
            "imgsz": self.image_size,
            "batch": self.batch_size,
            "device": device,
            "seed": self.seed,
            "deterministic": True,
            "workers": self.workers,
            "plots": self.plots,
            "amp": device not in ("cpu", "mps"),  # AMP's self-check downloads a model; it is CUDA-only anyway
            "val": self.val,
            "patience": self.patience,
            "verbose": False,
            "exist_ok": True,
        }
        if self.freeze_layers:
            from agssp_pipeline.training.yolo_backbones import HYBRID_FREEZE, is_native

            # a hybrid's backbone is layer 0 alone (layers 4/6/9 hold its new projections, which must train)
            native = is_native(self.backbone) or self.freeze_layers != YOLOV8_BACKBONE_LAYERS
            args["freeze"] = self.freeze_layers if native else list(HYBRID_FREEZE)
        args.update(self.extra_args)
        return args


@dataclass
class YoloTrainResult:
    run_dir: Path
    best_pt: Path | None
    last_pt: Path
    final_state_dict: dict[str, torch.Tensor]  # fp32 EMA weights at the end of training
    injection: InjectionReport | None
    ultralytics_metrics: dict[str, float]
    initial_digest: str | None
    train_args: dict[str, Any]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0.0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def epoch_progress_callback(log: Callable[[str], None], label: str) -> Callable[[Any], None]:
    """An ultralytics ``on_fit_epoch_end`` callback: one line per epoch to ``log`` (epoch/total, mean train
    losses, mAP when that epoch was validated, seconds per epoch, ETA), so a long run is never silent.

    ultralytics also fires the event after its final validation of best.pt (with epoch = total); that is
    reported as such, not as an extra epoch.
    """

    def report(trainer) -> None:
        epoch, total = int(trainer.epoch) + 1, int(trainer.epochs)
        metrics = getattr(trainer, "metrics", None) or {}
        map50, map50_95 = metrics.get("metrics/mAP50(B)"), metrics.get("metrics/mAP50-95(B)")
        maps = f"mAP50 {map50:.3f} mAP50-95 {map50_95:.3f}" if map50 is not None and map50_95 is not None else ""
        if epoch > total:
            log(f"{label}: final validation of best.pt: {maps or 'no metrics'}")
            return
        losses = trainer.label_loss_items(trainer.tloss, prefix="train") if trainer.tloss is not None else {}
        loss_text = " ".join(f"{k.split('/', 1)[-1]} {float(v):.4f}" for k, v in losses.items()) or "no loss"
        validated = bool(trainer.args.val) or epoch == total
        done = max(epoch - int(getattr(trainer, "start_epoch", 0)), 1)
        per_epoch = (time.time() - trainer.train_time_start) / done
        log(f"{label}: epoch {epoch}/{total} {loss_text}" + (f" {maps}" if validated and maps else "")
            + f", {per_epoch:.1f} s/epoch, ETA {_fmt_eta(per_epoch * (total - epoch))}")

    return report


def train_yolo(
    data_yaml: str | Path,
    settings: YoloTrainSettings,
    project: str | Path,
    name: str,
    initial: InitialWeights | None = None,
    callbacks: Mapping[str, Iterable[Callable[[Any], None]]] | None = None,
    log: Callable[[str], None] | None = None,
    log_label: str | None = None,
) -> YoloTrainResult:
    """Train a YOLOv8 detector on a YOLO-layout dataset, starting from ``initial`` (None = scratch).

    The number of classes comes from ``data_yaml``; ultralytics' run folder is ``project/name``.
    ``log`` (e.g. Dagster's ``context.log.info``) gets one progress line per epoch, led by ``log_label``
    (default: ``name``).
    """
    from ultralytics import YOLO

    seed_everything(settings.seed)
    cfg = model_config(settings.model)
    model = YOLO(cfg, task="detect")
    reports: list[InjectionReport] = []
    captured: dict[str, dict[str, torch.Tensor]] = {}

    def capture_final_weights(trainer) -> None:
        source = trainer.ema.ema if trainer.ema is not None else trainer.model
        captured["state"] = {k: v.detach().float().cpu().clone() for k, v in source.state_dict().items()}

    model.add_callback("on_train_end", capture_final_weights)
    if log is not None:
        model.add_callback("on_fit_epoch_end", epoch_progress_callback(log, log_label or name))
    for event, functions in (callbacks or {}).items():
        for function in functions:
            model.add_callback(event, function)
    args = settings.train_args()
    project = Path(project)
    project.mkdir(parents=True, exist_ok=True)
    model.train(
        trainer=make_trainer_class(initial, reports, settings.backbone),
        data=str(data_yaml),
        project=str(project),
        name=name,
        pretrained=False,
        **args,
    )
    trainer = model.trainer
    run_dir = Path(trainer.save_dir)
    metrics = {k: float(v) for k, v in (getattr(trainer, "metrics", None) or {}).items()
               if isinstance(v, int | float | np.floating)}
    if initial is not None and not reports:
        raise WeightInjectionError("ultralytics never built the model through our trainer: weights were not injected")
    if "state" not in captured:
        raise RuntimeError(f"training in {run_dir} ended without final weights (no on_train_end)")
    return YoloTrainResult(
        run_dir=run_dir,
        best_pt=trainer.best if Path(trainer.best).exists() else None,
        last_pt=Path(trainer.last),
        final_state_dict=captured["state"],
        injection=reports[-1] if reports else None,
        ultralytics_metrics=metrics,
        initial_digest=initial.digest if initial is not None else None,
        train_args={k: v for k, v in args.items() if isinstance(v, str | int | float | bool | type(None))},
    )


# ---------------------------------------------------------------------------------------------------------------
# initial-weight files: ultralytics .pt checkpoints, our safetensors (+ lineage.json beside), backbone checkpoints


class UnsafeWeightsError(ValueError):
    """A weights file that only full unpickling could read (and so could run code from the file)."""


STATE_DICT_KEYS = ("model", "state_dict", "ema")  # where checkpoints keep a state dict, in this order


def _load_pt(path: Path) -> dict[str, torch.Tensor]:
    """A .pt holding tensors only (a state dict, or one under 'model'/'state_dict'/'ema'), read with
    ``weights_only=True``; a pickled model object is refused with the one command that converts it."""
    import pickle

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeWeightsError(
            f"{path} stores Python objects (e.g. a whole ultralytics model), which only full unpickling can "
            "read, and unpickling can run code hidden in the file; it is not loaded. Convert it once, where "
            f"you trust the file: `agssp convert-weights {path}` writes {path.with_suffix('.safetensors').name}; "
            "use that file instead") from None
    if isinstance(payload, dict):
        nested = next((payload[k] for k in STATE_DICT_KEYS if isinstance(payload.get(k), dict)), payload)
        if nested and all(isinstance(v, torch.Tensor) for v in nested.values()):
            return {str(k): (v.float() if v.is_floating_point() else v) for k, v in nested.items()}
    raise ValueError(f"{path} holds no state dict of tensors (top level or under {list(STATE_DICT_KEYS)})")


def convert_weights_file(source: str | Path, target: str | Path | None = None) -> str:
    """Rewrite a pickled ultralytics ``.pt`` as ``.safetensors`` (tensors only); returns the target path.

    This unpickles ``source`` completely: run it only on files you trust. The result loads everywhere
    in the pipeline without unpickling.
    """
    from ultralytics.nn.tasks import load_checkpoint

    source = Path(source)
    model, _ = load_checkpoint(str(source))
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    out = str(target or source.with_suffix(".safetensors"))
    artifact_io.write_bytes(out, safetensors.torch.save(state, metadata={"converted_from": source.name}))
    return out


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    state = safetensors.torch.load(path.read_bytes())
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


WEIGHT_FILE_LOADERS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
    ".pt": _load_pt,
    ".pth": _load_pt,
    ".safetensors": _load_safetensors,
}


def load_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of a weights file, local or on object storage, never by full unpickling.

    ``.safetensors``, or ``.pt``/``.pth`` holding tensors only; a pickled model raises
    :class:`UnsafeWeightsError` naming ``agssp convert-weights``.
    """
    uri = str(path)
    suffix = Path(artifact_io.name(uri)).suffix.lower()
    loader = WEIGHT_FILE_LOADERS.get(suffix)
    if not artifact_io.is_file(uri):
        raise FileNotFoundError(f"weights file not found: {uri}")
    if loader is None:
        raise ValueError(f"unsupported weights file {uri} (known: {sorted(WEIGHT_FILE_LOADERS)})")
    with artifact_io.local_copy(uri) as local:
        return loader(local)


FIRST_CONV, FIRST_BN = "model.0.conv.weight", "model.0.bn.running_mean"
INPUT_NORMALISATION_NOTE = "ImageNet mean/std of AGBP's inputs folded into model.0 (ultralytics feeds [0, 1])"


def fold_input_normalisation(state: Mapping[str, torch.Tensor], mean: Sequence[float],
                             std: Sequence[float]) -> dict[str, torch.Tensor]:
    """CSPDarknet weights that give on [0, 1] pixels what ``state`` gave on ``(x - mean) / std`` inputs.

    AGBP trains the backbone on ImageNet-normalised images; ultralytics feeds the detector [0, 1] pixels. Layer 0
    is conv (no bias) + BN, so ``conv_W((x - m) / s) = conv_{W/s}(x) - c`` with ``c_o = sum W[o] * m / s``: dividing
    W by s per input channel and raising the BN running mean by ``c`` is exact except at the zero-padded border.
    Without it, a frozen backbone (AGDP: BN in eval mode) normalises with statistics of another input scale (layer
    0's pre-BN values are ~4.4x too small and shifted), and every later layer sees features it never saw in AGBP.
    """
    folded = dict(state)
    if FIRST_CONV not in state or FIRST_BN not in state:
        return folded  # no CSPDarknet stem (a partial state): nothing to fold
    weight = state[FIRST_CONV].float()
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    folded[FIRST_CONV] = (weight / s).to(state[FIRST_CONV].dtype)
    shift = (weight * (m / s)).sum(dim=(1, 2, 3))
    folded[FIRST_BN] = (state[FIRST_BN].float() + shift).to(state[FIRST_BN].dtype)
    return folded


def backbone_initial_weights(checkpoint: str | Path) -> InitialWeights:
    """An AGBP backbone checkpoint as the initial weights of a YOLOv8 detector's backbone (all required): layers
    0..9 for CSPDarknet (input normalisation folded into layer 0: :func:`fold_input_normalisation`), layer 0 of
    the hybrid detector for any other registered backbone (it normalises itself: ``yolo_backbones``)."""
    from agssp_pipeline.training.yolo_backbones import detector_backbone_state, is_native, required_prefixes

    state, lineage = ckpt.load_checkpoint(checkpoint)
    lineage = {**lineage, "checkpoint": str(checkpoint)}
    name = str(lineage.get("backbone") or "yolov8n")
    if is_native(name):
        lineage["input_normalisation"] = INPUT_NORMALISATION_NOTE
    return InitialWeights("agbp", detector_backbone_state(state, name), required_prefixes(name), lineage)


# which layers of an AGDP detector the agssp variant starts from (``finetune.agssp_init``); the rest is re-initialised
AGSSP_INITS = ("detector", "backbone_neck", "backbone")


def _head_prefix(state: Mapping[str, torch.Tensor]) -> str:
    """``model.<last layer>.``: the Detect head (layer 22 of yolov8.yaml, the last layer of any YOLOv8 detector)."""
    layers = {int(m.group(1)) for k in state if (m := ckpt.YOLO_BACKBONE_KEY.match(k))}
    if not layers:
        raise ValueError("no ultralytics layer keys (model.<i>.*) in this detector checkpoint")
    return f"model.{max(layers)}."


def agssp_state(state: Mapping[str, torch.Tensor], init: str) -> dict[str, torch.Tensor]:
    """The tensors of an AGDP detector that a finetune keeps for ``init`` (see :data:`AGSSP_INITS`).

    ``detector``: everything (the paper; the class-logit convs of another class count are skipped by shape at
    injection); ``backbone_neck``: all but the Detect head; ``backbone``: layers 0..9 only (with the default frozen
    backbone in AGDP, that is exactly the AGBP start).
    """
    if init == "detector":
        return dict(state)
    if init == "backbone_neck":
        head = _head_prefix(state)
        return {k: v for k, v in state.items() if not k.startswith(head)}
    if init == "backbone":
        return {k: v for k, v in state.items() if k.startswith(BACKBONE_PREFIXES)}
    raise ValueError(f"unknown agssp init '{init}' (known: {', '.join(AGSSP_INITS)})")


def detector_initial_weights(checkpoint: str | Path, init: str = "detector") -> InitialWeights:
    """An AGDP detector checkpoint as initial weights (fp32), the layers ``init`` names; its backbone must load."""
    from agssp_pipeline.training.yolo_backbones import HYBRID_BACKBONE_PREFIX

    state, lineage = ckpt.load_checkpoint(checkpoint, float32=True)
    hybrid = any(k.startswith(HYBRID_BACKBONE_PREFIX) for k in state)  # a non-CSPDarknet backbone's detector
    prefixes = (HYBRID_BACKBONE_PREFIX,) if hybrid else BACKBONE_PREFIXES
    return InitialWeights("agssp", agssp_state(state, init), prefixes,
                          {**lineage, "checkpoint": str(checkpoint), "agssp_init": init})


def settings_dict(settings: Any) -> dict[str, Any]:
    if hasattr(settings, "model_dump"):
        return settings.model_dump(mode="json")
    return asdict(settings)


def environment_versions() -> dict[str, str]:
    import ultralytics

    return {"ultralytics": ultralytics.__version__, "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "pid": str(os.getpid())}


# ---------------------------------------------------------------------------------------------------------------
# YOLO-layout datasets (via the shared exporter in agssp_pipeline.boxes.export)


def export_splits(splits: Mapping[str, pd.DataFrame], boxes: pd.DataFrame, class_names: Sequence[str],
                  out_dir: str | Path) -> Path:
    """Export several splits (records per split name) into one YOLO dataset; returns its data.yaml."""
    from agssp_pipeline.boxes.export import export_yolo_dataset

    if "train" not in splits or "val" not in splits:
        raise ValueError(f"a training export needs 'train' and 'val' splits, got {sorted(splits)}")
    data_yaml: Path | None = None
    for split_name, records in splits.items():
        if records.empty:
            raise ValueError(f"split '{split_name}' of the export to {out_dir} has no images")
        split_boxes = boxes[boxes["image_id"].isin(set(records["image_id"]))]
        data_yaml = export_yolo_dataset(records, split_boxes, class_names, out_dir, split_name)
    assert data_yaml is not None
    return data_yaml


# ---------------------------------------------------------------------------------------------------------------
# AGDP: the pseudo-box training set


@dataclass
class PretrainSet:
    """Images for detector pretraining: positives with pseudo boxes, negatives (judged normal) with none."""

    images: pd.DataFrame  # image_id, path, width, height, source, split ('train'/'val'), negative (bool)
    boxes: pd.DataFrame  # image_id, class_id, x1, y1, x2, y2 (+ score)
    tables: dict[str, dict[str, Any]]  # source -> {path, sha256, map_store_version, index_sha256}
    negatives_dropped: int = 0

    def counts(self) -> dict[str, int]:
        split = self.images["split"]
        return {
            "images_train": int((split == "train").sum()),
            "images_val": int((split == "val").sum()),
            "positives": int((~self.images["negative"]).sum()),
            "negatives": int(self.images["negative"].sum()),
            "negatives_dropped": self.negatives_dropped,
            "boxes": len(self.boxes),
        }


def pseudo_box_table_versions(layout: StorageLayout, sources: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Content hashes of the pseudo-box tables (and indexes) that a detector is trained on."""
    versions = {}
    for source in sorted(sources):
        box_path, index_path = layout.pseudo_boxes(source), layout.index(source)
        for path, what in ((box_path, "pseudo boxes"), (index_path, "image index")):
            if not artifact_io.is_file(path):
                raise FileNotFoundError(f"{what} of source '{source}' missing at {path}: materialize it first")
        table = artifact_io.read_parquet(box_path, columns=["map_store_version"])
        versions[source] = {
            "path": box_path,
            "sha256": file_hash(box_path),
            "index_path": index_path,
            "index_sha256": file_hash(index_path),
            "map_store_version": sorted(set(table["map_store_version"].dropna().astype(str))),
        }
    return versions


def collect_pretrain_set(
    layout: StorageLayout,
    sources: Sequence[str],
    val_fraction: float = 0.1,
    seed: int = 0,
    max_negative_ratio: float | None = 1.0,
) -> PretrainSet:
    """Positives (with pseudo boxes) and negatives (judged normal) of the pretraining sources, split train/val.

    Which images qualify is the exporter's rule (``pseudo_box_training_set``: ambiguous images, judged defective
    but without a box, are left out). ``max_negative_ratio`` caps negatives at a multiple of the positives (seeded
    sample), so a large defect-free folder cannot teach the detector to predict nothing.
    """
    from agssp_pipeline.boxes.export import pseudo_box_training_set

    tables = pseudo_box_table_versions(layout, sources)
    records, boxes = pseudo_box_training_set(layout, sources, include_negatives=True)
    records = records.sort_values("image_id", kind="stable").reset_index(drop=True)
    records["negative"] = ~records["image_id"].isin(set(boxes["image_id"]))
    n_pos = int((~records["negative"]).sum())
    if n_pos == 0:
        raise ValueError(f"no pseudo boxes in sources {sorted(sources)}: nothing to pretrain the detector on")
    rng = np.random.default_rng(seed)
    dropped = 0
    if max_negative_ratio is not None:
        negatives = np.flatnonzero(records["negative"].to_numpy())
        cap = int(np.ceil(max_negative_ratio * n_pos))
        if len(negatives) > cap:
            drop = rng.permutation(negatives)[cap:]
            dropped = len(drop)
            records = records.drop(index=drop).reset_index(drop=True)
    is_val = np.zeros(len(records), dtype=bool)
    n_val = min(len(records) - 1, max(1, int(round(val_fraction * len(records)))))
    is_val[rng.permutation(len(records))[:n_val]] = True
    records["split"] = np.where(is_val, "val", "train")
    boxes = boxes[boxes["image_id"].isin(set(records["image_id"]))].reset_index(drop=True)
    return PretrainSet(records, boxes, tables, dropped)


# ---------------------------------------------------------------------------------------------------------------
# AGDP: the stage


@dataclass
class DetectorCheckpoint:
    run_dir: str
    weights: str
    lineage: dict[str, Any]
    counts: dict[str, int]
    injection: InjectionReport | None


def freezes_backbone(detector) -> bool:
    """Whether AGDP freezes the backbone: ``detector.freeze_backbone``, where ``auto`` freezes only a backbone whose
    AGBP run started from ImageNet weights (a frozen random-init CSPDarknet stem leaves AGDP nothing to learn on)."""
    if detector.freeze_backbone != "auto":
        return bool(detector.freeze_backbone)
    from agssp_pipeline.training.backbones import backbone_spec

    return backbone_spec(detector.backbone).imagenet


def detector_train_settings(detector) -> YoloTrainSettings:
    """YoloTrainSettings of the ``detector:`` config section (backbone frozen = ultralytics freeze=10)."""
    return YoloTrainSettings(
        model=detector.model, backbone=detector.backbone, epochs=detector.epochs, image_size=detector.image_size,
        batch_size=detector.batch_size, device=detector.device, seed=detector.seed, workers=detector.workers,
        freeze_layers=YOLOV8_BACKBONE_LAYERS if freezes_backbone(detector) else None, val=True,
        extra_args=dict(detector.train_args),
    )


def _ultralytics_files(result: YoloTrainResult, run_dir: str) -> tuple[dict[str, bytes], dict[str, str | None]]:
    """ultralytics' run folder as checkpoint files under ``ultralytics/`` and the addresses of best/last.pt."""
    files = {
        "/".join(("ultralytics", *path.relative_to(result.run_dir).parts)): path.read_bytes()
        for path in sorted(result.run_dir.rglob("*")) if path.is_file()
    }

    def published(local: Path | None) -> str | None:
        if local is None:
            return None
        return artifact_io.join(run_dir, "ultralytics", *Path(local).relative_to(result.run_dir).parts)

    return files, {"best": published(result.best_pt), "last": published(result.last_pt)}


def _detector_lineage(run_id: str, detector, initial: InitialWeights, pretrain_set: PretrainSet,
                      settings: YoloTrainSettings, result: YoloTrainResult, published: dict[str, str | None],
                      data_yaml: Path) -> dict[str, Any]:
    backbone_lineage = {k: v for k, v in initial.lineage.items() if k != "checkpoint"}
    return {
        "kind": DETECTOR_KIND,
        "name": detector.model,
        "run_id": run_id,
        "status": "complete",
        "created_at": datetime.now(UTC).isoformat(),
        "model": detector.model,
        "class_names": list(PRETRAIN_CLASS_NAMES),
        "backbone": {"checkpoint": initial.lineage["checkpoint"], "weights_digest": initial.digest,
                     "lineage": backbone_lineage},
        "pseudo_boxes": pretrain_set.tables,
        "training_set": pretrain_set.counts(),
        "settings": settings_dict(settings),
        "train_args": result.train_args,
        "injection": result.injection.summary() if result.injection else None,
        "ultralytics_metrics": result.ultralytics_metrics,
        "ultralytics_best_pt": published["best"],
        "ultralytics_last_pt": published["last"],
        "data_yaml": str(data_yaml),
        "versions": environment_versions(),
    }


def train_agdp(pretrain_set: PretrainSet, initial: InitialWeights | None, settings: YoloTrainSettings,
               export_dir: str | Path, work: str | Path, log: Callable[[str], None] | None = None,
               label: str = "AGDP") -> tuple[YoloTrainResult, Path]:
    """Export a pretraining set (single class "defect", its train/val split) and train the detector on it.

    The one AGDP training path: :func:`pretrain_detector` uses it on the pseudo boxes, the AGDP bounds benchmark
    on ground-truth and random boxes of the same images.
    """
    images = pretrain_set.images
    data_yaml = export_splits(
        {"train": images[images["split"] == "train"], "val": images[images["split"] == "val"]},
        pretrain_set.boxes, PRETRAIN_CLASS_NAMES, export_dir,
    )
    result = train_yolo(data_yaml, settings, work, "ultralytics", initial=initial, log=log, log_label=label)
    return result, data_yaml


def pretrain_detector(
    config,
    backbone_checkpoint: str | Path | None = None,
    sources: Sequence[str] | None = None,
    log: Callable[[str], None] = LOGGER.info,
) -> DetectorCheckpoint:
    """AGDP: train a single-class YOLOv8 on the pseudo boxes of the pretraining sources, from the AGBP backbone.

    ``backbone_checkpoint``: a backbone run dir (default: latest completed run of ``detector.backbone``).
    ultralytics works in a local scratch folder; weights, lineage and its run files are then published to
    ``checkpoints/detector/<model>/<run_id>/`` (local or object storage) and ``latest.json`` moves last.
    """
    layout = config.layout()
    detector = config.detector
    sources = sorted(sources or [s.name for s in config.pretrain_sources()])
    if not sources:
        raise ValueError("no pretraining sources configured (role: pretrain or both)")
    initial = backbone_initial_weights(
        str(backbone_checkpoint or ckpt.latest_checkpoint_dir(layout, detector.backbone))
    )
    pretrain_set = collect_pretrain_set(layout, sources, detector.val_fraction, detector.seed,
                                        detector.max_negative_ratio)
    log(f"AGDP training set: {pretrain_set.counts()} from {sources}")
    settings = detector_train_settings(detector)
    run_id = ckpt.new_run_id()
    run_dir = ckpt.run_dir(layout, detector.model, run_id, kind=DETECTOR_KIND)
    work = layout.scratch("checkpoints", DETECTOR_KIND, detector.model, run_id)
    result, data_yaml = train_agdp(pretrain_set, initial, settings, layout.export_dir("agdp", detector.model),
                                   work, log, f"AGDP {detector.model}")
    files, published = _ultralytics_files(result, run_dir)
    lineage = _detector_lineage(run_id, detector, initial, pretrain_set, settings, result, published, data_yaml)
    lineage["weights_digest"] = state_dict_digest(result.final_state_dict)
    lineage["weights"] = artifact_io.join(run_dir, ckpt.MODEL_FILE)
    weights = ckpt.save_checkpoint(run_dir, result.final_state_dict, lineage, files)
    ckpt.write_latest_pointer(layout, detector.model, run_id, kind=DETECTOR_KIND)
    artifact_io.remove(str(work), recursive=True)  # published: the scratch copy would only double the disk use
    log(f"AGDP checkpoint {weights} (val mAP50 on pseudo boxes: "
        f"{result.ultralytics_metrics.get('metrics/mAP50(B)', float('nan')):.3f})")
    return DetectorCheckpoint(run_dir, weights, lineage, pretrain_set.counts(), result.injection)
