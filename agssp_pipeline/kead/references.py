"""Choosing the few normal reference images per category that few-shot anomaly maps compare against.

References decide what "normal" means, so the choice is explicit, deterministic (seeded) and recorded in
the map store's version: a different reference set starts a new store version.

Strategies (``KeadSettings.reference_strategy``):
- ``explicit``: the user's list per category (image ids or paths, from ``kead.reference_images``);
- ``normal``: rows marked ``is_normal`` (e.g. from a ``normal_subfolders`` folder), a seeded sample;
- ``lowest_zero_shot``: the k images a zero-shot (text) pass scored least anomalous;
- ``auto``: per category, explicit if given, else normal rows, topped up (when fewer than k exist) by
  lowest zero-shot scores when available, else by the most *typical* images.

"Typical" is the fallback for encoders without a text path (the CNN encoder) on sources with no marked
normals: images whose small grey thumbnail + intensity histogram is closest to the category's median
descriptor. Defects are local and rare per image, so the most central images of a category are the
ones least affected by them; it costs one small decode per candidate (candidates capped, seeded).

Candidates may come from any source sharing the category (pass the concatenated indexes); duplicates
(``duplicate_of`` set) are never references.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import cv2
import numpy as np
import pandas as pd

from agssp_pipeline.sources.decode import read_grey

STRATEGIES = ("explicit", "normal", "lowest_zero_shot", "typical", "auto")
REFERENCE_COLUMNS = ["category", "image_id", "path", "source", "reason"]
TYPICAL_MAX_CANDIDATES = 256
THUMBNAIL_SIDE = 16


def _seeded_sample(rows: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """Deterministic sample independent of row order: rank by a seeded hash of the image id."""
    if len(rows) <= k:
        return rows.sort_values("image_id")
    keys = rows["image_id"].map(lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return rows.assign(_key=keys).sort_values("_key").head(k).drop(columns="_key")


def _candidates(index: pd.DataFrame) -> pd.DataFrame:
    rows = index
    if "duplicate_of" in rows:
        rows = rows[rows["duplicate_of"].isna()]
    return rows.drop_duplicates("image_id")


def _explicit(rows: pd.DataFrame, wanted: list[str], category: str) -> pd.DataFrame:
    by_id = rows.set_index("image_id", drop=False)
    chosen, missing = [], []
    for item in wanted:
        if item in by_id.index:
            chosen.append(by_id.loc[item])
            continue
        match = rows[(rows["path"] == item) | rows["path"].str.endswith("/" + item.lstrip("/"))]
        if len(match):
            chosen.append(match.iloc[0])
        else:
            missing.append(item)
    if missing:
        raise ValueError(
            f"category '{category}': reference images not found in the index of this category: {missing[:5]}"
        )
    return pd.DataFrame(chosen).drop_duplicates("image_id")


def _read_grey(path: str) -> np.ndarray | None:
    try:
        return read_grey(path)
    except OSError:
        return None


def thumbnail_descriptor(path: str) -> np.ndarray | None:
    """Normalised 16x16 grey thumbnail + 16-bin histogram; None when the file cannot be decoded."""
    grey = _read_grey(path)
    if grey is None:
        return None
    thumb = cv2.resize(grey, (THUMBNAIL_SIDE, THUMBNAIL_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    hist = cv2.calcHist([grey], [0], None, [16], [0, 256]).ravel()
    hist = hist / max(hist.sum(), 1.0)
    return np.concatenate([thumb.ravel() / 255.0 / THUMBNAIL_SIDE, hist])


def typicality(rows: pd.DataFrame, seed: int = 0,
               describe: Callable[[str], np.ndarray | None] = thumbnail_descriptor) -> pd.Series:
    """Distance of each (sampled) candidate's descriptor to the median descriptor; lower = more typical."""
    sample = _seeded_sample(rows, TYPICAL_MAX_CANDIDATES, seed)
    descriptors = {row.image_id: describe(row.path) for row in sample.itertuples()}
    descriptors = {k: v for k, v in descriptors.items() if v is not None}
    if not descriptors:
        return pd.Series(dtype=float)
    matrix = np.stack(list(descriptors.values()))
    centre = np.median(matrix, axis=0)
    return pd.Series(np.linalg.norm(matrix - centre, axis=1), index=list(descriptors)).sort_values()


