"""Measured quality of pseudo boxes against ground truth (annotation boxes or pixel masks).

Three views, all in one long table (``evaluations/pseudo_box_quality_<source>.parquet``):
- ``boxes``: recall / precision / F1 at IoU 0.3 and 0.5, greedy matching by score (each ground-truth box
  matched at most once), for the pseudo boxes and for a chance baseline (the same number of boxes of the
  same sizes per image, placed uniformly at random) so that a figure can be read against luck;
- ``image``: the normal/defective split against ground truth (a defect = at least one GT box/mask pixel);
- ``mask``: dataset-level mask IoU (sum TP / sum (TP+FP+FN) over images) of the binarised maps against
  GT masks, for the adaptive T_c over a sweep of delta and for a grid of global fixed thresholds; the best
  fixed threshold is chosen with the ground truth (an oracle), so adaptive beating it is meaningful.
  ``mask_iou`` counts only images judged defective as predicted (what the pipeline emits);
  ``mask_iou_ungated`` binarises every image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from torchvision.ops import box_iou

from agssp_pipeline.boxes.settings import BoxesSettings
from agssp_pipeline.kead.maps import upsample_map
from agssp_pipeline.sources.regions import read_mask as read_binary_mask

COORDS = ["x1", "y1", "x2", "y2"]
IOU_THRESHOLDS = (0.3, 0.5)
QUALITY_COLUMNS = [
    "source",
    "view",
    "method",
    "iou_threshold",
    "delta",
    "threshold",
    "n_images",
    "n_pred",
    "n_gt",
    "tp",
    "fp",
    "fn",
    "recall",
    "precision",
    "f1",
    "mask_iou",
    "mask_iou_ungated",
    "balanced_accuracy",
    "auroc",
    "configured",
    "best",
]


def read_mask(path: str, height: int, width: int) -> np.ndarray:
    """Binary GT mask (> 127, the anti-aliasing convention of the public mask datasets) of the image size."""
    try:
        mask = read_binary_mask(str(path))
    except ValueError as error:
        raise ValueError(f"cannot read mask {path}: {error}") from None
    if mask.shape != (height, width):
        raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}")
    return mask.astype(bool)


def mask_boxes(mask: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """Bounding rectangles (K, 4) of a binary mask's connected components (pixel edges, like pseudo boxes)."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=connectivity)
    stats = stats[1:]
    left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    return np.stack(
        [left, top, left + stats[:, cv2.CC_STAT_WIDTH], top + stats[:, cv2.CC_STAT_HEIGHT]], axis=1
    ).astype(np.float32).reshape(n - 1, 4)


def ground_truth_boxes(index: pd.DataFrame, annotations: pd.DataFrame | None) -> pd.DataFrame:
    """GT boxes [image_id, x1..y2]: the annotation table where it has rows, else mask components."""
    if annotations is not None and len(annotations):
        return annotations[annotations["image_id"].isin(index["image_id"])][["image_id", *COORDS]].reset_index(
            drop=True
        )
    rows = []
    with_masks = index[index["mask_path"].notna()] if "mask_path" in index.columns else index.iloc[:0]
    for image_id, path, width, height in with_masks[["image_id", "mask_path", "width", "height"]].itertuples(
        index=False
    ):
        for box in mask_boxes(read_mask(path, int(height), int(width))):
            rows.append((image_id, *box.tolist()))
    return pd.DataFrame(rows, columns=["image_id", *COORDS])


def has_ground_truth(index: pd.DataFrame, annotations: pd.DataFrame | None) -> bool:
    has_masks = "mask_path" in index.columns and bool(index["mask_path"].notna().any())
    return has_masks or (annotations is not None and len(annotations) > 0)


@dataclass
class MatchCounts:
    n_pred: int
    n_gt: int
    tp: int

    @property
    def recall(self) -> float:
        return self.tp / self.n_gt if self.n_gt else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else float("nan")

    @property
    def f1(self) -> float:
        total = self.n_pred + self.n_gt
        return 2 * self.tp / total if total else float("nan")


def match_boxes(pred: pd.DataFrame, gt: pd.DataFrame, iou_threshold: float) -> MatchCounts:
    """Greedy matching by descending score: each prediction takes the best unmatched GT box above IoU."""
    tp = 0
    gt_groups = dict(tuple(gt.groupby("image_id", sort=False)))
    for image_id, boxes in pred.groupby("image_id", sort=False):
        truth = gt_groups.get(image_id)
        if truth is None:
            continue
        boxes = boxes.sort_values("score", ascending=False, kind="stable")
        ious = box_iou(
            torch.from_numpy(boxes[COORDS].to_numpy(np.float32, copy=True)),
            torch.from_numpy(truth[COORDS].to_numpy(np.float32, copy=True)),
        ).numpy()
        taken = np.zeros(ious.shape[1], bool)
        for row in ious:
            candidates = np.where(taken, -1.0, row)
            best = int(candidates.argmax())
            if candidates[best] >= iou_threshold:
                taken[best] = True
                tp += 1
    return MatchCounts(n_pred=len(pred), n_gt=len(gt), tp=tp)


