"""Does a backbone look at defects? Pixel AUROC of its distilled stages' attention against ground truth.

AGBP claims (the paper's Fig. 4) that distillation moves a backbone's attention onto defects. This probe
measures it in seconds, beside the finetune: for each start of a backbone (``scratch``: random init with a
fixed seed; ``imagenet``: the offline ImageNet weights where the backbone has them; every backbone
checkpoint run by its run id) and each labelled source (masks, or box interiors from the annotations):

- images: at most ``max_images`` per source with at least one defect pixel, in image-id order, resized to
  ``image_size`` (``backbone.image_size``) and normalised as AGBP feeds them;
- attention: the same map AGBP distils (``losses.attention_map``: sum over channels of F^2) of each
  distilled stage, upsampled to the image (bilinear), min-max normalised per image, averaged over stages;
- score: AUROC of that map against the defect pixels (at ``image_size``), all images' pixels pooled.

An image that cannot be read, or whose mask cannot be decoded, is skipped and counted (``images_skipped``).
A start that cannot exist (no ImageNet weights offline) keeps a row that says so (``note``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from agssp_pipeline import artifact_io
from agssp_pipeline.kead.evaluation import BOX_COLUMNS, box_mask, has_boxes, has_masks
from agssp_pipeline.records import Input, Record, plain
from agssp_pipeline.sources.decode import read_rgb
from agssp_pipeline.sources.regions import read_mask
from agssp_pipeline.training import checkpoint as ckpt
from agssp_pipeline.training.backbones import StagedBackbone, backbone_spec, build_backbone
from agssp_pipeline.training.losses import attention_map

KIND = "attention"
ATTENTION_COLUMNS = ["source", "start", "backbone", "run_id", "distill_weight", "stages", "image_size",
                     "pixel_auroc", "images_used", "images_skipped", "n_pixels", "ground_truth",
                     "weights_digest", "checkpoint", "note", "evaluated_at"]
_EPS = 1e-12


@dataclass
class ProbeImages:
    """The labelled images of one source, ready for any backbone: (N, 3, S, S) RGB in [0, 1], (N, S, S) masks."""

    source: str
    images: torch.Tensor
    masks: np.ndarray
    ground_truth: str  # "masks", "boxes" or "masks+boxes"
    skipped: int
    image_ids: tuple[str, ...] = ()  # of ``images``, in order (to fetch anything else keyed by image)


@dataclass
class Start:
    """One set of weights to probe: a backbone and where its weights come from."""

    start: str  # scratch, imagenet, or a checkpoint run id
    backbone: StagedBackbone | None  # None: not applicable (``note`` says why)
    stages: tuple[int, ...]
    run_id: str = ""
    distill_weight: float = float("nan")
    weights_digest: str = ""
    checkpoint: str = ""  # canonical run dir of a checkpoint start
    note: str = ""


def stage_attention(features: Sequence[torch.Tensor], stages: Sequence[int], height: int, width: int) -> torch.Tensor:
    """(B, H, W) in [0, 1]: AGBP's attention of each stage, upsampled, min-max normalised per image, averaged."""
    return torch.stack([upsampled_minmax(attention_map(features[i]), height, width) for i in stages]).mean(dim=0)


