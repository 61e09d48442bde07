"""COCO-standard box mAP from pipeline tables (index annotations and detection rows).

Why not ultralytics' own numbers alone: its validator interpolates precision with 101 points on its own matching
code and letterboxed images; papers (and the AGSSP Table 2) report COCO mAP. We compute the COCO figure with
faster-coco-eval (a drop-in C++ port of pycocotools, much faster) and keep pycocotools as a selectable backend, so
both can be cross-checked (tests/test_coco_eval.py asserts they agree exactly).

Input tables (pandas):
- images: image_id (str), width, height (pixels)
- ground truth: image_id, class_name, x1, y1, x2, y2 (pixels, the index annotation layout)
- detections: image_id, class_name, score, x1, y1, x2, y2
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

GT_COLUMNS = ("image_id", "class_name", "x1", "y1", "x2", "y2")
DETECTION_COLUMNS = ("image_id", "class_name", "score", "x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class CocoMetrics:
    """Box metrics on one evaluation set; per-class APs are NaN for classes without ground truth."""

    map50: float
    map50_95: float
    per_class_ap50: dict[str, float] = field(default_factory=dict)
    per_class_ap50_95: dict[str, float] = field(default_factory=dict)
    stats: tuple[float, ...] = ()  # the 12 COCO summary numbers, in COCOeval.stats order
    num_images: int = 0
    num_ground_truth: int = 0
    num_detections: int = 0
    backend: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "map50": self.map50,
            "map50_95": self.map50_95,
            "per_class_ap50": dict(self.per_class_ap50),
            "per_class_ap50_95": dict(self.per_class_ap50_95),
            "num_images": self.num_images,
            "num_ground_truth": self.num_ground_truth,
            "num_detections": self.num_detections,
            "backend": self.backend,
        }


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} table lacks columns {missing} (has {list(frame.columns)})")


def _xyxy_to_xywh(frame: pd.DataFrame) -> np.ndarray:
    x1, y1 = frame["x1"].to_numpy(float), frame["y1"].to_numpy(float)
    w = frame["x2"].to_numpy(float) - x1
    h = frame["y2"].to_numpy(float) - y1
    return np.stack([x1, y1, w, h], axis=1)


def build_coco_ground_truth(
    images: pd.DataFrame, ground_truth: pd.DataFrame, class_names: Sequence[str]
) -> dict[str, Any]:
    """COCO annotation dict; image ids become 1..N in the order of ``images``, categories 1..K."""
    _require_columns(images, ("image_id", "width", "height"), "images")
    _require_columns(ground_truth, GT_COLUMNS, "ground truth")
    if images["image_id"].duplicated().any():
        raise ValueError("images table has duplicate image_id values")
    image_numbers = {image_id: n for n, image_id in enumerate(images["image_id"], start=1)}
    category_ids = {name: n for n, name in enumerate(class_names, start=1)}
    unknown_images = set(ground_truth["image_id"]) - set(image_numbers)
    if unknown_images:
        raise ValueError(f"{len(unknown_images)} ground-truth rows name images not in the evaluation set, "
                         f"e.g. {sorted(unknown_images)[:3]}")
    unknown_classes = set(ground_truth["class_name"]) - set(category_ids)
    if unknown_classes:
        raise ValueError(f"ground truth has classes {sorted(unknown_classes)} not in {list(class_names)}")
    boxes = _xyxy_to_xywh(ground_truth)
    if (boxes[:, 2] <= 0).any() or (boxes[:, 3] <= 0).any():
        raise ValueError("ground truth has boxes with non-positive width or height")
    annotations = [
        {
            "id": n,
            "image_id": image_numbers[image_id],
            "category_id": category_ids[class_name],
            "bbox": [float(v) for v in box],
            "area": float(box[2] * box[3]),
            "iscrowd": 0,
        }
        for n, (image_id, class_name, box) in enumerate(
            zip(ground_truth["image_id"], ground_truth["class_name"], boxes, strict=True), start=1
        )
    ]
    return {
        "info": {"description": "agssp evaluation set"},
        "licenses": [],
        "images": [
            {"id": image_numbers[row.image_id], "width": int(row.width), "height": int(row.height),
             "file_name": str(row.image_id)}
            for row in images.itertuples(index=False)
        ],
        "categories": [{"id": cid, "name": name, "supercategory": "defect"} for name, cid in category_ids.items()],
        "annotations": annotations,
    }


def detections_to_coco_results(detections: pd.DataFrame, coco_gt: dict[str, Any]) -> list[dict[str, Any]]:
    """COCO results list (``loadRes`` input) from detection rows, using the ids of ``coco_gt``."""
    _require_columns(detections, DETECTION_COLUMNS, "detections")
    image_numbers = {image["file_name"]: image["id"] for image in coco_gt["images"]}
    category_ids = {category["name"]: category["id"] for category in coco_gt["categories"]}
    unknown = set(detections["image_id"]) - set(image_numbers)
    if unknown:
        raise ValueError(f"{len(unknown)} detections name images outside the evaluation set, e.g. {sorted(unknown)[:3]}")
    unknown_classes = set(detections["class_name"]) - set(category_ids)
    if unknown_classes:
        raise ValueError(f"detections have classes {sorted(unknown_classes)} unknown to the ground truth")
    boxes = _xyxy_to_xywh(detections)
    return [
        {
            "image_id": image_numbers[image_id],
            "category_id": category_ids[class_name],
            "bbox": [float(v) for v in box],
            "score": float(score),
        }
        for image_id, class_name, score, box in zip(
            detections["image_id"], detections["class_name"], detections["score"], boxes, strict=True
        )
    ]


def _run_faster_coco_eval(coco_gt: dict[str, Any], results: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO(coco_gt, use_deepcopy=True)
    dt = gt.loadRes(results)
    evaluator = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return np.asarray(evaluator.stats, dtype=float), np.asarray(evaluator.eval["precision"])


def _run_pycocotools(coco_gt: dict[str, Any], results: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    import copy

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress unconditionally
        gt = COCO()
        gt.dataset = copy.deepcopy(coco_gt)
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats, dtype=float), np.asarray(evaluator.eval["precision"])


# name -> function(coco_gt, results) -> (stats[12], precision[T,R,K,A,M])
COCO_BACKENDS: dict[str, Callable[[dict[str, Any], list[dict[str, Any]]], tuple[np.ndarray, np.ndarray]]] = {
    "faster_coco_eval": _run_faster_coco_eval,
    "pycocotools": _run_pycocotools,
}


def _per_class_ap(precision: np.ndarray, category_names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """AP per category from COCOeval's precision array (all areas, the largest max-dets setting)."""
    ap50: dict[str, float] = {}
    ap50_95: dict[str, float] = {}
    for k, name in enumerate(category_names):
        curve = precision[:, :, k, 0, -1]  # [iou thresholds, recall points]
        valid = curve[curve > -1]
        ap50_95[name] = float(valid.mean()) if valid.size else float("nan")
        at50 = curve[0][curve[0] > -1]
        ap50[name] = float(at50.mean()) if at50.size else float("nan")
    return ap50, ap50_95


