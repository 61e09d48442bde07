"""The named box rules on synthetic arrays with known answers: threshold rules, image splits,
binarisations, method presets, and that each setting reaches the code that implements it."""

from __future__ import annotations

import typing

import numpy as np
import pandas as pd
import pytest

from agssp_pipeline.boxes.extract import BINARISATIONS, BoxParams, extract_boxes
from agssp_pipeline.boxes.pseudo import build_pseudo_boxes
from agssp_pipeline.boxes.settings import (
    METHODS,
    BinarisationName,
    BoxesSettings,
    ImageSplitName,
    ThresholdRuleName,
)
from agssp_pipeline.boxes.thresholds import (
    IMAGE_SPLIT_RULES,
    THRESHOLD_RULES,
    compute_category_thresholds,
    map_statistics,
    otsu_split,
    split_scores,
)


def _stats(maxima: np.ndarray, scores: np.ndarray | None = None) -> pd.DataFrame:
    maps = np.zeros((len(maxima), 3, 3), np.float32)
    maps[:, 1, 1] = maxima
    scores = maxima if scores is None else scores
    return map_statistics("s", np.array([f"i{i}" for i in range(len(maxima))]), maps, scores,
                          np.array(["steel"] * len(maxima)))


def _bimodal(n_low: int = 80, n_high: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(0.2, 0.03, n_low), rng.normal(0.8, 0.03, n_high)])
    return values.astype(np.float32).astype(np.float64)  # what map statistics store


def test_settings_literals_match_the_registries():
    assert set(typing.get_args(ThresholdRuleName)) == set(THRESHOLD_RULES)
    assert set(typing.get_args(ImageSplitName)) == set(IMAGE_SPLIT_RULES)
    assert set(typing.get_args(BinarisationName)) == set(BINARISATIONS)
    for rules in METHODS.values():
        assert rules.threshold_rule in THRESHOLD_RULES and rules.image_split in IMAGE_SPLIT_RULES
        assert rules.binarisation in BINARISATIONS


def test_method_presets_resolve_and_explicit_rules_override_them():
    paper = BoxesSettings(method="paper").rules()
    assert (paper.threshold_rule, paper.image_split, paper.binarisation) == ("paper", "map_max", "single")
    mixed = BoxesSettings(method="paper", image_split="quantile").rules()
    assert (mixed.threshold_rule, mixed.image_split) == ("paper", "quantile")
    # a round trip through model_dump keeps unset rules unset, so a per-run method override still applies
    dumped = BoxesSettings().model_dump()
    assert dumped["threshold_rule"] is None
    assert BoxesSettings.model_validate({**dumped, "method": "paper"}).rules() == paper
    with pytest.raises(ValueError):
        BoxesSettings(binarisation="otsu")


def test_paper_method_reproduces_the_papers_threshold_exactly():
    maxima = np.array([0.3, 0.45, 0.9, 0.75], np.float32)
    row = compute_category_thresholds(_stats(maxima), BoxesSettings(method="paper")).iloc[0]
    assert row["threshold"] == pytest.approx(float(maxima.astype(np.float64).mean()) - 0.1, abs=1e-12)
    assert row["threshold_rule"] == "paper" and row["image_split"] == "map_max" and row["binarisation"] == "single"
    # the implied split: an image is defective when its map maximum exceeds T_c (0.6 - 0.1 = 0.5 here)
    assert row["image_cutoff"] == row["threshold"] and row["n_judged_defective"] == 2


def test_otsu_finds_the_gap_of_a_bimodal_score_set():
    scores = _bimodal()
    cutoff, separability = otsu_split(scores)
    assert scores[scores < 0.5].max() <= cutoff < scores[scores > 0.5].min()
    assert separability > 0.9
    split = split_scores(scores, BoxesSettings(image_split="otsu"))
    assert not split.fallback and (scores > split.cutoff).sum() == 20


def test_gmm_finds_the_gap_and_both_fall_back_on_unimodal_scores():
    scores = _bimodal(70, 30)
    split = split_scores(scores, BoxesSettings(image_split="gmm"))
    assert not split.fallback and (scores > split.cutoff).sum() == 30
    unimodal = np.random.default_rng(1).normal(0.5, 0.1, 400)
    for rule in ("otsu", "gmm"):
        result = split_scores(unimodal, BoxesSettings(image_split=rule, image_score_quantile=0.8))
        assert result.fallback, rule
        assert result.cutoff == pytest.approx(np.quantile(unimodal, 0.8))


