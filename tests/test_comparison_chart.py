"""The finetune comparison chart: a decodable PNG per dataset, every regime, not-applicable modes kept."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from agssp_pipeline import artifact_io
from agssp_pipeline.eval.comparison_chart import COLOURS, variant_chart
from agssp_pipeline.storage import StorageLayout
from agssp_pipeline.training.finetune import write_evaluation_tables


def _summary(regimes=("full",), agssp_ok: bool = True) -> pd.DataFrame:
    rows = []
    for regime in regimes:
        for variant, mean, delta, ok in [("scratch", 10.0, np.nan, True), ("imagenet", np.nan, np.nan, False),
                                         ("agbp", 14.0, 4.0, True), ("agssp", 12.0, 2.0, agssp_ok)]:
            rows.append({"dataset": "plates", "regime": regime, "variant": variant, "mode": "-",
                         "status": "ok" if ok else "not applicable", "seeds": 3 if ok else 0, "note": "",
                         "starts_from": variant,
                         "map50_pct_mean": mean if ok else np.nan, "map50_pct_std": 1.0 if ok else np.nan,
                         "map50_pct_vs_scratch": delta if ok else np.nan,
                         "map50_pct_vs_scratch_low": delta - 1.5 if ok else np.nan,
                         "map50_pct_vs_scratch_high": delta + 1.5 if ok else np.nan})
    frame = pd.DataFrame(rows)
    for metric in ("map50_95_pct", "ultralytics_map50_pct"):  # columns the markdown reads; the chart does not
        frame[[f"{metric}_mean", f"{metric}_std"]] = np.nan
    return frame


def _decode(png: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a decodable PNG"
    return image


def _has_colour(image: np.ndarray, hex_colour: str) -> bool:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(image[..., ::-1].astype(int) - rgb).max(axis=2) <= 2).sum() > 50)


def test_chart_has_a_row_of_panels_per_regime_and_a_bar_per_usable_variant():
    one = _decode(variant_chart(_summary(), "plates"))
    two = _decode(variant_chart(_summary(("full", "few50")), "plates"))
    assert two.shape[0] > 1.6 * one.shape[0]
    assert _has_colour(one, COLOURS["agssp"]) and _has_colour(one, COLOURS["agbp"])
    without = _decode(variant_chart(_summary(agssp_ok=False), "plates"))
    assert not _has_colour(without, COLOURS["agssp"])  # a not-applicable mode has no bar, only its label
    assert not _has_colour(one, COLOURS["imagenet"])


def test_chart_of_an_unknown_dataset_is_an_error():
    with pytest.raises(ValueError, match="no summary rows"):
        variant_chart(_summary(), "elsewhere")


def test_the_table_writer_writes_the_chart_beside_the_tables(tmp_path):
    layout = StorageLayout(str(tmp_path / "storage"))
    table = pd.DataFrame({"dataset": ["plates"], "regime": ["full"], "variant": ["scratch"], "map50_pct": [10.0],
                          "status": ["ok"], "seed": [0], "model": ["yolov8n"], "backbone": ["yolov8n"], "epochs": [1],
                          "imgsz": [64], "batch": [2], "train_images": [8], "val_images": [4]})
    write_evaluation_tables(layout, "plates", table, pd.DataFrame(), _summary())
    png = artifact_io.read_bytes(layout.evaluations("finetune", "plates", ".png"))
    assert _decode(png).shape[0] > 50
