"""ADPretrain feature adaptor for the CNN few-shot encoder: a small projector trained on residual features.

Why: ImageNet features rank defect pixels only moderately well (uneven finishes, thin cracks); the
ADPretrain idea is to learn, on top of the frozen encoder, a projection of *residual* features (a patch
feature minus its nearest normal reference patch of the same category) in which normal and abnormal
residuals differ in angle and norm (``adaptor_losses``). The few-shot score then becomes the norm of
the projected residual instead of the plain nearest-neighbour distance.

Anomalies to learn from: the real masks of *pretraining* sources that have them and synthetic
anomalies pasted onto their normal images (``synthetic``); downstream sources never contribute.

Pieces (Dagster-free; the ``feature_adaptor`` asset wires them):
- ``collect_training_images``: per category, normal images (not the references) with synthetic copies,
  plus real-mask images;
- ``residual_bank``: two augmented views of each image -> residuals vs the category's reference memory,
  patch labels from the masks at the encoder's grid;
- ``train_projector``: Adam on balanced batches of the bank;
- ``save_adaptor`` / ``load_adaptor`` / ``resolve_adaptor_setting``: checkpoints of kind ``adaptor``
  (``checkpoints/adaptor/<encoder>/<run_id>``) through ``training.checkpoint``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from agssp_pipeline.kead.adaptor_losses import adaptor_loss
from agssp_pipeline.kead.maps import batch_images
from agssp_pipeline.kead.synthetic import SyntheticRecipe, synthesize
from agssp_pipeline.sources.decode import read_rgb
from agssp_pipeline.sources.regions import read_mask

ADAPTOR_KIND = "adaptor"
# encoder identity fields an adaptor's features depend on: a mismatch means different features
COMPATIBLE_KEYS = ("encoder", "model", "weights", "image_size", "layers", "input")
FEATURE_DEFAULTS = {"input": "squash"}  # identities from before kead.input existed squashed their inputs
ABNORMAL_FRACTION = 0.5  # a grid cell is abnormal when at least half its pixels are; normal when none is


class ResidualProjector(nn.Module):
    """Two-layer MLP on residual features: (N, in_dim) -> (N, out_dim).

    ``skip``: output = residual + MLP(residual) (out_dim = in_dim) with the MLP's last layer starting at
    zero, so an untrained adaptor scores exactly like the plain encoder (the norm of the residual is a
    monotonic function of the cosine distance) and training can only move away from that on evidence.
    """

    def __init__(self, in_dim: int, hidden: int = 256, out_dim: int = 128, skip: bool = False) -> None:
        super().__init__()
        out_dim = in_dim if skip else out_dim
        self.config = {"in_dim": int(in_dim), "hidden": int(hidden), "out_dim": int(out_dim), "skip": bool(skip)}
        self.skip = bool(skip)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        if self.skip:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, residuals: torch.Tensor) -> torch.Tensor:
        out = self.net(residuals)
        return residuals + out if self.skip else out


@dataclass
class TrainingImage:
    """One image the adaptor learns from; ``mask`` None means wholly normal."""

    category: str
    image: np.ndarray  # HWC uint8 RGB
    mask: np.ndarray | None
    origin: str  # "normal", "real_mask" or "synthetic:<kind>"


@dataclass
class ResidualBank:
    view_a: torch.Tensor  # (N, D) residuals of the first view
    view_b: torch.Tensor  # (N, D) residuals of the same patches in the second view
    labels: torch.Tensor  # (N,) 1 abnormal, 0 normal
    counts: dict[str, int] = field(default_factory=dict)


def patch_labels(mask: np.ndarray | None, grid: int) -> np.ndarray:
    """(grid, grid) int8: 1 abnormal (>= half the cell), 0 normal (no pixel), -1 ambiguous (left out)."""
    if mask is None:
        return np.zeros((grid, grid), np.int8)
    fraction = F.adaptive_avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], grid)[0, 0].numpy()
    labels = np.full((grid, grid), -1, np.int8)
    labels[fraction >= ABNORMAL_FRACTION] = 1
    labels[fraction <= 0.0] = 0
    return labels


def _positive_mask(path: Any) -> np.ndarray | None:
    if not isinstance(path, str):
        return None
    try:
        mask = read_mask(path).astype(bool)
    except ValueError:
        return None
    return mask if mask.any() else None


def _pick(rows: pd.DataFrame, count: int, rng: np.random.Generator) -> pd.DataFrame:
    rows = rows.sort_values("image_id")
    return rows if len(rows) <= count else rows.iloc[np.sort(rng.choice(len(rows), count, replace=False))]


def collect_training_images(pool: pd.DataFrame, references: pd.DataFrame, recipe: SyntheticRecipe,
                            max_images: int = 32, synthetic_per_image: int = 2,
                            log: Callable[[str], None] | None = None) -> list[TrainingImage]:
    """Per category of ``references``: normal images with synthetic copies, and real-mask images.

    ``pool``: index rows of the pretraining sources only (the caller keeps downstream ones out). Normal
    images that are references are used only when a category has no other normal image (their patches
    are in the memory, so their own residuals are near zero). Unreadable files are skipped and logged.
    """
    rng = np.random.default_rng(recipe.seed)
    rows = pool.drop_duplicates("image_id")
    if "duplicate_of" in rows:
        rows = rows[rows["duplicate_of"].isna()]
    normal_flag = rows["is_normal"].fillna(False).astype(bool) if "is_normal" in rows else pd.Series(False, rows.index)
    has_mask = rows["mask_path"].notna() if "mask_path" in rows else pd.Series(False, rows.index)
    out: list[TrainingImage] = []
    for category, refs in references.groupby(references["category"].astype(str), sort=True):
        in_category = rows["category"].astype(str) == category
        normals = rows[in_category & normal_flag & ~rows["image_id"].isin(refs["image_id"])]
        if normals.empty:
            normals = rows[rows["image_id"].isin(refs["image_id"])]
        decoded = []
        for path in _pick(normals, max_images, rng)["path"].astype(str):
            try:
                decoded.append(read_rgb(path))
            except (OSError, ValueError) as error:
                if log is not None:
                    log(f"adaptor: skipped unreadable normal image {path}: {error}")
        for number, image in enumerate(decoded):
            out.append(TrainingImage(category, image, None, "normal"))
            textures = decoded[:number] + decoded[number + 1:]
            for _ in range(synthetic_per_image):
                anomalous, mask, kind = synthesize(image, recipe, rng, textures)
                out.append(TrainingImage(category, anomalous, mask, f"synthetic:{kind}"))
        for row in _pick(rows[in_category & has_mask & ~normal_flag], max_images, rng).itertuples(index=False):
            mask = _positive_mask(row.mask_path)
            try:
                image = read_rgb(str(row.path)) if mask is not None else None
            except (OSError, ValueError) as error:
                image = None
                if log is not None:
                    log(f"adaptor: skipped unreadable masked image {row.path}: {error}")
            if image is not None and mask.shape == image.shape[:2]:
                out.append(TrainingImage(category, image, mask, "real_mask"))
    return out


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A photometric view of a preprocessed batch: brightness / contrast jitter and light noise (same geometry)."""
    if isinstance(images, list):  # aspect inputs of several shapes (kead.input: aspect)
        return [augment(image[None], generator)[0] for image in images]
    batch = images.shape[0]
    gain = 1.0 + 0.2 * (torch.rand(batch, 1, 1, 1, generator=generator) - 0.5)
    shift = 0.2 * (torch.rand(batch, 1, 1, 1, generator=generator) - 0.5)
    noise = 0.03 * torch.randn(images.shape, generator=generator)
    return images * gain + shift + noise


