"""The COCO evaluator: exact agreement with pycocotools and a hand-computed AP."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from agssp_pipeline.eval.coco_map import evaluate_detections

CLASSES = ["crack", "hole", "stain"]


def _images(n: int) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"img{i:02d}" for i in range(n)], "width": 100, "height": 80})


def test_hand_computed_average_precision():
    """2 GT boxes; ranked detections TP (0.9), FP (0.8), TP (0.7): AP = (51*1 + 50*2/3) / 101 at every IoU."""
    images = _images(2)
    gt = pd.DataFrame({"image_id": ["img00", "img01"], "class_name": ["crack", "crack"],
                       "x1": [10.0, 20.0], "y1": [10.0, 20.0], "x2": [40.0, 60.0], "y2": [30.0, 50.0]})
    det = pd.DataFrame({"image_id": ["img00", "img00", "img01"], "class_name": ["crack"] * 3,
                        "score": [0.9, 0.8, 0.7], "x1": [10.0, 60.0, 20.0], "y1": [10.0, 50.0, 20.0],
                        "x2": [40.0, 90.0, 60.0], "y2": [30.0, 70.0, 50.0]})
    expected = (51 + 50 * 2 / 3) / 101
    for backend in ("faster_coco_eval", "pycocotools"):
        metrics = evaluate_detections(images, gt, det, ["crack"], backend=backend)
        assert metrics.map50 == pytest.approx(expected, abs=1e-12)
        assert metrics.map50_95 == pytest.approx(expected, abs=1e-12)
        assert metrics.per_class_ap50["crack"] == pytest.approx(expected, abs=1e-12)


def _random_case(seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """GT boxes and jittered / spurious detections of varying quality (a realistic mix of IoUs)."""
    rng = np.random.default_rng(seed)
    images = _images(12)
    gt_rows, det_rows = [], []
    for image_id in images["image_id"]:
        for _ in range(rng.integers(0, 4)):
            x1, y1 = rng.uniform(0, 60), rng.uniform(0, 45)
            w, h = rng.uniform(5, 40), rng.uniform(5, 35)
            name = CLASSES[rng.integers(0, 2)]  # "stain" never occurs in GT: its AP must be NaN
            gt_rows.append((image_id, name, x1, y1, x1 + w, y1 + h))
            if rng.random() < 0.8:
                jitter = rng.normal(0, 3, 4)
                det_name = name if rng.random() < 0.85 else CLASSES[rng.integers(0, 3)]
                det_rows.append((image_id, det_name, float(rng.random()), x1 + jitter[0], y1 + jitter[1],
                                 x1 + w + jitter[2], y1 + h + jitter[3]))
        for _ in range(rng.integers(0, 3)):  # false positives
            x1, y1 = rng.uniform(0, 70), rng.uniform(0, 55)
            det_rows.append((image_id, CLASSES[rng.integers(0, 3)], float(rng.random() * 0.6), x1, y1,
                             x1 + rng.uniform(4, 25), y1 + rng.uniform(4, 20)))
    gt = pd.DataFrame(gt_rows, columns=["image_id", "class_name", "x1", "y1", "x2", "y2"])
    det = pd.DataFrame(det_rows, columns=["image_id", "class_name", "score", "x1", "y1", "x2", "y2"])
    return images, gt, det


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_coco_eval_equals_pycocotools(seed):
    images, gt, det = _random_case(seed)
    fast = evaluate_detections(images, gt, det, CLASSES, backend="faster_coco_eval")
    reference = evaluate_detections(images, gt, det, CLASSES, backend="pycocotools")
    assert 0.05 < fast.map50 < 1.0  # a non-trivial case, not all zeros or all ones
    assert fast.map50 == reference.map50
    assert fast.map50_95 == reference.map50_95
    assert np.allclose(fast.stats, reference.stats, atol=1e-12, rtol=0, equal_nan=True)  # recall stats: last bit
    for name in CLASSES[:2]:  # per-class curves: the C++ port sums in another order (last-bit differences)
        assert fast.per_class_ap50_95[name] == pytest.approx(reference.per_class_ap50_95[name], abs=1e-12)
        assert fast.per_class_ap50[name] == pytest.approx(reference.per_class_ap50[name], abs=1e-12)
    assert math.isnan(fast.per_class_ap50_95["stain"])
    # mAP is the mean of the per-class APs over classes with ground truth (COCO's definition)
    assert fast.map50_95 == pytest.approx(np.nanmean(list(fast.per_class_ap50_95.values())), abs=1e-12)


def test_no_detections_scores_zero_and_bad_input_is_named():
    images, gt, det = _random_case(0)
    empty = det.iloc[0:0]
    metrics = evaluate_detections(images, gt, empty, CLASSES)
    assert metrics.map50 == 0.0 and metrics.num_detections == 0
    with pytest.raises(ValueError, match="not in"):
        evaluate_detections(images, gt.assign(class_name="rust"), det, CLASSES)
    with pytest.raises(ValueError, match="outside the evaluation set"):
        evaluate_detections(images.iloc[:1], gt[gt.image_id == "img00"], det, CLASSES)
    with pytest.raises(ValueError, match="unknown COCO backend"):
        evaluate_detections(images, gt, det, CLASSES, backend="nope")


def test_written_coco_files_rescore_to_the_same_map(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from agssp_pipeline.eval.coco_map import write_coco_files

    images, gt, det = _random_case(1)
    gt_path, results_path = write_coco_files(images, gt, det, CLASSES, str(tmp_path))
    coco = COCO(gt_path)
    evaluator = COCOeval(coco, coco.loadRes(results_path), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == evaluate_detections(images, gt, det, CLASSES, backend="pycocotools").map50_95
