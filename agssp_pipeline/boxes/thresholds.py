"""Per-category adaptive thresholds (T_c) and the image-level normal/defective split.

AGSSP binarises each anomaly map at ``T_c = mean_i max(map_i) - delta`` over all images of category c,
pooled over every source sharing the category: one threshold per material, not per image, so that a
quiet image's noise is not turned into boxes while a category whose maps run hot is not flooded.

The paper gives no value for the image-level split, so it is a named rule (``IMAGE_SPLIT_RULES``):
``fixed`` compares the image score with an absolute value (only meaningful for one encoder's scale),
``quantile`` flags the images above a per-category quantile (scale-free; encodes an assumed prevalence).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from agssp_pipeline.boxes.settings import BoxesSettings

MAP_STATS_COLUMNS = ["source", "image_id", "category", "map_max", "image_score", "is_reference"]
THRESHOLD_COLUMNS = [
    "category",
    "n_images",
    "n_references_excluded",
    "n_sources",
    "sources",
    "mean_max",
    "std_max",
    "delta",
    "threshold",
    "image_split",
    "image_cutoff",
    "n_judged_defective",
    "map_store_versions",
    "map_rows",
]

ImageCutoffRule = Callable[[np.ndarray, BoxesSettings], float]


def _fixed_cutoff(scores: np.ndarray, settings: BoxesSettings) -> float:
    return float(settings.image_score_threshold)


def _quantile_cutoff(scores: np.ndarray, settings: BoxesSettings) -> float:
    return float(np.quantile(scores, settings.image_score_quantile)) if scores.size else float("inf")


IMAGE_SPLIT_RULES: dict[str, ImageCutoffRule] = {
    "fixed": _fixed_cutoff,
    "quantile": _quantile_cutoff,
}


def image_cutoff(scores: np.ndarray, settings: BoxesSettings) -> float:
    """Image-score value above which an image of this category is judged defective."""
    try:
        rule = IMAGE_SPLIT_RULES[settings.image_split]
    except KeyError:
        raise ValueError(
            f"unknown image_split '{settings.image_split}' (known: {', '.join(IMAGE_SPLIT_RULES)})"
        ) from None
    return rule(np.asarray(scores, dtype=np.float64), settings)


def judge_defective(scores: np.ndarray, cutoffs: np.ndarray) -> np.ndarray:
    """An image is defective when its score is strictly above its category's cutoff."""
    return np.asarray(scores, dtype=np.float64) > np.asarray(cutoffs, dtype=np.float64)


def reference_ids(attrs: Mapping) -> set[str]:
    """Ids of the few-shot reference images recorded in a map store's attrs (category -> ids)."""
    return {str(i) for ids in (attrs.get("references") or {}).values() for i in ids}


def map_statistics(
    source: str,
    image_ids: np.ndarray,
    maps: np.ndarray,
    image_score: np.ndarray,
    categories: np.ndarray,
    references: set[str] | None = None,
) -> pd.DataFrame:
    """One row per image: the map maximum (what T_c averages) and the image score (what the split uses).

    ``references``: ids of the store's few-shot references; they are flagged so that thresholds leave them
    out (a reference scored against a memory holding its own patches has a map near 0 and would pull
    T_c down).
    """
    n = len(image_ids)
    if maps.shape[0] != n or len(image_score) != n or len(categories) != n:
        raise ValueError(
            f"map statistics need aligned arrays: {n} ids, {maps.shape[0]} maps, "
            f"{len(image_score)} scores, {len(categories)} categories"
        )
    map_max = maps.reshape(n, -1).max(axis=1).astype(np.float32) if n else np.zeros(0, np.float32)
    return pd.DataFrame(
        {
            "source": pd.Series([source] * n, dtype="string"),
            "image_id": pd.Series(np.asarray(image_ids, dtype=str), dtype="string"),
            "category": pd.Series(np.asarray(categories, dtype=str), dtype="string"),
            "map_max": map_max,
            "image_score": np.asarray(image_score, dtype=np.float32),
            "is_reference": np.isin(np.asarray(image_ids, dtype=str), list(references or ())),
        }
    )


def compute_category_thresholds(
    stats: pd.DataFrame, settings: BoxesSettings, store_versions: Mapping[str, str] | None = None,
    map_rows: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The thresholds table: one row per category over every source that shares it.

    ``stats`` has ``MAP_STATS_COLUMNS`` (concatenate ``map_statistics`` of all sources);
    ``store_versions`` maps source -> map store version and ``map_rows`` source -> the rows used
    (``stage.map_rows_id``: count and digest of image ids), recorded so that boxes can tell stale thresholds
    even when the version is the same but rows were added or dropped since.
    """
    missing = set(MAP_STATS_COLUMNS) - set(stats.columns) - {"is_reference"}
    if missing:
        raise ValueError(f"map statistics lack columns {sorted(missing)}")
    if "is_reference" not in stats.columns:
        stats = stats.assign(is_reference=False)
    if stats.empty:
        raise ValueError("no anomaly maps to compute thresholds from (materialize anomaly_maps first)")
    non_finite = ~np.isfinite(stats["map_max"].to_numpy(dtype=np.float64))
    if non_finite.any():
        bad = stats.loc[non_finite, ["source", "image_id"]].head(5).to_dict("records")
        raise ValueError(f"{int(non_finite.sum())} anomaly maps hold NaN/inf values, e.g. {bad}")
    versions, rows = dict(store_versions or {}), dict(map_rows or {})
    records = []
    for category, everything in stats.groupby("category", sort=True):
        is_reference = everything["is_reference"].to_numpy(bool)
        group = everything[~is_reference] if (~is_reference).any() else everything
        maxima = group["map_max"].to_numpy(dtype=np.float64)
        scores = group["image_score"].to_numpy(dtype=np.float64)
        cutoff = image_cutoff(scores, settings)
        sources = sorted(everything["source"].unique())
        mean_max = float(maxima.mean())
        records.append(
            {
                "category": str(category),
                "n_images": int(len(group)),
                "n_references_excluded": int(len(everything) - len(group)),
                "n_sources": len(sources),
                "sources": ",".join(sources),
                "mean_max": mean_max,
                "std_max": float(maxima.std()),
                "delta": float(settings.delta),
                "threshold": mean_max - float(settings.delta),
                "image_split": settings.image_split,
                "image_cutoff": cutoff,
                "n_judged_defective": int(judge_defective(scores, np.full(len(scores), cutoff)).sum()),
                "map_store_versions": json.dumps({s: versions.get(s) for s in sources}, sort_keys=True),
                "map_rows": json.dumps({s: rows.get(s) for s in sources}, sort_keys=True),
            }
        )
    return pd.DataFrame(records, columns=THRESHOLD_COLUMNS)


def thresholds_for(categories: np.ndarray, thresholds: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (T_c, image cutoff) looked up by category; a category without a threshold is an error."""
    table = thresholds.set_index("category")
    categories = pd.Series(np.asarray(categories, dtype=str))
    unknown = sorted(set(categories) - set(table.index))
    if unknown:
        raise ValueError(
            f"no threshold for categories {unknown}: rematerialize category_thresholds after anomaly_maps"
        )
    return (
        table.loc[categories, "threshold"].to_numpy(dtype=np.float32),
        table.loc[categories, "image_cutoff"].to_numpy(dtype=np.float64),
    )