def upsampled_minmax(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h, w) -> (B, height, width): bilinear upsampling, then min-max normalised per image (the probe's scale)."""
    up = F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    low = up.flatten(1).min(dim=1).values[:, None, None]
    high = up.flatten(1).max(dim=1).values[:, None, None]
    return (up - low) / (high - low).clamp_min(_EPS)


def _ground_truth(row: dict, boxes: dict[str, np.ndarray], height: int, width: int) -> tuple[np.ndarray | None, str]:
    mask_path = row.get("mask_path")
    if isinstance(mask_path, str) and mask_path:
        # ValueError when unreadable: the caller skips the image; any size, as both are resized to the probe's
        return read_mask(mask_path).astype(bool), "masks"
    if str(row["image_id"]) in boxes:
        return box_mask(boxes[str(row["image_id"])], height, width), "boxes"
    return None, ""


def load_probe_images(source: str, index: pd.DataFrame, annotations: pd.DataFrame | None, image_size: int,
                      max_images: int = 64) -> ProbeImages | None:
    """The first ``max_images`` images (by image id) with defect pixels; None when the source has none."""
    if not has_masks(index) and not has_boxes(annotations):
        return None
    boxes = ({str(k): g[BOX_COLUMNS].to_numpy(np.float64) for k, g in annotations.groupby("image_id")}
             if has_boxes(annotations) else {})
    rows = index.drop_duplicates("image_id").sort_values("image_id", kind="stable")
    if "duplicate_of" in rows:
        rows = rows[rows["duplicate_of"].isna()]
    images, masks, ids, truths, skipped = [], [], [], set(), 0
    size = (image_size, image_size)
    for row in rows.to_dict("records"):
        if len(images) >= max_images:
            break
        if not (isinstance(row.get("mask_path"), str) or str(row["image_id"]) in boxes):
            continue
        try:
            rgb = read_rgb(str(row["path"]))
            mask, truth = _ground_truth(row, boxes, *rgb.shape[:2])
        except (OSError, ValueError):
            skipped += 1
            continue
        if mask is None or not mask.any():
            continue
        images.append(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))
        masks.append(cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool))
        ids.append(str(row["image_id"]))
        truths.add(truth)
    if not images:
        return ProbeImages(source, torch.zeros(0, 3, image_size, image_size), np.zeros((0, *size), bool), "", skipped)
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return ProbeImages(source, tensor, np.stack(masks), "+".join(sorted(truths)), skipped, tuple(ids))


@torch.no_grad()
def attention_maps(backbone: StagedBackbone, images: torch.Tensor, stages: Sequence[int],
                   mean: Sequence[float], std: Sequence[float], batch_size: int = 16) -> np.ndarray:
    """(N, S, S) attention of ``images`` ((N, 3, S, S) in [0, 1]), normalised with ``mean``/``std`` first."""
    backbone.eval()
    first = next(iter(backbone.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(images), batch_size):
        batch = ((images[start:start + batch_size] - mean_t) / std_t).to(device)
        features = backbone.forward_stages(batch)
        out.append(stage_attention(features, stages, batch.shape[-2], batch.shape[-1]).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, *images.shape[-2:]), np.float32)


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """AUROC of the pooled pixels; NaN when only one class is present."""
    labels = np.asarray(masks, dtype=bool).ravel()
    if labels.size == 0 or labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(maps, dtype=np.float64).ravel()))


def probe_start(start: Start, data: ProbeImages, backbone_name: str, image_size: int) -> dict:
    """One output row: the AUROC of ``start``'s attention on ``data``."""
    row = {"source": data.source, "start": start.start, "backbone": backbone_name, "run_id": start.run_id,
           "distill_weight": start.distill_weight, "stages": ",".join(map(str, start.stages)),
           "image_size": image_size, "pixel_auroc": float("nan"), "images_used": 0,
           "images_skipped": data.skipped, "n_pixels": 0, "ground_truth": data.ground_truth,
           "weights_digest": start.weights_digest, "checkpoint": start.checkpoint, "note": start.note}
    if start.backbone is None or len(data.images) == 0:
        row["note"] = start.note or "no image with defect pixels could be read"
        return row
    spec = backbone_spec(backbone_name)
    maps = attention_maps(start.backbone, data.images, start.stages, spec.input_mean, spec.input_std)
    row.update(pixel_auroc=pixel_auroc(maps, data.masks), images_used=len(data.images),
               n_pixels=int(data.masks.size))
    return row


def backbone_starts(layout, backbone_name: str, image_size: int, stages: Sequence[int] | None = None,
                    seed: int = 0) -> Iterable[Start]:
    """scratch (seeded), imagenet (or a not-applicable row), then every completed checkpoint run, oldest first."""
    spec = backbone_spec(backbone_name)
    default_stages = tuple(stages) if stages is not None else spec.default_distill_stages()
    torch.manual_seed(seed)
    yield Start("scratch", build_backbone(backbone_name, image_size=image_size, pretrained=False).backbone,
                default_stages, note=f"random init, seed {seed}")
    if spec.imagenet:
        built = build_backbone(backbone_name, image_size=image_size, pretrained=True).backbone
        yield Start("imagenet", built, default_stages, note=built.init)
    else:
        yield Start("imagenet", None, default_stages, note="not applicable: no offline ImageNet weights")
    for run_id, lineage in ckpt.list_runs(layout, backbone_name):
        if lineage.get("status", "complete") != "complete":
            continue
        run = ckpt.run_dir(layout, backbone_name, run_id)
        state, lineage = ckpt.load_checkpoint(run, float32=True)
        model = build_backbone(backbone_name, image_size=int(lineage.get("image_size") or image_size),
                               pretrained=False).backbone
        try:  # strict: weights that do not fit this backbone are an error naming the run, not a silent re-init
            model.native.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"checkpoint {run} does not fit backbone '{backbone_name}': {error}") from None
        run_stages = tuple((lineage.get("resolved") or {}).get("distill_stages") or default_stages)
        weight = lineage.get("distill_weight")
        yield Start(run_id, model, run_stages, run_id=run_id,
                    distill_weight=float(weight) if weight is not None else float("nan"),
                    # the digest every consumer of a backbone run records (the detector-keyed, input-folded
                    # tensors), so lineage compares like with like
                    weights_digest=str(ckpt.backbone_digest(run) or ckpt.state_dict_digest(state)),
                    checkpoint=artifact_io.canonical(run))


