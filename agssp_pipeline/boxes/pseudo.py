"""The pseudo-box table of one source: maps + index + thresholds -> ``pseudo_boxes/<source>.parquet``.

Layout (one Parquet file per source, a manifest of every mapped image):
- one row per box of an image that got boxes (``box_index`` 0..k-1, highest score first);
- one row with null box columns (``box_index`` null) per image without boxes: images judged normal
  (``judged_defective`` false; exported as negatives) and images judged defective whose map never
  crossed T_c or whose components were all below the size floor (ambiguous; not exported).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from agssp_pipeline.boxes.extract import BoxParams, extract_boxes
from agssp_pipeline.boxes.settings import BoxesSettings
from agssp_pipeline.boxes.thresholds import judged_defective_for, thresholds_for

PSEUDO_BOX_COLUMNS = [
    "source",
    "image_id",
    "category",
    "width",
    "height",
    "judged_defective",
    "image_score",
    "image_cutoff",
    "map_max",
    "threshold",
    "box_index",
    "x1",
    "y1",
    "x2",
    "y2",
    "score",
    "area",
    "map_store_version",
]


def index_rows_for_maps(
    image_ids: np.ndarray, index: pd.DataFrame, columns: tuple[str, ...] = ("category", "width", "height")
) -> pd.DataFrame:
    """Index rows (``columns``) aligned with the map table's ids; maps of images not indexed are an error."""
    needed = {"image_id", *columns}
    missing = needed - set(index.columns)
    if missing:
        raise ValueError(f"image index lacks columns {sorted(missing)}")
    lookup = index.drop_duplicates("image_id").set_index("image_id")
    ids = pd.Index(np.asarray(image_ids, dtype=str))
    unknown = ids.difference(lookup.index)
    if len(unknown):
        raise ValueError(
            f"{len(unknown)} mapped images are not in the image index (e.g. {list(unknown[:3])}): "
            "the map store is stale, rematerialize anomaly_maps for this source"
        )
    return lookup.loc[ids, list(columns)].reset_index(drop=True)


def build_pseudo_boxes(
    source: str,
    image_ids: np.ndarray,
    maps: np.ndarray,
    image_score: np.ndarray,
    index: pd.DataFrame,
    thresholds: pd.DataFrame,
    settings: BoxesSettings,
    map_store_version: str,
) -> pd.DataFrame:
    """Pseudo boxes of one source's map table (see module docstring for the row layout)."""
    image_ids = np.asarray(image_ids, dtype=str)
    images = index_rows_for_maps(image_ids, index)
    categories = images["category"].astype(str).to_numpy()
    threshold, cutoff = thresholds_for(categories, thresholds)
    scores = np.asarray(image_score, dtype=np.float32)
    n = len(image_ids)
    maps = np.asarray(maps)
    map_max = maps.reshape(n, -1).max(axis=1).astype(np.float32) if n else np.zeros(0, np.float32)
    defective = judged_defective_for(categories, scores, map_max, thresholds)
    boxes = extract_boxes(
        maps,
        images["height"].to_numpy(np.int64),
        images["width"].to_numpy(np.int64),
        threshold,
        BoxParams.from_settings(settings),
        candidates=defective,
    )
    per_image = pd.DataFrame(
        {
            "source": pd.Series([source] * n, dtype="string"),
            "image_id": pd.Series(image_ids, dtype="string"),
            "category": pd.Series(categories, dtype="string"),
            "width": images["width"].to_numpy(np.int32),
            "height": images["height"].to_numpy(np.int32),
            "judged_defective": defective,
            "image_score": scores,
            "image_cutoff": cutoff.astype(np.float32),
            "map_max": map_max,
            "threshold": threshold,
            "map_store_version": pd.Series([map_store_version] * n, dtype="string"),
        }
    )
    boxes = boxes.assign(box_index=boxes.groupby("row").cumcount().astype("Int32"))
    with_boxes = per_image.iloc[boxes["row"].to_numpy()].reset_index(drop=True)
    for column in ("box_index", "x1", "y1", "x2", "y2", "score"):
        with_boxes[column] = boxes[column].to_numpy()
    with_boxes["area"] = pd.array(boxes["area"].to_numpy(), dtype="Int64")
    with_boxes["box_index"] = with_boxes["box_index"].astype("Int32")
    without = per_image[~np.isin(np.arange(n), boxes["row"].to_numpy())].copy()
    without["box_index"] = pd.array([None] * len(without), dtype="Int32")
    for column in ("x1", "y1", "x2", "y2", "score"):
        without[column] = np.full(len(without), np.nan, np.float32)
    without["area"] = pd.array([None] * len(without), dtype="Int64")
    table = pd.concat([with_boxes[PSEUDO_BOX_COLUMNS], without[PSEUDO_BOX_COLUMNS]], ignore_index=True)
    table = table.sort_values(["image_id", "box_index"], na_position="last", kind="stable").reset_index(drop=True)
    # the settings a run used (per-run overrides included) travel with the file: checks read them back
    # with the rules they resolved to (method preset + explicit rules)
    table.attrs = {"boxes_settings": settings.model_dump(mode="json"), "box_rules": settings.rules().as_dict()}
    return table


def settings_of(table: pd.DataFrame, fallback: BoxesSettings) -> BoxesSettings:
    """The settings a pseudo-box table was built with (``fallback`` for tables written without them)."""
    recorded = table.attrs.get("boxes_settings")
    return BoxesSettings.model_validate(recorded) if recorded else fallback


def boxes_only(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a pseudo-box table that carry a box."""
    return table[table["box_index"].notna()].reset_index(drop=True)


def image_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per image: judged_defective and the number of boxes it got."""
    grouped = table.groupby("image_id", sort=True)
    return pd.DataFrame(
        {
            "judged_defective": grouped["judged_defective"].first(),
            "n_boxes": grouped["box_index"].count(),
        }
    ).reset_index()