def evaluate_detections(
    images: pd.DataFrame,
    ground_truth: pd.DataFrame,
    detections: pd.DataFrame,
    class_names: Sequence[str],
    backend: str = "faster_coco_eval",
) -> CocoMetrics:
    """COCO bbox mAP@0.5 and mAP@0.5:0.95 (maxDets 100) of ``detections`` against ``ground_truth``."""
    if backend not in COCO_BACKENDS:
        raise ValueError(f"unknown COCO backend '{backend}' (known: {sorted(COCO_BACKENDS)})")
    coco_gt = build_coco_ground_truth(images, ground_truth, class_names)
    results = detections_to_coco_results(detections, coco_gt)
    names = list(class_names)
    if not coco_gt["annotations"]:
        raise ValueError("the evaluation set has no ground-truth boxes: mAP is undefined")
    if not results:  # COCO's loadRes rejects an empty list; no detections means zero AP, by definition
        present = set(ground_truth["class_name"])
        zeros = {name: (0.0 if name in present else float("nan")) for name in names}
        return CocoMetrics(0.0, 0.0, dict(zeros), dict(zeros), tuple([0.0] * 12), len(images),
                           len(ground_truth), 0, backend)
    stats, precision = COCO_BACKENDS[backend](coco_gt, results)
    ap50, ap50_95 = _per_class_ap(precision, names)
    return CocoMetrics(
        map50=float(stats[1]),
        map50_95=float(stats[0]),
        per_class_ap50=ap50,
        per_class_ap50_95=ap50_95,
        stats=tuple(float(s) for s in stats),
        num_images=len(images),
        num_ground_truth=len(ground_truth),
        num_detections=len(results),
        backend=backend,
    )


def write_coco_files(
    images: pd.DataFrame,
    ground_truth: pd.DataFrame,
    detections: pd.DataFrame,
    class_names: Sequence[str],
    out_dir: str,
) -> tuple[str, str]:
    """Write the evaluation's COCO ground truth and results JSON (to re-score with any COCO tool)."""
    import json
    from pathlib import Path

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    coco_gt = build_coco_ground_truth(images, ground_truth, class_names)
    results = detections_to_coco_results(detections, coco_gt)
    gt_path, results_path = folder / "coco_ground_truth.json", folder / "coco_results.json"
    gt_path.write_text(json.dumps(coco_gt))
    results_path.write_text(json.dumps(results))
    return str(gt_path), str(results_path)