def _lowest(rows: pd.DataFrame, scores: pd.Series, k: int) -> pd.DataFrame:
    ranked = scores.reindex(rows["image_id"]).dropna().sort_values(kind="stable")
    return rows.set_index("image_id", drop=False).loc[ranked.index[:k]]


def _select_category(
    rows: pd.DataFrame,
    category: str,
    k: int,
    strategy: str,
    explicit: list[str] | None,
    zero_shot_scores: pd.Series | None,
    seed: int,
) -> pd.DataFrame:
    if strategy == "explicit" or (strategy == "auto" and explicit):
        if not explicit:
            raise ValueError(f"category '{category}': strategy 'explicit' but no reference images listed")
        return _explicit(rows, explicit, category).assign(reason="explicit")
    normal = rows[rows["is_normal"].fillna(False).astype(bool)] if "is_normal" in rows else rows.iloc[:0]
    if strategy == "normal":
        if normal.empty:
            raise ValueError(f"category '{category}': strategy 'normal' but no image is marked normal")
        return _seeded_sample(normal, k, seed).assign(reason="normal")
    if strategy == "lowest_zero_shot":
        if zero_shot_scores is None or zero_shot_scores.reindex(rows["image_id"]).isna().all():
            raise ValueError(f"category '{category}': strategy 'lowest_zero_shot' needs zero-shot scores")
        return _lowest(rows, zero_shot_scores, k).assign(reason="lowest_zero_shot")
    if strategy == "typical":
        return _lowest(rows, typicality(rows, seed), k).assign(reason="typical")
    # auto: normals first, then a fallback for the missing ones
    chosen = _seeded_sample(normal, k, seed).assign(reason="normal")
    missing = k - len(chosen)
    if missing > 0:
        rest = rows[~rows["image_id"].isin(chosen["image_id"])]
        has_scores = zero_shot_scores is not None and zero_shot_scores.reindex(rest["image_id"]).notna().any()
        if has_scores:
            extra = _lowest(rest, zero_shot_scores, missing).assign(reason="lowest_zero_shot")
        else:
            extra = _lowest(rest, typicality(rest, seed), missing).assign(reason="typical")
        chosen = pd.concat([chosen, extra])
    return chosen


def select_references(
    index: pd.DataFrame,
    k: int,
    strategy: str = "auto",
    explicit: dict[str, list[str]] | None = None,
    zero_shot_scores: pd.Series | None = None,
    categories: list[str] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Reference rows per category: columns category, image_id, path, source, reason.

    ``index``: image rows from every source that may contribute references; ``categories``: which
    categories need references (default: all in ``index``); ``zero_shot_scores``: image_id -> score.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown reference strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    if k < 1 and strategy != "explicit":
        raise ValueError("few-shot maps need k >= 1 reference images per category")
    rows = _candidates(index)
    wanted = sorted(categories if categories is not None else rows["category"].dropna().unique())
    selected = []
    for category in wanted:
        in_category = rows[rows["category"] == category]
        if in_category.empty:
            raise ValueError(f"category '{category}': no indexed images to take references from")
        chosen = _select_category(in_category, category, k, strategy, (explicit or {}).get(category),
                                  zero_shot_scores, seed)
        selected.append(chosen.assign(category=category))
    if not selected:
        return pd.DataFrame(columns=REFERENCE_COLUMNS)
    out = pd.concat(selected, ignore_index=True)
    if "source" not in out:
        out["source"] = None
    return out[REFERENCE_COLUMNS].reset_index(drop=True)


def references_by_category(references: pd.DataFrame) -> dict[str, list[str]]:
    """category -> sorted image ids (what the map store version records)."""
    return {str(c): sorted(g["image_id"].astype(str)) for c, g in references.groupby("category")}