def random_boxes_like(pred: pd.DataFrame, sizes: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Chance baseline: per image the same number of boxes with the same sizes, placed uniformly at random."""
    if pred.empty:
        return pred[["image_id", *COORDS, "score"]].copy()
    rng = np.random.default_rng(seed)
    dims = sizes.drop_duplicates("image_id").set_index("image_id").loc[pred["image_id"], ["width", "height"]]
    width, height = dims["width"].to_numpy(np.float64), dims["height"].to_numpy(np.float64)
    box_w = (pred["x2"] - pred["x1"]).to_numpy(np.float64)
    box_h = (pred["y2"] - pred["y1"]).to_numpy(np.float64)
    x1 = rng.random(len(pred)) * np.maximum(width - box_w, 0)
    y1 = rng.random(len(pred)) * np.maximum(height - box_h, 0)
    return pd.DataFrame(
        {
            "image_id": pred["image_id"].to_numpy(),
            "x1": x1,
            "y1": y1,
            "x2": x1 + box_w,
            "y2": y1 + box_h,
            "score": rng.random(len(pred)),
        }
    )


def box_quality_rows(
    pred: pd.DataFrame, gt: pd.DataFrame, sizes: pd.DataFrame, iou_thresholds: Sequence[float] = IOU_THRESHOLDS
) -> list[dict]:
    """Rows of the ``boxes`` view for the pseudo boxes and the random baseline on the same images."""
    images = set(sizes["image_id"])
    pred = pred[pred["image_id"].isin(images)]
    gt = gt[gt["image_id"].isin(images)]
    baseline = random_boxes_like(pred, sizes)
    rows = []
    for method, boxes in (("pseudo", pred), ("random", baseline)):
        for iou in iou_thresholds:
            counts = match_boxes(boxes, gt, iou)
            rows.append(
                {
                    "view": "boxes",
                    "method": method,
                    "iou_threshold": iou,
                    "n_images": len(images),
                    "n_pred": counts.n_pred,
                    "n_gt": counts.n_gt,
                    "tp": counts.tp,
                    "fp": counts.n_pred - counts.tp,
                    "fn": counts.n_gt - counts.tp,
                    "recall": counts.recall,
                    "precision": counts.precision,
                    "f1": counts.f1,
                }
            )
    return rows


def image_split_row(defective_gt: np.ndarray, judged: np.ndarray, scores: np.ndarray, method: str) -> dict:
    """The ``image`` view: how well the image-level split finds images that truly hold a defect."""
    truth = np.asarray(defective_gt, bool)
    judged = np.asarray(judged, bool)
    both_classes = 0 < truth.sum() < len(truth)
    return {
        "view": "image",
        "method": method,
        "n_images": len(truth),
        "n_pred": int(judged.sum()),
        "n_gt": int(truth.sum()),
        "tp": int((truth & judged).sum()),
        "fp": int((~truth & judged).sum()),
        "fn": int((truth & ~judged).sum()),
        "recall": float((truth & judged).sum() / truth.sum()) if truth.any() else float("nan"),
        "precision": float((truth & judged).sum() / judged.sum()) if judged.any() else float("nan"),
        "f1": float(f1_score(truth, judged, zero_division=0.0)),
        "balanced_accuracy": float(balanced_accuracy_score(truth, judged)) if both_classes else float("nan"),
        "auroc": float(roc_auc_score(truth, scores)) if both_classes else float("nan"),
    }


def mask_sweep_rows(
    maps: np.ndarray,
    masks: Sequence[np.ndarray],
    categories: np.ndarray,
    judged: np.ndarray,
    mean_max: dict[str, float],
    deltas: Sequence[float],
    fixed_thresholds: np.ndarray,
    configured_delta: float,
) -> list[dict]:
    """The ``mask`` view: IoU of binarised maps vs GT masks for every delta and every fixed threshold.

    Exact counts for all thresholds in one pass per image: ``searchsorted`` gives each pixel the number of
    (sorted) thresholds it reaches, a ``bincount`` of that turns into per-threshold positives.
    """
    deltas = sorted({round(float(d), 6) for d in [*deltas, configured_delta]})
    n_adaptive = len(deltas)
    fixed = np.asarray(fixed_thresholds, np.float64)
    counts = np.zeros((2, 3, n_adaptive + len(fixed)), np.int64)  # (gated/ungated, tp/fp/fn, threshold)
    for patch_map, mask, category, is_judged in zip(maps, masks, categories, judged, strict=True):
        up = upsample_map(patch_map, *mask.shape)
        thresholds = np.concatenate([mean_max[str(category)] - np.asarray(deltas), fixed])
        order = np.argsort(thresholds, kind="stable")
        sorted_thresholds = thresholds[order]
        reached = np.searchsorted(sorted_thresholds, up.astype(np.float64), side="right")
        n = len(thresholds)
        positives_sorted = np.cumsum(np.bincount(reached[mask], minlength=n + 1)[::-1])[::-1][1:]
        negatives_sorted = np.cumsum(np.bincount(reached[~mask], minlength=n + 1)[::-1])[::-1][1:]
        tp = np.empty(n, np.int64)
        fp = np.empty(n, np.int64)
        tp[order], fp[order] = positives_sorted, negatives_sorted
        fn = int(mask.sum()) - tp
        counts[1] += np.stack([tp, fp, fn])
        counts[0] += np.stack([tp, fp, fn]) if is_judged else np.stack([0 * tp, 0 * fp, tp + fn])

    def iou(view: int, j: int) -> float:
        tp, fp, fn = counts[view, :, j]
        return float(tp / (tp + fp + fn)) if tp + fp + fn else float("nan")

    rows = []
    for j in range(n_adaptive + len(fixed)):
        adaptive = j < n_adaptive
        tp, fp, fn = (int(v) for v in counts[0, :, j])
        rows.append(
            {
                "view": "mask",
                "method": "adaptive" if adaptive else "fixed",
                "delta": deltas[j] if adaptive else float("nan"),
                "threshold": float("nan") if adaptive else float(fixed[j - n_adaptive]),
                "n_images": len(masks),
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "mask_iou": iou(0, j),
                "mask_iou_ungated": iou(1, j),
                "configured": adaptive and deltas[j] == round(configured_delta, 6),
            }
        )
    frame = pd.DataFrame(rows)
    for method in ("adaptive", "fixed"):
        part = frame[frame["method"] == method]["mask_iou"]
        if part.notna().any():
            frame.loc[part.idxmax(), "best"] = True
    frame["best"] = frame.get("best", pd.Series(False, index=frame.index)).fillna(False).astype(bool)
    return frame.to_dict("records")


def evaluate_source(
    source: str,
    image_ids: np.ndarray,
    maps: np.ndarray,
    index: pd.DataFrame,
    annotations: pd.DataFrame | None,
    pseudo_table: pd.DataFrame,
    thresholds: pd.DataFrame,
    settings: BoxesSettings,
) -> pd.DataFrame:
    """The quality table of one source (``QUALITY_COLUMNS``); raises when the source has no ground truth."""
    if not has_ground_truth(index, annotations):
        raise ValueError(f"source {source} has neither annotation boxes nor masks to evaluate against")
    image_ids = np.asarray(image_ids, dtype=str)
    images = index.drop_duplicates("image_id").set_index("image_id").loc[image_ids].reset_index()
    per_image = pseudo_table.drop_duplicates("image_id").set_index("image_id").loc[image_ids]
    judged = per_image["judged_defective"].to_numpy(bool)
    gt = ground_truth_boxes(images, annotations)
    defective_gt = np.isin(image_ids, gt["image_id"].unique())
    rows = box_quality_rows(
        pseudo_table[pseudo_table["box_index"].notna()], gt, images[["image_id", "width", "height"]]
    )
    rows.append(
        image_split_row(defective_gt, judged, per_image["image_score"].to_numpy(np.float64),
                       settings.rules().image_split)
    )
    rows[-1]["configured"] = True
    if "mask_path" in images.columns and images["mask_path"].notna().any():
        has_mask = images["mask_path"].notna().to_numpy()
        masks = [
            read_mask(path, int(h), int(w))
            for path, h, w in images.loc[has_mask, ["mask_path", "height", "width"]].itertuples(index=False)
        ]
        values = np.asarray(maps[has_mask], np.float32)
        grid = np.linspace(float(values.min()), float(values.max()), settings.quality_fixed_grid)
        mean_max = thresholds.set_index("category")["mean_max"].astype(float).to_dict()
        rows += mask_sweep_rows(
            values,
            masks,
            images.loc[has_mask, "category"].astype(str).to_numpy(),
            judged[has_mask],
            mean_max,
            settings.quality_deltas,
            grid,
            settings.delta,
        )
    table = pd.DataFrame(rows).reindex(columns=QUALITY_COLUMNS)
    table["source"] = source
    table["configured"] = table["configured"].astype("boolean").fillna(False).astype(bool)
    table["best"] = table["best"].astype("boolean").fillna(False).astype(bool)
    return table
