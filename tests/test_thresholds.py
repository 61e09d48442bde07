"""Per-category thresholds T_c and the image-level split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from agssp_pipeline.boxes.settings import BoxesSettings
from agssp_pipeline.boxes.thresholds import (
    IMAGE_SPLIT_RULES,
    compute_category_thresholds,
    judge_defective,
    map_statistics,
    reference_ids,
    thresholds_for,
)


def _maps_with_maxima(maxima: list[float], grid: int = 4) -> np.ndarray:
    maps = np.zeros((len(maxima), grid, grid), np.float16)
    for i, value in enumerate(maxima):
        maps[i, i % grid, (2 * i) % grid] = value
    return maps


def _stats() -> pd.DataFrame:
    a = map_statistics(
        "src_a", np.array(["a1", "a2"]), _maps_with_maxima([0.5, 0.7]), np.array([0.2, 0.9]), np.array(["steel"] * 2)
    )
    b = map_statistics(
        "src_b",
        np.array(["b1", "b2", "b3"]),
        _maps_with_maxima([0.9, 0.25, 0.75]),
        np.array([0.3, 0.8, 0.1]),
        np.array(["steel", "tile", "tile"]),
    )
    return pd.concat([a, b], ignore_index=True)


def test_threshold_is_mean_of_map_maxima_minus_delta_over_all_sources_of_a_category():
    table = compute_category_thresholds(_stats(), BoxesSettings(method="paper", delta=0.1), {"src_a": "v1", "src_b": "v7"})
    steel = table.set_index("category").loc["steel"]
    assert steel["n_images"] == 3 and steel["n_sources"] == 2 and steel["sources"] == "src_a,src_b"
    assert steel["mean_max"] == pytest.approx(np.mean([0.5, 0.7, 0.9]), abs=1e-3)
    assert steel["threshold"] == pytest.approx(steel["mean_max"] - 0.1)
    assert json.loads(steel["map_store_versions"]) == {"src_a": "v1", "src_b": "v7"}
    tile = table.set_index("category").loc["tile"]
    assert tile["threshold"] == pytest.approx(np.mean([0.25, 0.75]) - 0.1, abs=1e-3)
    assert json.loads(tile["map_store_versions"]) == {"src_b": "v7"}


def test_delta_is_configurable():
    loose = compute_category_thresholds(_stats(), BoxesSettings(method="paper", delta=0.0))
    strict = compute_category_thresholds(_stats(), BoxesSettings(method="paper", delta=0.3))
    assert np.allclose(loose["threshold"] - strict["threshold"], 0.3)


def test_quantile_split_flags_images_above_the_per_category_quantile():
    table = compute_category_thresholds(_stats(), BoxesSettings(image_split="quantile", image_score_quantile=0.5))
    steel = table.set_index("category").loc["steel"]
    assert steel["image_cutoff"] == pytest.approx(0.3)  # median of 0.2, 0.9, 0.3
    assert steel["n_judged_defective"] == 1


def test_fixed_split_uses_the_absolute_value():
    table = compute_category_thresholds(_stats(), BoxesSettings(image_split="fixed", image_score_threshold=0.25))
    assert table.set_index("category")["n_judged_defective"].to_dict() == {"steel": 2, "tile": 1}
    assert set(IMAGE_SPLIT_RULES) >= {"fixed", "quantile"}


def test_judge_defective_is_strictly_above_cutoff():
    assert judge_defective(np.array([0.5, 0.51, 0.4]), np.array([0.5, 0.5, 0.5])).tolist() == [False, True, False]


def test_lookup_per_image_and_unknown_category_is_a_clear_error():
    table = compute_category_thresholds(_stats(), BoxesSettings())
    threshold, cutoff = thresholds_for(np.array(["tile", "steel", "tile"]), table)
    assert threshold[0] == threshold[2] != threshold[1]
    with pytest.raises(ValueError, match="no threshold for categories"):
        thresholds_for(np.array(["glass"]), table)


def test_bad_maps_are_rejected():
    stats = _stats()
    stats.loc[0, "map_max"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_category_thresholds(stats, BoxesSettings())
    with pytest.raises(ValueError, match="no anomaly maps"):
        compute_category_thresholds(stats.iloc[:0], BoxesSettings())
    with pytest.raises(ValueError, match="aligned"):
        map_statistics("s", np.array(["x"]), np.zeros((2, 3, 3)), np.zeros(1), np.array(["c"]))


def test_settings_reject_an_inverted_band():
    with pytest.raises(ValueError):
        BoxesSettings(flagged_fraction_band=(0.9, 0.1))


def test_few_shot_references_are_left_out_of_the_threshold():
    maps = _maps_with_maxima([0.0, 0.6, 0.8])  # the reference scores ~0 against its own patches
    attrs = {"references": {"steel": ["r"]}}
    stats = map_statistics("s", np.array(["r", "x", "y"]), maps, np.zeros(3), np.array(["steel"] * 3),
                           reference_ids(attrs))
    row = compute_category_thresholds(stats, BoxesSettings(delta=0.1)).iloc[0]
    assert row["n_images"] == 2 and row["n_references_excluded"] == 1
    assert row["mean_max"] == pytest.approx(0.7, abs=1e-3)
    only_reference = compute_category_thresholds(stats.iloc[:1], BoxesSettings()).iloc[0]
    assert only_reference["n_images"] == 1  # nothing else to average: the reference is used after all
