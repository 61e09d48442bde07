"""Paired bootstrap intervals of mAP differences, over training seeds and validation images (pure numpy).

One finetune run per variant and seed is noisy (the issue's NEU-DET deltas changed sign between runs), so a
difference between two variants is only worth stating with an interval. mAP does not decompose per image, so
the bootstrap recomputes it: detections are matched to ground truth once per run (:func:`match_run`, COCO's
greedy rule: by descending score, each detection takes the unmatched ground-truth box of the same class with
the highest IoU at or above the threshold), and a resample of the validation images is a vector of integer
weights applied to those matches (an image drawn twice counts its detections and its ground truth twice).
AP is COCO's 101-point interpolated precision, so :func:`map_of` on unit weights reproduces the COCO figure
(tests compare it with faster-coco-eval).

The interval of ``variant - baseline`` resamples seeds and images jointly and pairs them: a replicate draws
seeds with replacement and one set of image weights, and takes the mean over the drawn seeds of the
difference on the same images. Percentile interval, 95 % by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass
class ClassMatches:
    """One class of one run: detections sorted by score, whether each is a true positive per IoU threshold."""

    image: np.ndarray  # (n_det,) image index of each detection
    tp: np.ndarray  # (n_det, n_thresholds) bool
    gt_per_image: np.ndarray  # (n_images,) ground-truth boxes of this class per image


@dataclass
class RunMatches:
    """All classes of one run (one variant, one seed) on one validation set."""

    classes: dict[str, ClassMatches]
    n_images: int


def _iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of ``box`` (4,) with each row of ``boxes`` (n, 4), xyxy pixels (COCO: no +1)."""
    x1, y1 = np.maximum(boxes[:, 0], box[0]), np.maximum(boxes[:, 1], box[1])
    x2, y2 = np.minimum(boxes[:, 2], box[2]), np.minimum(boxes[:, 3], box[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    union = area(boxes) + area(box) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _match_image(gt: np.ndarray, det: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """TP flags (n_det, n_thr) of one image and class; ``det`` already sorted by descending score."""
    tp = np.zeros((len(det), len(thresholds)), dtype=bool)
    if len(gt) == 0 or len(det) == 0:
        return tp
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(len(gt), dtype=bool)
        for d, box in enumerate(det):
            ious = np.where(taken, -1.0, _iou(gt, box))
            best = int(np.argmax(ious))
            if ious[best] >= threshold:
                taken[best] = True
                tp[d, t] = True
    return tp


def match_run(images: Sequence[str], ground_truth: pd.DataFrame, detections: pd.DataFrame,
              class_names: Sequence[str], thresholds: np.ndarray = IOU_THRESHOLDS) -> RunMatches:
    """Match one run's detections (image_id, class_name, score, x1..y2) to the ground truth of ``images``."""
    index = {image_id: n for n, image_id in enumerate(images)}
    unknown = (set(ground_truth["image_id"]) | set(detections["image_id"])) - set(index)
    if unknown:
        raise ValueError(f"boxes of images outside the evaluation set, e.g. {sorted(unknown)[:3]}")
    coords = ["x1", "y1", "x2", "y2"]
    classes = {}
    for name in class_names:
        gt = ground_truth[ground_truth["class_name"] == name]
        det = detections[detections["class_name"] == name]
        det = det.iloc[np.argsort(-det["score"].to_numpy(float), kind="mergesort")]
        gt_by_image = {k: g[coords].to_numpy(float) for k, g in gt.groupby("image_id")}
        det_image = det["image_id"].map(index).to_numpy(int)
        tp = np.zeros((len(det), len(thresholds)), dtype=bool)
        det_boxes = det[coords].to_numpy(float)
        for image_id, rows in pd.Series(np.arange(len(det))).groupby(det["image_id"].to_numpy()):
            positions = rows.to_numpy()
            tp[positions] = _match_image(gt_by_image.get(image_id, np.zeros((0, 4))), det_boxes[positions],
                                         thresholds)
        counts = np.zeros(len(images), dtype=np.int64)
        for image_id, n in gt["image_id"].value_counts().items():
            counts[index[image_id]] = n
        classes[name] = ClassMatches(det_image, tp, counts)
    return RunMatches(classes, len(images))


def _interpolated_ap(tp_weights: np.ndarray, fp_weights: np.ndarray, positives: float) -> float:
    """COCO 101-point AP from per-detection TP/FP weights in score order."""
    if positives <= 0:
        return np.nan
    if len(tp_weights) == 0:
        return 0.0
    tps, fps = np.cumsum(tp_weights), np.cumsum(fp_weights)
    recall = tps / positives
    precision = tps / np.maximum(tps + fps, np.finfo(float).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    positions = np.searchsorted(recall, RECALL_POINTS, side="left")
    values = np.where(positions < len(precision), precision[np.minimum(positions, len(precision) - 1)], 0.0)
    return float(values.mean())


def map_of(run: RunMatches, weights: np.ndarray | None = None, threshold_index: slice | int = slice(None)) -> float:
    """mAP (fraction) of a run with per-image ``weights`` (None: each image once), averaged over the chosen
    IoU thresholds and over classes with ground truth (COCO's rule)."""
    w = np.ones(run.n_images) if weights is None else np.asarray(weights, dtype=float)
    per_class = []
    for matches in run.classes.values():
        positives = float(matches.gt_per_image @ w)
        det_w = w[matches.image]
        tp = matches.tp[:, threshold_index]
        tp = tp[:, None] if tp.ndim == 1 else tp
        aps = [_interpolated_ap(det_w * tp[:, t], det_w * ~tp[:, t], positives) for t in range(tp.shape[1])]
        per_class.append(np.nan if positives <= 0 else float(np.mean(aps)))
    values = [v for v in per_class if not np.isnan(v)]
    return float(np.mean(values)) if values else np.nan


@dataclass(frozen=True)
class Interval:
    """A paired difference (percentage points) and its bootstrap interval."""

    mean: float
    low: float
    high: float
    seeds: int
    replicates: int

    @property
    def above_zero(self) -> bool:
        return bool(self.low > 0)

    @property
    def below_zero(self) -> bool:
        return bool(self.high < 0)


def paired_difference(variant: Mapping[int, RunMatches], baseline: Mapping[int, RunMatches],
                      threshold_index: slice | int = slice(None), replicates: int = 1000, level: float = 0.95,
                      seed: int = 0) -> Interval:
    """``variant - baseline`` mAP in points over the seeds both have, with a paired bootstrap interval."""
    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        raise ValueError(f"no common seed between the runs (variant: {sorted(variant)}, baseline: {sorted(baseline)})")
    n_images = variant[seeds[0]].n_images
    if any(r.n_images != n_images for r in [*variant.values(), *baseline.values()]):
        raise ValueError("paired runs must be evaluated on the same validation images")
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=replicates)
    # difference per seed (rows) and image resample (columns), then a seed resample per replicate
    diffs = np.array([[map_of(variant[s], w, threshold_index) - map_of(baseline[s], w, threshold_index)
                       for w in weights] for s in seeds])
    picks = rng.integers(0, len(seeds), size=(replicates, len(seeds)))
    replicate = diffs[picks, np.arange(replicates)[:, None]].mean(axis=1)
    replicate = replicate[~np.isnan(replicate)]
    point = float(np.mean([map_of(variant[s], None, threshold_index) - map_of(baseline[s], None, threshold_index)
                           for s in seeds]))
    tail = (1.0 - level) / 2
    low, high = (np.quantile(replicate, [tail, 1 - tail]) if len(replicate) else (np.nan, np.nan))
    return Interval(100 * point, 100 * float(low), 100 * float(high), len(seeds), replicates)
