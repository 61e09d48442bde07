"""Per-category adaptive thresholds (T_c) and the image-level normal/defective split.

AGSSP binarises each anomaly map at one threshold per category, pooled over every source sharing the
category: one threshold per material, not per image, so that a quiet image's noise is not turned into
boxes while a category whose maps run hot is not flooded. How T_c is set is a named rule
(``THRESHOLD_RULES``): ``paper`` is the paper's ``mean_i max(map_i) - delta``; ``normal_mad`` puts T_c
above the noise ceiling of the images the split judges normal (median + k * MAD of their maxima), so that
it does not sit inside the spread of normal maxima when most images are normal.

The image-level split is also a named rule (``IMAGE_SPLIT_RULES``): ``fixed`` compares the image score
with an absolute value (only meaningful for one encoder's scale), ``quantile`` flags the images above a
per-category quantile (scale-free; encodes an assumed prevalence), ``otsu`` and ``gmm`` find the gap of a
two-class split of the scores (follow the real share of defective images; the quantile rule when the
scores are unimodal), ``map_max`` is the paper's implied split: an image is defective when its map
reaches T_c. Score-based splits run first and the threshold rule sees which images they judged normal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
    "method",
    "threshold_rule",
    "n_threshold_images",
    "split_fallback",
    "binarisation",
    "map_store_versions",
    "map_rows",
]
MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian times this is its standard deviation

ThresholdRule = Callable[[np.ndarray, BoxesSettings], float]


def _paper_threshold(maxima: np.ndarray, settings: BoxesSettings) -> float:
    return float(maxima.mean()) - float(settings.delta)


def _normal_mad_threshold(maxima: np.ndarray, settings: BoxesSettings) -> float:
    median = float(np.median(maxima))
    mad = float(np.median(np.abs(maxima - median)))
    return median + float(settings.threshold_k) * MAD_TO_SIGMA * mad


# (maxima of the images the rule may use, settings) -> T_c; "normal_mad" is given the judged-normal images
THRESHOLD_RULES: dict[str, ThresholdRule] = {
    "paper": _paper_threshold,
    "normal_mad": _normal_mad_threshold,
}
USES_NORMAL_IMAGES = {"normal_mad"}


@dataclass(frozen=True)
class SplitResult:
    cutoff: float
    fallback: bool = False  # a two-class rule found one class and used the quantile rule


def _fixed_cutoff(scores: np.ndarray, settings: BoxesSettings, threshold: float) -> SplitResult:
    return SplitResult(float(settings.image_score_threshold))


def _quantile_cutoff(scores: np.ndarray, settings: BoxesSettings, threshold: float = float("nan")) -> SplitResult:
    return SplitResult(float(np.quantile(scores, settings.image_score_quantile)) if scores.size else float("inf"))


def otsu_split(scores: np.ndarray) -> tuple[float, float]:
    """Exact Otsu split of 1-D scores: (cutoff, separability = between-class / total variance).

    Every gap between sorted values is a candidate; the cutoff is the last value of the low class, so
    ``score > cutoff`` is the high class. Separability is 2/pi (0.64) for a Gaussian, 0.75 for a uniform,
    towards 1 for two well-separated modes.
    """
    values = np.sort(np.asarray(scores, np.float64))
    n = values.size
    total = values.var()
    if n < 2 or total <= 0:
        return (float(values[-1]) if n else float("inf")), 0.0
    low_count = np.arange(1, n, dtype=np.float64)
    low_sum = np.cumsum(values)[:-1]
    low_mean = low_sum / low_count
    high_mean = (values.sum() - low_sum) / (n - low_count)
    between = low_count * (n - low_count) / n**2 * (high_mean - low_mean) ** 2
    between[values[1:] == values[:-1]] = -1.0  # a cutoff must fall in a gap between distinct values
    best = int(between.argmax())
    return float(values[best]), float(between[best] / total)


def _otsu_cutoff(scores: np.ndarray, settings: BoxesSettings, threshold: float) -> SplitResult:
    cutoff, separability = otsu_split(scores)
    if separability < settings.split_min_separation:
        return SplitResult(_quantile_cutoff(scores, settings).cutoff, fallback=True)
    return SplitResult(cutoff)


def _gmm_cutoff(scores: np.ndarray, settings: BoxesSettings, threshold: float) -> SplitResult:
    """Where the posterior of the higher of two Gaussians reaches 1/2; quantile rule if one Gaussian fits better."""
    from sklearn.mixture import GaussianMixture

    values = np.asarray(scores, np.float64).reshape(-1, 1)
    if len(values) < 4 or np.ptp(values) <= 0:
        return SplitResult(_quantile_cutoff(scores, settings).cutoff, fallback=True)
    one = GaussianMixture(1, random_state=0).fit(values)
    two = GaussianMixture(2, random_state=0, n_init=2).fit(values)
    if two.bic(values) >= one.bic(values):
        return SplitResult(_quantile_cutoff(scores, settings).cutoff, fallback=True)
    high = int(np.argmax(two.means_.ravel()))
    candidates = np.unique(values.ravel())
    posterior = two.predict_proba(candidates.reshape(-1, 1))[:, high]
    above = candidates >= two.means_.ravel()[1 - high]  # the crossing between the two means
    low_side = np.flatnonzero(above & (posterior < 0.5))
    if low_side.size == 0:
        return SplitResult(_quantile_cutoff(scores, settings).cutoff, fallback=True)
    return SplitResult(float(candidates[low_side.max()]))


def _threshold_cutoff(maxima: np.ndarray, settings: BoxesSettings, threshold: float) -> SplitResult:
    return SplitResult(float(threshold))


# (the split statistic of the category's images, settings, T_c) -> cutoff; the statistic is the image score,
# or the map maximum for the rules in SPLIT_ON_MAP_MAX (which alone use T_c: the others get NaN, they run
# before T_c so that a threshold rule can use the images they judge normal)
ImageCutoffRule = Callable[[np.ndarray, BoxesSettings, float], SplitResult]
IMAGE_SPLIT_RULES: dict[str, ImageCutoffRule] = {
    "fixed": _fixed_cutoff,
    "quantile": _quantile_cutoff,
    "otsu": _otsu_cutoff,
    "gmm": _gmm_cutoff,
    "map_max": _threshold_cutoff,  # the cutoff is T_c and the compared statistic the map maximum
}
SPLIT_ON_MAP_MAX = {"map_max"}


def _registered(registry: Mapping[str, object], name: str, field: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {field} '{name}' (known: {', '.join(registry)})") from None


def image_cutoff(scores: np.ndarray, settings: BoxesSettings) -> float:
    """Image-score value above which an image of this category is judged defective (score-based splits)."""
    return split_scores(scores, settings).cutoff


def split_scores(scores: np.ndarray, settings: BoxesSettings) -> SplitResult:
    name = settings.rules().image_split
    if name in SPLIT_ON_MAP_MAX:
        raise ValueError(f"image_split '{name}' compares map maxima with T_c, not image scores")
    rule = _registered(IMAGE_SPLIT_RULES, name, "image_split")
    return rule(np.asarray(scores, dtype=np.float64), settings, float("nan"))


def category_threshold(
    maxima: np.ndarray, scores: np.ndarray, settings: BoxesSettings
) -> tuple[float, SplitResult, np.ndarray, int]:
    """(T_c, split, judged defective, images T_c was computed from) of one category.

    Score-based splits run first so that ``normal_mad`` sees the judged-normal images; ``map_max`` needs
    T_c first, so its threshold rule sees every image.
    """
    rules = settings.rules()
    rule = _registered(THRESHOLD_RULES, rules.threshold_rule, "threshold_rule")
    if rules.image_split in SPLIT_ON_MAP_MAX:
        threshold = rule(maxima, settings)
        split = IMAGE_SPLIT_RULES[rules.image_split](maxima, settings, threshold)
        return threshold, split, judge_defective(maxima, np.full(len(maxima), split.cutoff)), len(maxima)
    split = split_scores(scores, settings)
    judged = judge_defective(scores, np.full(len(scores), split.cutoff))
    used = maxima
    if rules.threshold_rule in USES_NORMAL_IMAGES and (~judged).sum() >= settings.min_normal_images:
        used = maxima[~judged]
    return rule(used, settings), split, judged, len(used)


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
    rules = settings.rules()
    records = []
    for category, everything in stats.groupby("category", sort=True):
        is_reference = everything["is_reference"].to_numpy(bool)
        group = everything[~is_reference] if (~is_reference).any() else everything
        maxima = group["map_max"].to_numpy(dtype=np.float64)
        scores = group["image_score"].to_numpy(dtype=np.float64)
        threshold, split, judged, n_used = category_threshold(maxima, scores, settings)
        sources = sorted(everything["source"].unique())
        records.append(
            {
                "category": str(category),
                "n_images": int(len(group)),
                "n_references_excluded": int(len(everything) - len(group)),
                "n_sources": len(sources),
                "sources": ",".join(sources),
                "mean_max": float(maxima.mean()),
                "std_max": float(maxima.std()),
                "delta": float(settings.delta),
                "threshold": float(threshold),
                "image_split": rules.image_split,
                "image_cutoff": float(split.cutoff),
                "n_judged_defective": int(judged.sum()),
                "method": settings.method,
                "threshold_rule": rules.threshold_rule,
                "n_threshold_images": int(n_used),
                "split_fallback": bool(split.fallback),
                "binarisation": rules.binarisation,
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


def judged_defective_for(
    categories: np.ndarray, image_score: np.ndarray, map_max: np.ndarray, thresholds: pd.DataFrame
) -> np.ndarray:
    """Per-image split as the thresholds table recorded it: image score > cutoff, or map max > T_c (map_max)."""
    threshold, cutoff = thresholds_for(categories, thresholds)
    table = thresholds.set_index("category")
    split = table["image_split"] if "image_split" in table.columns else pd.Series(dtype=object)
    on_max = pd.Series(np.asarray(categories, dtype=str)).map(split).isin(SPLIT_ON_MAP_MAX).to_numpy()
    statistic = np.where(on_max, np.asarray(map_max, np.float64), np.asarray(image_score, np.float64))
    return judge_defective(statistic, np.where(on_max, threshold.astype(np.float64), cutoff))