def evaluate_attention(layout, backbone_name: str, sources: Sequence[str], image_size: int,
                       stages: Sequence[int] | None = None, max_images: int = 64, seed: int = 0) -> pd.DataFrame:
    """The probe's table for one backbone over the labelled ``sources`` (those without labels are left out)."""
    from agssp_pipeline.boxes.stage import read_annotations, read_index

    data = []
    for source in sources:
        if not artifact_io.exists(layout.index(source)):
            continue
        loaded = load_probe_images(source, read_index(layout, source), read_annotations(layout, source),
                                   image_size, max_images)
        if loaded is not None:
            data.append(loaded)
    rows = [probe_start(start, probe, backbone_name, image_size)
            for start in backbone_starts(layout, backbone_name, image_size, stages, seed) for probe in data]
    stamp = pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")
    return pd.DataFrame(rows, columns=ATTENTION_COLUMNS[:-1]).assign(evaluated_at=stamp)[ATTENTION_COLUMNS]


def write_attention_evaluation(frame: pd.DataFrame, layout, backbone_name: str) -> str:
    """The one writer of ``evaluations/attention/<backbone>.parquet`` (replaced whole: every start is re-probed)."""
    uri = layout.evaluations(KIND, backbone_name)
    artifact_io.write_parquet(uri, frame[ATTENTION_COLUMNS].reset_index(drop=True))
    return uri


def attention_record(uri: str) -> Record:
    """What an attention table measured (AUROC per source and start) and the checkpoints it probed."""
    table = artifact_io.read_parquet(uri)
    backbone = artifact_io.name(uri).removesuffix(".parquet")
    record = Record(f"attention evaluation {backbone}", label=f"attention evaluation {backbone}",
                    partition=backbone)
    record.fields["pixel AUROC"] = {f"{r['source']}/{r['start']}": plain(r["pixel_auroc"])
                                    for r in table.to_dict("records") if not pd.isna(r["pixel_auroc"])}
    record.fields["evaluated_at"] = str(table["evaluated_at"].iloc[0]) if len(table) else None
    record.inputs = [Input("index", str(source)) for source in sorted(set(table["source"]))]
    for row in table[table["run_id"] != ""].drop_duplicates("run_id").to_dict("records"):
        record.inputs.append(Input(ckpt.BACKBONE, str(row["checkpoint"]), str(row["checkpoint"]),
                                   row["weights_digest"] or None))
    return record


def markdown_table(frame: pd.DataFrame) -> str:
    """One line per (source, start): AUROC, images, stages; what the asset shows."""
    lines = ["| source | start | distill weight | stages | pixel AUROC | images | ground truth | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in frame.to_dict("records"):
        auroc = "-" if pd.isna(r["pixel_auroc"]) else f"{r['pixel_auroc']:.3f}"
        weight = "-" if pd.isna(r["distill_weight"]) else f"{r['distill_weight']:.3g}"
        lines.append(f"| {r['source']} | {r['start']} | {weight} | {r['stages']} | {auroc} | {r['images_used']} "
                     f"| {r['ground_truth'] or '-'} | {r['note'] or '-'} |")
    return "\n".join(lines)


def summary_json(frame: pd.DataFrame) -> str:
    """``{source: {start: auroc}}`` for metadata and scripts."""
    out: dict[str, dict[str, float | None]] = {}
    for r in frame.to_dict("records"):
        out.setdefault(str(r["source"]), {})[str(r["start"])] = (
            None if pd.isna(r["pixel_auroc"]) else round(float(r["pixel_auroc"]), 4))
    return json.dumps(out, sort_keys=True)
