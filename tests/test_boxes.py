"""Pseudo-box extraction: equality with a straightforward per-image reference, the size floor, NMS/top-k,
and the per-source table (manifest rows for images without boxes)."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from agssp_pipeline.boxes.extract import BoxParams, extract_boxes, min_component_area
from agssp_pipeline.boxes.pseudo import build_pseudo_boxes, image_summary
from agssp_pipeline.boxes.settings import BoxesSettings
from agssp_pipeline.boxes.thresholds import compute_category_thresholds, map_statistics
from agssp_pipeline.kead.maps import upsample_map


def _random_maps(n: int, grid: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maps = rng.random((n, grid, grid)).astype(np.float32) * 0.4
    for i in range(n):
        for _ in range(rng.integers(0, 5)):
            y, x = rng.integers(0, grid, 2)
            maps[i, y, x] = 0.6 + 0.4 * rng.random()
    return maps.astype(np.float16)


def _reference_boxes(maps, heights, widths, thresholds, params: BoxParams) -> pd.DataFrame:
    """Per-image cv2 statistics + scipy maximum: slow but obviously right."""
    rows = []
    for i, patch_map in enumerate(maps):
        up = upsample_map(patch_map, int(heights[i]), int(widths[i]))
        binary = (up >= thresholds[i]).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=params.connectivity)
        floor = min_component_area(int(heights[i]), int(widths[i]), params)
        for label in range(1, n):
            left, top, width, height, area = stats[label]
            if area < floor:
                continue
            score = ndimage.maximum(up, labels, index=label)
            rows.append((i, left, top, left + width, top + height, score, area))
    return pd.DataFrame(rows, columns=["row", "x1", "y1", "x2", "y2", "score", "area"])


@pytest.mark.parametrize("connectivity", [4, 8])
def test_batched_extraction_equals_per_image_reference(connectivity):
    maps = _random_maps(40, 15, seed=1)
    heights = np.array([200] * 20 + [120] * 10 + [97] * 10)
    widths = np.array([200] * 20 + [310] * 10 + [64] * 10)
    thresholds = np.linspace(0.45, 0.7, 40).astype(np.float32)
    # large top_k and IoU 1.0 disable top-k/NMS so every component is compared
    params = BoxParams(top_k=1000, nms_iou=1.0, connectivity=connectivity, chunk_size=7)
    got = extract_boxes(maps, heights, widths, thresholds, params).sort_values(["row", "x1", "y1"])
    want = _reference_boxes(maps, heights, widths, thresholds, params).sort_values(["row", "x1", "y1"])
    assert len(want) > 40
    np.testing.assert_array_equal(got["row"].to_numpy(), want["row"].to_numpy())
    for column in ("x1", "y1", "x2", "y2", "area"):
        np.testing.assert_array_equal(got[column].to_numpy(np.int64), want[column].to_numpy(np.int64), column)
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-6)


def test_boxes_stay_inside_the_image_and_touch_its_edges_exactly():
    maps = np.full((1, 4, 4), 0.9, np.float16)
    boxes = extract_boxes(maps, np.array([50]), np.array([70]), np.array([0.5], np.float32), BoxParams())
    assert boxes[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[0, 0, 70, 50]]
    assert boxes["area"].tolist() == [50 * 70]


def test_size_floor_scales_with_the_image_and_has_a_minimum():
    params = BoxParams(min_area_fraction=0.001, min_area_pixels=16)
    assert min_component_area(100, 100, params) == 16
    assert min_component_area(1000, 1000, params) == 1000
    # a single hot patch on a 15x15 map covers ~13x13 px at 200x200 and far less than 0.1% of 4000x4000
    patch = np.zeros((1, 15, 15), np.float16)
    patch[0, 7, 7] = 1.0
    small = extract_boxes(patch, np.array([200]), np.array([200]), np.array([0.5], np.float32), params)
    assert len(small) == 1
    strict = BoxParams(min_area_fraction=0.05, min_area_pixels=16)
    assert extract_boxes(patch, np.array([200]), np.array([200]), np.array([0.5], np.float32), strict).empty


def test_top_k_keeps_the_highest_scores_and_nms_suppresses_overlaps():
    maps = np.zeros((1, 16, 16), np.float16)
    values = np.linspace(0.6, 0.95, 16)
    for i, value in enumerate(values):  # 16 isolated hot patches on a checkerboard of gaps
        maps[0, (i // 4) * 4 + 1, (i % 4) * 4 + 1] = value
    boxes = extract_boxes(
        maps, np.array([160]), np.array([160]), np.array([0.3], np.float32), BoxParams(top_k=10, min_area_pixels=1)
    )
    assert len(boxes) == 10
    assert np.all(np.diff(boxes["score"].to_numpy()) <= 0)
    every = extract_boxes(
        maps, np.array([160]), np.array([160]), np.array([0.3], np.float32), BoxParams(top_k=100, min_area_pixels=1)
    )
    assert len(every) == 16
    np.testing.assert_array_equal(boxes["score"].to_numpy(), np.sort(every["score"].to_numpy())[::-1][:10])

    # two components whose rectangles overlap heavily: an L-shaped blob around a separate blob
    ring = np.zeros((1, 9, 9), np.float16)
    ring[0, 1, 1:8] = 0.9
    ring[0, 1:8, 1] = 0.9
    ring[0, 4:7, 4:7] = 0.8
    loose = extract_boxes(ring, np.array([90]), np.array([90]), np.array([0.5], np.float32), BoxParams(nms_iou=1.0))
    tight = extract_boxes(ring, np.array([90]), np.array([90]), np.array([0.5], np.float32), BoxParams(nms_iou=0.1))
    assert len(loose) == 2 and len(tight) == 1 and tight["score"].iloc[0] == loose["score"].max()


def test_images_below_threshold_or_not_candidates_get_no_boxes():
    maps = _random_maps(6, 8, seed=3)
    maps[2] = 0.1
    candidates = np.array([True, True, True, False, True, True])
    boxes = extract_boxes(
        maps, np.full(6, 64), np.full(6, 64), np.full(6, 0.5, np.float32), BoxParams(), candidates=candidates
    )
    assert not set(boxes["row"]) & {2, 3}
    with pytest.raises(ValueError, match="expected maps"):
        extract_boxes(maps[0], np.full(6, 64), np.full(6, 64), np.full(6, 0.5, np.float32), BoxParams())


def _table(settings: BoxesSettings, n: int = 30):
    maps = _random_maps(n, 15, seed=5)
    ids = np.array([f"{i:016x}" for i in range(n)])
    categories = np.array(["steel"] * (n // 2) + ["tile"] * (n - n // 2))
    scores = maps.reshape(n, -1).max(axis=1).astype(np.float32)
    index = pd.DataFrame({"image_id": ids[::-1], "category": categories[::-1], "width": 200, "height": 150})
    thresholds = compute_category_thresholds(map_statistics("src", ids, maps, scores, categories), settings)
    return build_pseudo_boxes("src", ids, maps, scores, index, thresholds, settings, "v3"), ids, maps, index, thresholds


def test_pseudo_box_table_is_a_manifest_of_every_mapped_image():
    settings = BoxesSettings(image_split="quantile", image_score_quantile=0.5)
    table, ids, _, _, thresholds = _table(settings)
    summary = image_summary(table)
    assert sorted(summary["image_id"]) == sorted(ids)
    normal = table[~table["judged_defective"]]
    assert len(normal) and normal["box_index"].isna().all() and normal["x1"].isna().all()
    boxed = table[table["box_index"].notna()]
    assert len(boxed) and boxed["judged_defective"].all()
    assert (boxed["x1"] >= 0).all() and (boxed["x2"] <= 200).all() and (boxed["y2"] <= 150).all()
    assert (summary["n_boxes"] <= settings.top_k).all()
    assert (table["map_store_version"] == "v3").all()
    by_category = thresholds.set_index("category")["threshold"]
    assert np.allclose(table["threshold"], by_category.loc[table["category"].astype(str)].to_numpy())
    # one row per image judged defective: box rows numbered 0..k-1
    first = boxed.groupby("image_id")["box_index"].min()
    assert (first == 0).all()


def test_stale_map_store_is_a_clear_error():
    settings = BoxesSettings()
    _, ids, maps, index, thresholds = _table(settings, n=6)
    scores = np.ones(6, np.float32)
    with pytest.raises(ValueError, match="stale"):
        build_pseudo_boxes("src", ids, maps, scores, index.iloc[1:], thresholds, settings, "v")
