"""AGBP: anomaly-map-guided backbone pretraining (plain PyTorch; Dagster only wraps it).

``L = L_base + lambda * L_distill``: a base loss (supervised classification over the pretraining
categories, MoCo v3 or SimMIM, see ``losses.py``) plus attention distillation of the chosen stages
towards the KeAD anomaly maps. ``lambda="auto"`` equalises both terms on the first iteration.

Command line (one process, or many with torchrun; only rank 0 writes)::

    python -m agssp_pipeline.training.agbp --config agssp.yaml --backbone yolov8n [--epochs 5] [--device cuda]
    torchrun --nproc_per_node=4 -m agssp_pipeline.training.agbp --config agssp.yaml --backbone swin_b

With ``WORLD_SIZE`` > 1 (set by torchrun) each rank joins the process group, trains on its
DistributedSampler shard with DDP-synchronised gradients, and rank 0 writes checkpoints and logs.

Crash safety: every ``checkpoint_every`` epochs the run directory gets the weights, the lineage sidecar
(``status: running``) and ``training_state.pt`` (optimizer, scheduler, modules, RNG). Re-running with the
same config and data (``resume: true``) continues the newest unfinished run at the next epoch. A completed
run gets ``status: complete`` and becomes ``latest.json`` of its backbone.

Library entry point: :func:`train_backbone`. Progress goes to :class:`TrainingCallback` objects
(``LoggingCallback`` for logs / Dagster's ``context.log``, ``TqdmCallback`` for the CLI bar).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from torch import nn

from agssp_pipeline import artifact_io
from agssp_pipeline.training import checkpoint as ckpt
from agssp_pipeline.training.backbones import (
    BACKBONES,
    BackboneSpec,
    backbone_spec,
    build_backbone,
    freeze_stages,
)
from agssp_pipeline.training.data import (
    JointAugment,
    PretrainDataset,
    PretrainTable,
    make_loader,
    pretrain_table_from_config,
)
from agssp_pipeline.training.distributed import (
    DistContext,
    barrier,
    broadcast_object,
    init_distributed,
    mean_across_ranks,
    shutdown,
)
from agssp_pipeline.training.lineage import code_version, data_lineage, stable_hash
from agssp_pipeline.training.losses import auto_distill_weight, build_objective, distillation_loss
from agssp_pipeline.training.settings import BackboneSettings

log = logging.getLogger(__name__)

OPTIMIZER_DEFAULTS = {
    "sgd": {"lr": 0.01, "weight_decay": 1e-4},
    "adamw": {"lr": 1e-4, "weight_decay": 0.05},
}
# settings that do not change what is learned: a resumed run may differ in these
_RUNTIME_ONLY = ("device", "num_workers", "resume", "log_every_steps", "checkpoint_every", "backbones")


# ---------------------------------------------------------------- progress reporting


@dataclass
class StepProgress:
    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based within the epoch
    steps_per_epoch: int
    global_step: int
    total_steps: int
    base_loss: float | None
    distill_loss: float
    total_loss: float
    distill_weight: float
    lr: float
    images_per_s: float
    eta_s: float


@dataclass
class EpochSummary:
    epoch: int
    epochs: int
    base_loss: float | None
    distill_loss: float
    total_loss: float
    images_per_s: float
    seconds: float
    eta_s: float


class TrainingCallback:
    """Hooks called on rank 0; subclass and override what you need."""

    def on_train_start(self, info: dict[str, Any]) -> None: ...

    def on_step_end(self, progress: StepProgress) -> None: ...

    def on_epoch_end(self, summary: EpochSummary) -> None: ...

    def on_checkpoint(self, run_dir: str, epoch: int) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Lines:
    """A bare ``log(str)`` callable seen as a logger (``.info``)."""

    def __init__(self, write: Callable[[str], None]):
        self.info = write


class LoggingCallback(TrainingCallback):
    """Logs progress lines to a logger-like object (``logging.Logger``, Dagster's ``context.log``) or to a
    plain ``log(str)`` callable such as ``context.log.info``."""

    def __init__(self, logger: Any = None, every_steps: int = 10):
        logger = logger or log
        self.logger = logger if hasattr(logger, "info") else _Lines(logger)
        self.every_steps = every_steps

    def on_train_start(self, info):
        self.logger.info(
            f"AGBP {info['backbone']} run {info['run_id']}: {info['images']} images, {info['classes']} classes, "
            f"epochs {info['start_epoch']}..{info['epochs']}, device {info['device']} x{info['world_size']}"
        )

    def on_step_end(self, p: StepProgress):
        if p.step % self.every_steps == 0 or p.step == p.steps_per_epoch:
            self.logger.info(
                f"epoch {p.epoch}/{p.epochs} step {p.step}/{p.steps_per_epoch} base {_fmt(p.base_loss)} "
                f"distill {_fmt(p.distill_loss)} (x{p.distill_weight:.3g}) total {_fmt(p.total_loss)} "
                f"lr {p.lr:.2e} {p.images_per_s:.1f} img/s ETA {_fmt_eta(p.eta_s)}"
            )

    def on_epoch_end(self, s: EpochSummary):
        self.logger.info(
            f"epoch {s.epoch}/{s.epochs} done in {s.seconds:.1f}s: base {_fmt(s.base_loss)} distill "
            f"{_fmt(s.distill_loss)} total {_fmt(s.total_loss)}, {s.images_per_s:.1f} img/s, ETA {_fmt_eta(s.eta_s)}"
        )

    def on_checkpoint(self, run_dir, epoch):
        self.logger.info(f"checkpoint after epoch {epoch}: {run_dir}")


class TqdmCallback(TrainingCallback):
    """A progress bar over all steps of the run (CLI)."""

    def __init__(self):
        self.bar = None

    def on_train_start(self, info):
        from tqdm import tqdm

        self.bar = tqdm(
            total=info["total_steps"],
            initial=info["start_step"],
            desc=f"AGBP {info['backbone']}",
            unit="step",
        )

    def on_step_end(self, p):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                epoch=f"{p.epoch}/{p.epochs}",
                base=_fmt(p.base_loss),
                distill=_fmt(p.distill_loss),
                ips=f"{p.images_per_s:.0f}",
            )

    def on_train_end(self, result):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- result


@dataclass
class TrainResult:
    backbone: str
    run_id: str
    run_dir: str
    model_path: str
    lineage: dict[str, Any]
    epoch_history: list[dict[str, Any]]
    step_history: dict[str, list[float]]  # global_step, base, distill, total
    images_per_s: float
    device: str
    start_epoch: int  # 1 for a fresh run, k+1 when resumed after epoch k
    metrics: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- training


@dataclass
class ResolvedSettings:
    """The settings after applying the backbone family's defaults (what goes into the lineage)."""

    base_loss: str
    distill_distance: str
    distill_stages: list[int]
    freeze_stages: list[int]
    optimizer: str
    lr: float
    weight_decay: float


def resolve_settings(spec: BackboneSpec, settings: BackboneSettings) -> ResolvedSettings:
    optimizer = spec.optimizer if settings.optimizer == "auto" else settings.optimizer
    defaults = OPTIMIZER_DEFAULTS[optimizer]
    base_loss = spec.self_supervised if settings.base_loss == "ssl" else settings.base_loss
    distill_stages = list(
        settings.distill_stages if settings.distill_stages is not None else spec.default_distill_stages()
    )
    frozen = list(
        settings.freeze_stages if settings.freeze_stages is not None else spec.default_freeze_stages()
    )
    overlap = set(distill_stages) & set(frozen)
    if overlap and settings.distill_weight != 0:
        raise ValueError(
            f"stages {sorted(overlap)} are both frozen and distilled; distillation could not change them"
        )
    return ResolvedSettings(
        base_loss=base_loss,
        distill_distance=spec.distill_loss if settings.distill_loss == "default" else settings.distill_loss,
        distill_stages=distill_stages,
        freeze_stages=frozen,
        optimizer=optimizer,
        lr=settings.lr or defaults["lr"],
        weight_decay=defaults["weight_decay"] if settings.weight_decay is None else settings.weight_decay,
    )


def _build_optimizer(params: list[nn.Parameter], resolved: ResolvedSettings) -> torch.optim.Optimizer:
    if resolved.optimizer == "sgd":
        return torch.optim.SGD(params, lr=resolved.lr, momentum=0.9, weight_decay=resolved.weight_decay)
    return torch.optim.AdamW(params, lr=resolved.lr, weight_decay=resolved.weight_decay)


def config_hash(backbone: str, settings: BackboneSettings) -> str:
    payload = settings.model_dump(mode="json", exclude=set(_RUNTIME_ONLY))
    return stable_hash({"backbone": backbone, "settings": payload})


def _find_resumable_run(layout, backbone: str, cfg_hash: str, data_hash: str) -> str | None:
    candidates = [
        run_id
        for run_id, lineage in ckpt.list_runs(layout, backbone)
        if lineage.get("status") == "running"
        and lineage.get("config_hash") == cfg_hash
        and lineage.get("data_hash") == data_hash
        and lineage.get("epochs_completed", 0) > 0
    ]
    return candidates[-1] if candidates else None


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Run:
    """What a run trains and where: decided (and agreed by every rank) before anything is built."""

    backbone: str
    settings: BackboneSettings
    spec: BackboneSpec
    resolved: ResolvedSettings
    ctx: DistContext
    layout: Any
    table: PretrainTable
    data_info: dict[str, Any]
    data_hash: str
    cfg_hash: str
    run_id: str
    run_dir: str
    resume_state: dict[str, Any] | None


@dataclass
class _Parts:
    """The built model, objective, optimiser and data of a run."""

    model: nn.Module
    objective: nn.Module
    frozen_modules: list[nn.Module]
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    steps_per_epoch: int
    total_steps: int
    num_classes: int
    train_module: nn.Module | None = None  # the objective, or its DDP wrapper


def _empty_step_history() -> dict[str, list[float]]:
    return {"global_step": [], "base": [], "distill": [], "total": []}


@dataclass
class _Progress:
    """What changes while training (restored from ``training_state.pt`` on resume)."""

    distill_weight: float | None
    start_epoch: int = 1
    global_step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    step_history: dict[str, list[float]] = field(default_factory=_empty_step_history)
    epoch_history: list[dict[str, Any]] = field(default_factory=list)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    saved_lineage: dict[str, Any] | None = None  # what the last checkpoint wrote (rank 0)


def _plan_run(config, backbone: str, settings: BackboneSettings, table: PretrainTable | None,
              run_id: str | None, dist_ctx: DistContext | None) -> _Run:
    """Settings, data and run directory: resume an unfinished run with identical config and data, else a new one."""
    spec = backbone_spec(backbone)
    resolved = resolve_settings(spec, settings)
    ctx = dist_ctx or init_distributed(settings.device)
    layout = config.layout()
    table = table if table is not None else pretrain_table_from_config(config)
    if len(table) < 2:
        raise ValueError("AGBP needs at least 2 images with anomaly maps (batch statistics)")
    data_info = data_lineage(config, table)
    data_hash = stable_hash(
        {s: (v["index_version"], v["map_store_version"], v["images_used"]) for s, v in data_info["sources"].items()}
    )
    cfg_hash = config_hash(backbone, settings)
    resume_id = None
    if ctx.is_main and settings.resume and run_id is None:
        resume_id = _find_resumable_run(layout, backbone, cfg_hash, data_hash)
    run_id = broadcast_object(run_id or resume_id or ckpt.new_run_id(), ctx)
    run_dir = ckpt.run_dir(layout, backbone, run_id)
    state = ckpt.load_training_state(run_dir) if ctx.is_main and settings.resume else None
    if resolved.base_loss == "cls" and table.num_classes < 2:
        log.warning(
            "only one pretraining category (%s): the classification loss carries no signal; "
            "consider base_loss: ssl (MoCo v3 / SimMIM) or none",
            ", ".join(table.classes),
        )
    return _Run(backbone, settings, spec, resolved, ctx, layout, table, data_info, data_hash, cfg_hash,
                run_id, run_dir, broadcast_object(state, ctx))


def _build_parts(run: _Run) -> _Parts:
    """Seeded model with frozen stages, objective, optimiser, loader (sharded per rank) and scheduler."""
    settings, resolved, device = run.settings, run.resolved, run.ctx.device
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    num_classes = run.table.num_classes if resolved.base_loss == "cls" else 0
    model = build_backbone(run.backbone, num_classes=num_classes, image_size=settings.image_size)
    frozen_modules = freeze_stages(model.backbone, resolved.freeze_stages)
    objective = build_objective(resolved.base_loss, model).to(device)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = _build_optimizer(trainable, resolved)
    augment = JointAugment(
        settings.image_size,
        scale=(settings.crop_scale_min, 1.0),
        hflip=settings.hflip,
        vflip=settings.vflip,
        color_jitter=0.4 if objective.views > 1 else 0.0,
    )
    loader = make_loader(
        PretrainDataset(run.table, augment, views=objective.views),
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        seed=settings.seed,
        rank=run.ctx.rank,
        world_size=run.ctx.world_size,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = (
        len(loader) if settings.max_steps_per_epoch is None else min(len(loader), settings.max_steps_per_epoch)
    )
    total_steps = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return _Parts(model, objective, frozen_modules, trainable, optimizer, scheduler, loader, steps_per_epoch,
                  total_steps, num_classes)


def _restore(run: _Run, parts: _Parts) -> _Progress:
    """A fresh progress record, or the one saved after the last checkpointed epoch (modules and RNG too)."""
    weight = run.settings.distill_weight
    progress = _Progress(distill_weight=None if weight == "auto" else float(weight))
    state = run.resume_state
    if state is not None:
        previous = ckpt.read_lineage(run.run_dir) if run.ctx.is_main else {}
        if previous.get("config_hash") not in (None, run.cfg_hash):
            raise ValueError(
                f"run {run.run_id} was trained with another config (hash {previous['config_hash']} vs "
                f"{run.cfg_hash}); start a new run instead of resuming it"
            )
        parts.objective.load_state_dict(state["objective"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        progress.start_epoch = int(state["epoch"]) + 1
        progress.distill_weight = state.get("distill_weight", progress.distill_weight)
        progress.step_history = state["step_history"]
        progress.epoch_history = state["epoch_history"]
        progress.created_at = state.get("created_at", progress.created_at)
        log.info("resuming %s run %s after epoch %d", run.backbone, run.run_id, progress.start_epoch - 1)
    progress.global_step = (progress.start_epoch - 1) * parts.steps_per_epoch
    # after loading the state: DDP broadcasts rank 0's parameters when it wraps the module
    parts.train_module = parts.objective
    if run.ctx.distributed:
        device = run.ctx.device
        parts.train_module = nn.parallel.DistributedDataParallel(
            parts.objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    return progress


def _lineage_base(config, run: _Run, parts: _Parts, progress: _Progress,
                  extra: dict[str, Any] | None) -> dict[str, Any]:
    """The parts of ``lineage.json`` fixed for the run; ``extra`` (e.g. Dagster's view of the inputs) joins them."""
    device = run.ctx.device
    base = {
        "kind": ckpt.BACKBONE,
        "name": run.backbone,
        "backbone": run.backbone,
        "backbone_description": run.spec.description,
        "detector_compatible": run.spec.detector_compatible,
        "weights_format": "ultralytics-yolov8-detectionmodel" if run.spec.detector_compatible else "timm",
        "run_id": run.run_id,
        "created_at": progress.created_at,
        "config": run.settings.model_dump(mode="json"),
        "config_hash": run.cfg_hash,
        "config_path": getattr(config, "config_path", None),
        "resolved": asdict(run.resolved),
        "data": run.data_info,
        "data_hash": run.data_hash,
        "code": code_version(),
        "epochs": run.settings.epochs,
        "image_size": run.settings.image_size,
        "num_classes": parts.num_classes,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "world_size": run.ctx.world_size,
    }
    clash = sorted(set(extra or {}) & set(base))
    if clash:
        raise ValueError(f"extra lineage keys {clash} would overwrite what the trainer records")
    return {**base, **(extra or {})}


def _snapshot_lineage(base: dict[str, Any], progress: _Progress, status: str, epochs_completed: int) -> dict[str, Any]:
    last = progress.epoch_history[-1] if progress.epoch_history else {}
    return {
        **base,
        "status": status,
        "updated_at": datetime.now(UTC).isoformat(),
        "epochs_completed": epochs_completed,
        "distill_weight": progress.distill_weight,
        "final_losses": {k: last.get(k) for k in ("base_loss", "distill_loss", "total_loss")},
        "epoch_history": progress.epoch_history,
        "images_per_s": (progress.images_seen / progress.train_seconds) if progress.train_seconds > 0 else None,
    }


def _distill_term(run: _Run, view_features, maps: torch.Tensor) -> torch.Tensor:
    if run.settings.distill_weight == 0:
        return torch.zeros((), device=run.ctx.device)
    stages, distance = run.resolved.distill_stages, run.resolved.distill_distance
    terms = [distillation_loss(features, maps[:, v], stages, distance) for v, features in enumerate(view_features)]
    return sum(terms) / len(view_features)


def _auto_weight(ctx: DistContext, base_loss: torch.Tensor | None, distill: torch.Tensor) -> float:
    """``lambda="auto"``: equal contributions of both terms on the first iteration (averaged over ranks)."""
    base_value = mean_across_ranks(float(base_loss.detach()) if base_loss is not None else 0.0, ctx)
    distill_value = mean_across_ranks(float(distill.detach()), ctx)
    weight = auto_distill_weight(base_value, distill_value) if base_loss is not None else 1.0
    if ctx.is_main:
        log.info("auto distillation weight: %.4g (base %.4g, distill %.4g)", weight, base_value, distill_value)
    return weight


def _train_step(run: _Run, parts: _Parts, progress: _Progress, batch: dict[str, torch.Tensor],
                epoch: int, step: int) -> tuple[dict[str, float | None], int]:
    """One optimiser step; returns the loss values and the number of images this rank saw."""
    device = run.ctx.device
    images = batch["image"].to(device, non_blocking=True)
    maps = batch["map"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True)
    with _autocast(device, run.settings.amp):
        base_loss, view_features = parts.train_module(images, labels)
    distill = _distill_term(run, view_features, maps)
    if progress.distill_weight is None:
        progress.distill_weight = _auto_weight(run.ctx, base_loss, distill)
    weight = progress.distill_weight
    total = weight * distill if base_loss is None else base_loss + weight * distill
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}; lower lr or check the maps")
    parts.optimizer.zero_grad(set_to_none=True)
    total.backward()
    if run.settings.grad_clip:
        torch.nn.utils.clip_grad_norm_(parts.trainable, run.settings.grad_clip)
    parts.optimizer.step()
    parts.scheduler.step()
    progress.global_step += 1
    parts.objective.after_step(progress.global_step / max(parts.total_steps, 1))
    values = {
        "base": float(base_loss.detach()) if base_loss is not None else None,
        "distill": float(distill.detach()),
        "total": float(total.detach()),
    }
    return values, int(images.shape[0])


def _record_step(run: _Run, parts: _Parts, progress: _Progress, epoch: int, step: int,
                 values: dict[str, float | None], callbacks: Sequence[TrainingCallback]) -> None:
    history = progress.step_history
    history["global_step"].append(progress.global_step)
    for key in ("base", "distill", "total"):
        history[key].append(values[key] if values[key] is not None else float("nan"))
    seconds = progress.train_seconds
    start_step = (progress.start_epoch - 1) * parts.steps_per_epoch
    eta = (parts.total_steps - progress.global_step) * (seconds / max(progress.global_step - start_step, 1))
    report = StepProgress(
        epoch=epoch,
        epochs=run.settings.epochs,
        step=step,
        steps_per_epoch=parts.steps_per_epoch,
        global_step=progress.global_step,
        total_steps=parts.total_steps,
        base_loss=values["base"],
        distill_loss=values["distill"],
        total_loss=values["total"],
        distill_weight=progress.distill_weight,
        lr=parts.scheduler.get_last_lr()[0],
        images_per_s=progress.images_seen / seconds if seconds > 0 else 0.0,
        eta_s=eta,
    )
    for callback in callbacks:
        callback.on_step_end(report)


def _train_epoch(run: _Run, parts: _Parts, progress: _Progress, epoch: int,
                 callbacks: Sequence[TrainingCallback]) -> EpochSummary:
    """One pass over this rank's shard; data order and augmentation are functions of (seed, epoch, rank)."""
    ctx, settings = run.ctx, run.settings
    parts.loader.sampler.set_epoch(epoch)
    if parts.loader.generator is not None:  # worker augmentation seeds: resumable
        parts.loader.generator.manual_seed(settings.seed * 1_000_003 + epoch * 1009 + ctx.rank)
    parts.objective.train()
    for module in parts.frozen_modules:
        module.eval()  # frozen stages keep their BatchNorm statistics
    sums = {"base": 0.0, "distill": 0.0, "total": 0.0}
    epoch_start = tick = time.perf_counter()
    epoch_images = steps_done = 0
    for step, batch in enumerate(parts.loader, start=1):
        if step > parts.steps_per_epoch:
            break
        values, rank_images = _train_step(run, parts, progress, batch, epoch, step)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        now = time.perf_counter()
        progress.train_seconds += now - tick  # includes waiting for data: the throughput a user gets
        tick = now
        steps_done += 1
        progress.images_seen += rank_images * ctx.world_size
        epoch_images += rank_images * ctx.world_size
        for key in sums:
            sums[key] += values[key] or 0.0
        _record_step(run, parts, progress, epoch, step, values, callbacks)
    means = {k: mean_across_ranks(v / max(steps_done, 1), ctx) for k, v in sums.items()}
    seconds = time.perf_counter() - epoch_start
    summary = EpochSummary(
        epoch=epoch,
        epochs=settings.epochs,
        base_loss=means["base"] if run.resolved.base_loss != "none" else None,
        distill_loss=means["distill"],
        total_loss=means["total"],
        images_per_s=epoch_images / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        eta_s=(settings.epochs - epoch) * seconds,
    )
    progress.epoch_history.append(
        {
            "epoch": epoch,
            "base_loss": summary.base_loss,
            "distill_loss": summary.distill_loss,
            "total_loss": summary.total_loss,
            "images_per_s": summary.images_per_s,
            "seconds": seconds,
        }
    )
    return summary


def _save_checkpoint(run: _Run, parts: _Parts, progress: _Progress, epoch: int, base: dict[str, Any]) -> None:
    """Rank 0: resume state, weights and the lineage (``running``, or ``complete`` after the last epoch)."""
    ckpt.save_training_state(
        run.run_dir,
        {
            "epoch": epoch,
            "objective": parts.objective.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "rng": _rng_state(),
            "distill_weight": progress.distill_weight,
            "step_history": progress.step_history,
            "epoch_history": progress.epoch_history,
            "created_at": progress.created_at,
        },
    )
    weights = parts.model.backbone.native_state_dict()
    status = "complete" if epoch == run.settings.epochs else "running"
    lineage = {**_snapshot_lineage(base, progress, status, epoch), "weights_digest": ckpt.state_dict_digest(weights),
               "weights": artifact_io.canonical(artifact_io.join(run.run_dir, ckpt.MODEL_FILE))}
    ckpt.save_checkpoint(run.run_dir, weights, lineage)
    progress.saved_lineage = lineage


def _complete(run: _Run, progress: _Progress, base: dict[str, Any], make_latest: bool = True) -> dict[str, Any]:
    """Move ``latest.json`` to this run (rank 0, unless ``make_latest`` is off) and return its lineage as
    written by the last checkpoint."""
    lineage = _snapshot_lineage(base, progress, "complete", run.settings.epochs)
    if run.ctx.is_main:
        # a resumed run whose last epoch was already saved wrote its lineage in the earlier process
        lineage = progress.saved_lineage or ckpt.read_lineage(run.run_dir)
        if make_latest:
            ckpt.write_latest_pointer(run.layout, run.backbone, run.run_id, {"updated_at": lineage["updated_at"]})
    barrier(run.ctx)
    return lineage


def _start_info(run: _Run, parts: _Parts, progress: _Progress) -> dict[str, Any]:
    return {
        "backbone": run.backbone,
        "run_id": run.run_id,
        "images": len(run.table),
        "classes": run.table.num_classes,
        "start_epoch": progress.start_epoch,
        "epochs": run.settings.epochs,
        "device": str(run.ctx.device),
        "world_size": run.ctx.world_size,
        "total_steps": parts.total_steps,
        "start_step": progress.global_step,
        "run_dir": run.run_dir,
    }


def train_backbone(
    config,
    backbone: str,
    *,
    settings: BackboneSettings | None = None,
    table: PretrainTable | None = None,
    callbacks: Sequence[TrainingCallback] = (),
    run_id: str | None = None,
    dist_ctx: DistContext | None = None,
    extra_lineage: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    make_latest: bool = True,
) -> TrainResult:
    """Pretrain ``backbone`` on the config's pretraining sources; write checkpoint + lineage.

    ``log`` (e.g. Dagster's ``context.log.info``) gets the run's start, a line every
    ``settings.log_every_steps`` steps and one per epoch (epoch/total, losses, img/s, ETA).

    ``config``: a ``PipelineConfig`` (storage layout, sources). ``settings`` defaults to
    ``config.backbone``. ``table`` overrides the image/map table (tests, notebooks). ``extra_lineage``
    (new keys only) goes into ``lineage.json``, which only this function writes. Returns on rank 0 and
    on other ranks alike (others get the same paths; only rank 0 wrote them). ``make_latest: False``
    leaves ``latest.json`` where it is (a baseline run that AGDP must not pick up).
    """
    run = _plan_run(config, backbone, settings or config.backbone, table, run_id, dist_ctx)
    parts = _build_parts(run)
    progress = _restore(run, parts)
    base = _lineage_base(config, run, parts, progress, extra_lineage)
    if log is not None:
        callbacks = [*callbacks, LoggingCallback(log, every_steps=run.settings.log_every_steps)]
    callbacks = list(callbacks) if run.ctx.is_main else []
    for callback in callbacks:
        callback.on_train_start(_start_info(run, parts, progress))
    epochs = run.settings.epochs
    for epoch in range(progress.start_epoch, epochs + 1):
        summary = _train_epoch(run, parts, progress, epoch, callbacks)
        if run.ctx.is_main and (epoch % run.settings.checkpoint_every == 0 or epoch == epochs):
            _save_checkpoint(run, parts, progress, epoch, base)
            for callback in callbacks:
                callback.on_checkpoint(run.run_dir, epoch)
        for callback in callbacks:
            callback.on_epoch_end(summary)
        barrier(run.ctx)
    lineage = _complete(run, progress, base, make_latest)
    result = TrainResult(
        backbone=backbone,
        run_id=run.run_id,
        run_dir=run.run_dir,
        model_path=artifact_io.join(run.run_dir, ckpt.MODEL_FILE),
        lineage=lineage,
        epoch_history=progress.epoch_history,
        step_history=progress.step_history,
        images_per_s=float(lineage.get("images_per_s") or 0.0),
        device=str(run.ctx.device),
        start_epoch=progress.start_epoch,
    )
    for callback in callbacks:
        callback.on_train_end(result)
    return result


def train_domain_baseline(
    config,
    backbone: str,
    *,
    settings: BackboneSettings | None = None,
    table: PretrainTable | None = None,
    extra_lineage: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """The paper's mode 2: the same recipe on the same corpus with the distillation weight at 0.

    It isolates what anomaly guidance adds over plain in-domain pretraining (finetune variant ``domain``).
    Never ``latest.json``: AGDP and every other consumer of "the backbone" keep getting the AGBP run; the
    finetune finds this run by the ``distill_weight: 0`` its lineage records.
    """
    baseline = (settings or config.backbone).model_copy(update={"distill_weight": 0.0})
    return train_backbone(config, backbone, settings=baseline, table=table, extra_lineage=extra_lineage, log=log,
                          make_latest=False)


def plot_loss_curves(step_history: dict[str, list[float]], title: str = "AGBP losses") -> bytes:
    """PNG bytes of base / distillation / total loss per step (matplotlib Agg; no display needed)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = step_history["global_step"]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for key, label in (("base", "base"), ("distill", "distillation (unweighted)"), ("total", "total")):
        values = list(step_history[key])
        if values and not all(math.isnan(v) for v in values):
            ax.plot(steps, values, label=label, linewidth=1.2, marker="o" if len(values) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    from agssp_pipeline.config import load_config

    parser = argparse.ArgumentParser(
        description="AGBP backbone pretraining (works under torchrun for multi-GPU)"
    )
    parser.add_argument("--config", help="agssp.yaml (default: $AGSSP_CONFIG)")
    parser.add_argument("--backbone", help="registered backbone name, e.g. yolov8n, resnet50, swin_b")
    parser.add_argument(
        "--list-backbones", action="store_true", help="print the registry with its defaults and exit"
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--base-loss", choices=["cls", "moco", "simmim", "ssl", "none"])
    parser.add_argument("--max-steps-per-epoch", type=int)
    parser.add_argument(
        "--no-resume", action="store_true", help="start a new run even if an unfinished one matches"
    )
    parser.add_argument("--run-id", help="write into (or resume) this run id")
    args = parser.parse_args(argv)
    if args.list_backbones:
        for name, spec in sorted(BACKBONES.items()):
            print(
                f"{name:<11} {spec.family:<4} distil stages {list(spec.default_distill_stages())} "
                f"freeze {list(spec.default_freeze_stages())} {spec.distill_loss:<7} {spec.optimizer:<6} "
                f"ssl {spec.self_supervised:<7} {spec.description}"
            )
        return 0
    if not args.backbone:
        parser.error("--backbone is required (see --list-backbones)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    config = load_config(args.config)
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "device": args.device,
        "num_workers": args.workers,
        "base_loss": args.base_loss,
        "max_steps_per_epoch": args.max_steps_per_epoch,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_resume:
        overrides["resume"] = False
    settings = BackboneSettings.model_validate({**config.backbone.model_dump(), **overrides})
    ctx = init_distributed(settings.device)
    try:
        callbacks: list[TrainingCallback] = [LoggingCallback(every_steps=settings.log_every_steps)]
        if ctx.is_main:
            callbacks.append(TqdmCallback())
        result = train_backbone(
            config, args.backbone, settings=settings, callbacks=callbacks, run_id=args.run_id, dist_ctx=ctx
        )
        if ctx.is_main:
            print(f"checkpoint: {result.model_path}\nlineage: {result.run_dir}/{ckpt.LINEAGE_FILE}")
            print(f"images/s: {result.images_per_s:.1f} on {result.device}")
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