def test_normal_mad_threshold_sits_above_the_judged_normal_images_spread():
    maxima = _bimodal(80, 20)
    row = compute_category_thresholds(
        _stats(maxima), BoxesSettings(threshold_rule="normal_mad", image_split="otsu", threshold_k=3.0)
    ).iloc[0]
    normal = np.sort(maxima)[:80]
    median = np.median(normal)
    expected = median + 3.0 * 1.4826 * np.median(np.abs(normal - median))
    assert row["n_threshold_images"] == 80 and row["threshold"] == pytest.approx(expected, rel=1e-6)
    assert normal.max() < row["threshold"] + 0.05 and row["threshold"] < 0.5
    # the paper's rule on the same maxima sits inside the normal spread's upper half
    paper = compute_category_thresholds(_stats(maxima), BoxesSettings(method="paper")).iloc[0]
    assert paper["threshold"] < row["threshold"]


def test_normal_mad_uses_every_image_when_too_few_are_judged_normal():
    maxima = _bimodal(5, 20)
    row = compute_category_thresholds(
        _stats(maxima), BoxesSettings(threshold_rule="normal_mad", image_split="otsu", min_normal_images=8)
    ).iloc[0]
    assert row["n_threshold_images"] == 25


def _blob_map(grid: int = 20) -> np.ndarray:
    """A broad low plateau (0.5) with a small hot core (1.0) at (5, 5) and a separate plateau-only patch."""
    patch = np.zeros((grid, grid), np.float32)
    patch[2:10, 2:10] = 0.5
    patch[5:7, 5:7] = 1.0
    patch[14:17, 14:17] = 0.35  # below T_c, above the hysteresis low level, no seed
    return patch


def _extract(binarisation: str, patch: np.ndarray, threshold: float, **kw) -> pd.DataFrame:
    params = BoxParams(binarisation=binarisation, min_area_pixels=1, min_area_fraction=0.0, **kw)
    return extract_boxes(patch[None], np.array([20]), np.array([20]), np.array([threshold]), params)


def test_rethreshold_shrinks_a_blob_to_its_peak_region():
    patch = _blob_map()
    single = _extract("single", patch, 0.4)
    assert single[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[2, 2, 10, 10]]
    # level = map median 0 -> keep pixels >= 0.7 * peak: only the hot core
    shrunk = _extract("rethreshold", patch, 0.4, rethreshold_fraction=0.7)
    assert shrunk[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[5, 5, 7, 7]]
    assert shrunk["score"].iloc[0] == pytest.approx(1.0)


def test_hysteresis_grows_seeded_components_and_creates_none_without_a_seed():
    patch = _blob_map()
    core = _extract("single", patch, 0.9)
    assert core[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[5, 5, 7, 7]]
    # seeds at T_c 0.9, grown down to 0 + 0.45 * 0.9 = 0.405: the plateau, not the unseeded 0.35 patch
    grown = _extract("hysteresis", patch, 0.9, hysteresis_fraction=0.45)
    assert grown[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[2, 2, 10, 10]]
    lower = _extract("hysteresis", patch, 0.9, hysteresis_fraction=0.3)  # low 0.27 reaches the 0.35 patch
    assert lower[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[2, 2, 10, 10]]
    assert _extract("hysteresis", patch * 0.5, 0.9, hysteresis_fraction=0.3).empty  # no seed anywhere


def test_the_configured_binarisation_reaches_the_pseudo_box_table():
    patch = _blob_map()
    maps = np.stack([patch, patch * 0.2])
    ids = np.array(["hot", "quiet"])
    index = pd.DataFrame({"image_id": ids, "category": "steel", "width": 20, "height": 20})
    stats = map_statistics("s", ids, maps, maps.reshape(2, -1).max(axis=1), np.array(["steel"] * 2))
    widths = {}
    for binarisation in ("single", "rethreshold"):
        settings = BoxesSettings(method="paper", delta=0.25, binarisation=binarisation, rethreshold_fraction=0.7,
                                 min_area_pixels=1, min_area_fraction=0.0)
        thresholds = compute_category_thresholds(stats, settings)
        table = build_pseudo_boxes("s", ids, maps, stats["image_score"].to_numpy(), index, thresholds, settings, "v")
        boxes = table[table["box_index"].notna()]
        assert table.attrs["box_rules"]["binarisation"] == binarisation
        assert set(boxes["image_id"]) == {"hot"}  # map_max split: the quiet map never reaches T_c
        widths[binarisation] = float((boxes["x2"] - boxes["x1"]).iloc[0])
    assert widths == {"single": 8.0, "rethreshold": 2.0}
