"""Bootstrap intervals of mAP differences: the numpy mAP equals COCO's, and toy cases with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agssp_pipeline.eval.coco_map import evaluate_detections
from agssp_pipeline.eval.intervals import map_of, match_run, paired_difference

CLASSES = ["scratch", "dent"]


def _toy_set(n_images: int = 12, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    images = pd.DataFrame({"image_id": [f"i{k}" for k in range(n_images)], "width": 100, "height": 100})
    rows = []
    for image_id in images["image_id"]:
        for _ in range(rng.integers(1, 3)):
            x, y = rng.uniform(0, 60, 2)
            w, h = rng.uniform(10, 40, 2)
            rows.append((image_id, CLASSES[rng.integers(0, 2)], x, y, x + w, y + h))
    return images, pd.DataFrame(rows, columns=["image_id", "class_name", "x1", "y1", "x2", "y2"])


def _noisy_detections(gt: pd.DataFrame, seed: int, noise: float) -> pd.DataFrame:
    """GT boxes jittered by ``noise`` px, random scores, plus false positives and a few wrong classes."""
    rng = np.random.default_rng(seed)
    det = gt.copy()
    det[["x1", "y1", "x2", "y2"]] += rng.normal(0, noise, (len(det), 4))
    det["score"] = rng.uniform(0.2, 1.0, len(det))
    flip = rng.uniform(size=len(det)) < 0.15
    det.loc[flip, "class_name"] = det.loc[flip, "class_name"].map({"scratch": "dent", "dent": "scratch"})
    false = det.sample(frac=0.5, random_state=seed).copy()
    false[["x1", "y1"]] = rng.uniform(0, 50, (len(false), 2))
    false[["x2", "y2"]] = false[["x1", "y1"]].to_numpy() + 15
    false["score"] = rng.uniform(0.0, 0.8, len(false))
    return pd.concat([det, false], ignore_index=True)[["image_id", "class_name", "score", "x1", "y1", "x2", "y2"]]


def test_numpy_map_reproduces_faster_coco_eval():
    images, gt = _toy_set()
    det = _noisy_detections(gt, 1, noise=4.0)
    coco = evaluate_detections(images, gt, det, CLASSES)
    run = match_run(images["image_id"].tolist(), gt, det, CLASSES)
    assert 0.1 < coco.map50_95 < 0.9  # not a trivial case
    assert map_of(run, threshold_index=0) == pytest.approx(coco.map50, abs=1e-9)
    assert map_of(run) == pytest.approx(coco.map50_95, abs=1e-9)
    # an image drawn twice counts twice: same as evaluating a set that holds it twice
    weights = np.ones(len(images))
    weights[0] = 0
    weights[3] = 2
    twice = images.drop(index=0)
    dup = images.iloc[[3]].assign(image_id="copy")
    both = pd.concat([twice, dup], ignore_index=True)
    gt2 = pd.concat([gt[gt.image_id != "i0"], gt[gt.image_id == "i3"].assign(image_id="copy")], ignore_index=True)
    det2 = pd.concat([det[det.image_id != "i0"], det[det.image_id == "i3"].assign(image_id="copy")], ignore_index=True)
    expected = evaluate_detections(both, gt2, det2, CLASSES).map50_95
    assert map_of(run, weights) == pytest.approx(expected, abs=1e-9)


def test_paired_difference_known_answers():
    images, gt = _toy_set(10)
    ids = images["image_id"].tolist()
    perfect = gt.assign(score=1.0)
    nothing = perfect.iloc[:0]
    good = {s: match_run(ids, gt, perfect, CLASSES) for s in (0, 1)}
    empty = {s: match_run(ids, gt, nothing, CLASSES) for s in (0, 1)}
    interval = paired_difference(good, empty, replicates=50)
    assert (interval.mean, interval.low, interval.high) == (100.0, 100.0, 100.0) and interval.above_zero
    same = paired_difference(good, good, replicates=50)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.above_zero and not same.below_zero
    # seeds only differ: seed 0 is +100 points, seed 1 is 0; the mean is +50 and the interval spans both
    mixed = paired_difference({0: good[0], 1: empty[1]}, empty, replicates=400)
    assert mixed.mean == 50.0 and mixed.low == 0.0 and mixed.high == 100.0 and mixed.seeds == 2
    with pytest.raises(ValueError, match="no common seed"):
        paired_difference({3: good[0]}, empty)


def test_interval_narrows_with_more_images_and_covers_the_difference():
    widths = []
    for n in (10, 80):
        images, gt = _toy_set(n, seed=n)
        ids = images["image_id"].tolist()
        better = {s: match_run(ids, gt, _noisy_detections(gt, 10 + s, 2.0), CLASSES) for s in range(2)}
        worse = {s: match_run(ids, gt, _noisy_detections(gt, 20 + s, 9.0), CLASSES) for s in range(2)}
        interval = paired_difference(better, worse, threshold_index=slice(None), replicates=200)
        assert interval.low <= interval.mean <= interval.high
        widths.append(interval.high - interval.low)
        if n == 80:
            assert interval.above_zero, interval  # less jitter is better, and 80 images show it
    assert widths[1] < widths[0]