def _sample_cells(labels: np.ndarray, normal_cells: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of up to ``normal_cells`` normal cells and up to four times as many abnormal ones.

    The caps bound the bank's memory (a large defect on a 40x40 grid is ~1,000 cells of ~500 floats).
    """
    flat = labels.ravel()
    abnormal, normal = np.flatnonzero(flat == 1), np.flatnonzero(flat == 0)
    if len(normal) > normal_cells:
        normal = rng.choice(normal, normal_cells, replace=False)
    if len(abnormal) > 4 * normal_cells:
        abnormal = rng.choice(abnormal, 4 * normal_cells, replace=False)
    return np.concatenate([abnormal, normal])


@torch.no_grad()
def residual_bank(encoder: Any, images: list[TrainingImage], reference_images: dict[str, torch.Tensor],
                  normal_cells: int = 64, seed: int = 0, batch_size: int = 16) -> ResidualBank:
    """Residuals of two views of every training image against its category's reference memory."""
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    parts_a, parts_b, part_labels, counts = [], [], [], {}
    for category in sorted({item.category for item in images}):
        if category not in reference_images:
            raise ValueError(f"adaptor: no reference images for category '{category}'")
        encoder.set_references(category, reference_images[category])
        items = [item for item in images if item.category == category]
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = batch_images([encoder.preprocess(item.image) for item in chunk])
            res_a = encoder.residuals(augment(batch, generator), category)
            res_b = encoder.residuals(augment(batch, generator), category)
            for number, item in enumerate(chunk):
                labels = patch_labels(item.mask, encoder.grid_size)
                cells = torch.from_numpy(_sample_cells(labels, normal_cells, rng))
                parts_a.append(res_a[number].reshape(-1, res_a.shape[-1])[cells].cpu())
                parts_b.append(res_b[number].reshape(-1, res_b.shape[-1])[cells].cpu())
                part_labels.append(torch.from_numpy(labels.ravel()[cells.numpy()].astype(np.int64)))
                counts[item.origin.split(":")[0]] = counts.get(item.origin.split(":")[0], 0) + 1
    encoder.clear_references()
    if not parts_a:
        raise ValueError("adaptor: no training images (no normal or masked images in the pretraining sources)")
    return ResidualBank(torch.cat(parts_a), torch.cat(parts_b), torch.cat(part_labels), counts)


def _balanced_batch(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices: half abnormal, half normal (with replacement when a kind is short)."""
    picked = []
    for kind in (0, 1):
        pool = torch.nonzero(labels == kind)[:, 0]
        if len(pool):
            picked.append(pool[torch.randint(len(pool), (size // 2,), generator=generator)])
    return torch.cat(picked)


def train_projector(bank: ResidualBank, steps: int = 300, batch_size: int = 512, lr: float = 1e-3,
                    hidden: int = 256, out_dim: int = 128, skip: bool = True, temperature: float = 0.15,
                    radius: float = 1.0,
                    margin: float = 1.0, norm_weight: float = 1.0, seed: int = 0,
                    device: str | torch.device = "cpu",
                    log: Callable[[str], None] | None = None) -> tuple[ResidualProjector, dict[str, Any]]:
    """Adam on balanced batches of the bank; returns the projector (eval, cpu) and a training report."""
    if not (bank.labels == 1).any() or not (bank.labels == 0).any():
        raise ValueError("adaptor: the residual bank needs both normal and abnormal patches")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    projector = ResidualProjector(bank.view_a.shape[1], hidden, out_dim, skip).to(device)
    optimiser = torch.optim.Adam(projector.parameters(), lr=lr)
    started, history = time.perf_counter(), []
    for step in range(steps):
        chosen = _balanced_batch(bank.labels, batch_size, generator)
        view_a, view_b = bank.view_a[chosen].to(device), bank.view_b[chosen].to(device)
        losses = adaptor_loss(projector(view_a), projector(view_b), bank.labels[chosen].to(device),
                              temperature, radius, margin, norm_weight)
        optimiser.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimiser.step()
        if step == 0 or step == steps - 1 or (step + 1) % max(1, steps // 10) == 0:
            history.append({"step": step + 1, **{k: float(v.detach()) for k, v in losses.items()}})
            if log is not None:
                log(f"adaptor step {step + 1}/{steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items()
                                                                      if k != "step"))
    report = {"steps": steps, "seconds": round(time.perf_counter() - started, 2), "history": history,
              "patches": {"normal": int((bank.labels == 0).sum()), "abnormal": int((bank.labels == 1).sum())},
              "images": dict(bank.counts),
              "hyper": {"batch_size": batch_size, "lr": lr, "skip": skip, "temperature": temperature, "radius": radius,
                        "margin": margin, "norm_weight": norm_weight, "seed": seed}}
    return projector.cpu().eval(), report


def fit_adaptor(encoder: Any, pool: pd.DataFrame, references: pd.DataFrame, training: Any,
                recipe: SyntheticRecipe | None = None,
                log: Callable[[str], None] | None = None) -> tuple[ResidualProjector, dict[str, Any]]:
    """Collect images, build the residual bank and train: the whole ``feature_adaptor`` stage.

    ``training``: an ``AdaptorTrainingSettings``; ``encoder``: a plain (un-adapted) CNN few-shot encoder.
    """
    if getattr(encoder, "adaptor", None) is not None:
        raise ValueError("fit_adaptor needs the plain encoder (residuals of un-adapted features)")
    recipe = recipe or SyntheticRecipe(seed=training.seed)
    started = time.perf_counter()
    images = collect_training_images(pool, references, recipe, training.max_images_per_category,
                                     training.synthetic_per_image, log)
    reference_images = {
        str(category): batch_images([encoder.preprocess(read_rgb(p)) for p in rows["path"].astype(str)])
        for category, rows in references.groupby(references["category"].astype(str))}
    bank = residual_bank(encoder, images, reference_images, training.normal_cells_per_image, training.seed)
    projector, report = train_projector(
        bank, steps=training.steps, batch_size=training.batch_size, lr=training.lr, hidden=training.hidden,
        out_dim=training.out_dim, skip=training.skip, temperature=training.temperature, radius=training.radius,
        margin=training.margin, norm_weight=training.norm_weight, seed=training.seed, device=encoder.device,
        log=log)
    report["total_seconds"] = round(time.perf_counter() - started, 2)
    report["synthetic_recipe"] = recipe.as_dict()
    report["encoder_identity"] = encoder.identity.as_dict()
    return projector, report


# ---------------------------------------------------------------- checkpoints
def compatible_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The part of an encoder identity that decides its features (what an adaptor must match)."""
    return {key: identity.get(key, FEATURE_DEFAULTS.get(key)) for key in COMPATIBLE_KEYS}


def save_adaptor(layout: Any, name: str, projector: ResidualProjector, lineage: dict[str, Any]) -> str:
    """Write ``checkpoints/adaptor/<name>/<run_id>`` and move its latest.json; returns the run dir."""
    from agssp_pipeline.training import checkpoint as ckpt

    run_id = lineage.get("run_id") or ckpt.new_run_id()
    state = projector.state_dict()
    full = {**lineage, "kind": ADAPTOR_KIND, "name": name, "run_id": run_id, "status": "complete",
            "projector": projector.config, "weights_digest": ckpt.state_dict_digest(state)}
    target = ckpt.run_dir(layout, name, run_id, kind=ADAPTOR_KIND)
    ckpt.save_checkpoint(target, state, full)
    ckpt.write_latest_pointer(layout, name, run_id, kind=ADAPTOR_KIND)
    return target


def load_adaptor(path: str) -> tuple[ResidualProjector, dict[str, Any]]:
    """(projector in eval mode, lineage) of an adaptor checkpoint (run dir, its file, or <kind>/<name> dir)."""
    from agssp_pipeline.training import checkpoint as ckpt

    state, lineage = ckpt.load_checkpoint(path, float32=True)
    if lineage.get("kind") != ADAPTOR_KIND or "projector" not in lineage:
        raise ValueError(f"{path} is not a feature adaptor checkpoint (lineage kind {lineage.get('kind')!r})")
    projector = ResidualProjector(**lineage["projector"])
    projector.load_state_dict(state, strict=True)
    return projector.eval(), lineage


def adaptor_tag(lineage: dict[str, Any]) -> dict[str, Any]:
    """What of an adaptor enters the map-store version: its run and weights digest."""
    return {"name": lineage.get("name"), "run_id": lineage.get("run_id"), "weights_digest": lineage.get("weights_digest")}


def resolve_adaptor_setting(settings: Any, layout: Any) -> Any:
    """``kead.adaptor: latest`` -> the run dir of the last completed ``feature_adaptor`` run of the encoder.

    A path is returned unchanged; None (plain features) too. Raises FileNotFoundError with the asset to
    materialize when there is no run yet.
    """
    if settings.adaptor != "latest":
        return settings
    from agssp_pipeline.training import checkpoint as ckpt

    try:
        target = ckpt.latest_checkpoint_dir(layout, settings.encoder, kind=ADAPTOR_KIND)
    except FileNotFoundError:
        raise FileNotFoundError(f"kead.adaptor is 'latest' but no feature adaptor was trained for encoder "
                                f"'{settings.encoder}': materialize feature_adaptor first") from None
    return settings.model_copy(update={"adaptor": target})


def train_and_save_adaptor(config: Any, layout: Any, settings: Any,
                           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ``feature_adaptor`` stage: train on the pretraining-only sources, save with lineage, return a summary.

    Sources with role ``downstream`` or ``both`` never contribute (their images are evaluated later).
    References are chosen as ``anomaly_maps`` chooses them (``kead.k_shot``, ``kead.reference_strategy``).
    """
    from agssp_pipeline import artifact_io
    from agssp_pipeline.kead.encoders import build_encoder
    from agssp_pipeline.kead.references import select_references

    if settings.encoder != "cnn_fewshot":
        raise ValueError(f"feature_adaptor trains for the cnn_fewshot encoder; kead.encoder is '{settings.encoder}'")
    sources = [s.name for s in config.pretrain_sources()
               if not s.used_downstream and artifact_io.exists(layout.index(s.name))]
    if not sources:
        raise FileNotFoundError("feature_adaptor: no indexed pretraining-only source: materialize image_index first")
    frames = {name: artifact_io.read_parquet(layout.index(name)) for name in sources}
    pool = pd.concat(frames.values(), ignore_index=True).drop_duplicates("image_id")
    references = select_references(pool, k=max(1, settings.k_shot), strategy=settings.reference_strategy,
                                   explicit=settings.reference_images,
                                   categories=sorted(pool["category"].dropna().astype(str).unique()))
    encoder = build_encoder(settings.model_copy(update={"adaptor": None}))
    recipe = SyntheticRecipe(seed=settings.adaptor_training.seed)
    projector, report = fit_adaptor(encoder, pool, references, settings.adaptor_training, recipe, log)
    lineage = {
        **report,
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "device": str(encoder.device),
        "sources": {name: {"index_path": layout.index(name), "images": int(len(frame))}
                    for name, frame in frames.items()},
        "references": {c: sorted(r["image_id"].astype(str)) for c, r in references.groupby("category")},
        "settings": settings.adaptor_training.model_dump(),
        "inputs": [{"asset": "image_index", "partition": name, "uri": layout.index(name), "version": None}
                   for name in sources],
    }
    target = save_adaptor(layout, settings.encoder, projector, lineage)
    return {"run_dir": target, "sources": sources, "seconds": report["total_seconds"],
            "patches": report["patches"], "images": report["images"], "final": report["history"][-1]}
