"""Quality of anomaly maps where ground truth masks exist: image and pixel AUROC (sklearn).

Rows: ``overall``, one per defect ``class`` and one per ``category``. The defect class of an image is the
index column ``defect_class`` when present, else the name of the folder holding the image, skipping
generic folder names (``MT_Crack/Imgs/x.jpg`` -> ``MT_Crack``), which is how mask datasets are laid out.

- image label: mask has any pixel > 127, or (sources with boxes but no masks) the image has annotated
  boxes (anomalous) / empty mask or ``is_normal`` (normal); images with none of these are left out;
- ground truth pixels: the mask where there is one, else the interiors of the image's boxes (the
  ``ground_truth`` column says which: box-interior pixel AUROC counts the background inside a box as
  defect, so it is a lower bound of the mask AUROC);
- the few-shot references of the map store (its ``references`` attribute) are left out: they are scored
  against a memory built from themselves (``references_excluded`` counts them);
- image AUROC of a class: its images against all normal images (of the evaluated set);
- pixel AUROC: maps upsampled to image size (``upsample_map``), pixels of all images of the row's set
  (overall: every labelled image, normals included); at most ``max_pixels`` pixels in all, sampled
  deterministically per image (seeded by the image id), so big sources stay cheap and runs reproducible.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePath

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from agssp_pipeline import artifact_io
from agssp_pipeline.kead.maps import upsample_map
from agssp_pipeline.kead.store import MapTable
from agssp_pipeline.records import Record, map_inputs, plain
from agssp_pipeline.sources.regions import read_mask as read_binary_mask

GENERIC_FOLDERS = {"imgs", "images", "img", "image", "jpegimages", "train", "test", "val", "good", "data"}
EVALUATION_COLUMNS = ["level", "name", "encoder", "n_images", "n_anomalous", "n_normal", "image_auroc",
                      "pixel_auroc", "n_pixels", "ground_truth", "references_excluded"]
BOX_COLUMNS = ["x1", "y1", "x2", "y2"]


def defect_class_of(row: pd.Series) -> str:
    if "defect_class" in row and isinstance(row["defect_class"], str):
        return row["defect_class"]
    for folder in reversed(PurePath(str(row["path"])).parent.parts):
        if folder.lower() not in GENERIC_FOLDERS:
            return folder
    return "unknown"


def _read_mask(path: str) -> np.ndarray | None:
    try:
        return read_binary_mask(path).astype(bool)
    except ValueError:
        return None


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def has_masks(index: pd.DataFrame) -> bool:
    return "mask_path" in index and index["mask_path"].notna().any()


def has_boxes(annotations: pd.DataFrame | None) -> bool:
    """Whether an annotation table (``layout.annotations``: image_id, x1..y2) has any box."""
    return annotations is not None and len(annotations) > 0 and set(BOX_COLUMNS) <= set(annotations.columns)


def box_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Union of the boxes' interiors (pixel-edge coordinates, clipped to the image) as a boolean mask."""
    mask = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        left, top = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        right, bottom = min(width, int(np.ceil(x2))), min(height, int(np.ceil(y2)))
        mask[top:bottom, left:right] = True
    return mask


def reference_ids(table: MapTable) -> set[str]:
    """Image ids the store's few-shot memory was built from (its ``references`` attribute)."""
    return {str(i) for ids in (table.attrs.get("references") or {}).values() for i in ids}


def _image_size(row: pd.Series) -> tuple[int, int]:
    height, width = row.get("height"), row.get("width")
    if height is None or width is None or pd.isna(height) or pd.isna(width):
        return _read_mask(str(row["path"])).shape
    return int(height), int(width)


def _ground_truth(row: pd.Series, boxes: dict[str, np.ndarray]) -> tuple[np.ndarray | None, str]:
    """(pixel mask, "masks" | "boxes" | "normal") of one labelled image; (None, "") when it has no label."""
    mask_path = row.get("mask_path")
    mask = _read_mask(mask_path) if isinstance(mask_path, str) else None
    if mask is not None:
        return mask, "masks"
    if str(row["image_id"]) in boxes:
        return box_mask(boxes[str(row["image_id"])], *_image_size(row)), "boxes"
    normal = row.get("is_normal")
    if normal is not None and not pd.isna(normal) and bool(normal):
        return np.zeros(_image_size(row), dtype=bool), "normal"
    return None, ""


def _pixel_sample(mask: np.ndarray, pixel_map: np.ndarray, budget: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    flat_mask, flat_map = mask.ravel(), pixel_map.ravel()
    if flat_mask.size > budget:
        rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
        keep = rng.choice(flat_mask.size, budget, replace=False)
        flat_mask, flat_map = flat_mask[keep], flat_map[keep]
    return flat_mask, flat_map


def _image_records(rows: pd.DataFrame, table: MapTable, boxes: dict[str, np.ndarray], max_pixels: int,
                   seed: int) -> pd.DataFrame:
    """One record per labelled image: label, image score, sampled pixel labels and scores."""
    maps_row = {image_id: row for row, image_id in enumerate(table.image_id.tolist())}
    labelled = []
    for _, row in rows.iterrows():
        mask, truth = _ground_truth(row, boxes)
        if mask is not None:
            labelled.append((row, mask, truth))
    if not labelled:
        return pd.DataFrame()
    per_image_budget = max(256, max_pixels // len(labelled))
    records = []
    for row, mask, truth in labelled:
        position = maps_row[row["image_id"]]
        pixel_map = upsample_map(table.maps[position], *mask.shape)
        labels, scores = _pixel_sample(mask, pixel_map, per_image_budget, f"{seed}:{row['image_id']}")
        records.append({"image_id": row["image_id"], "category": str(row["category"]),
                        "defect_class": defect_class_of(row), "anomalous": bool(mask.any()), "truth": truth,
                        "image_score": float(table.image_score[position]),
                        "pixel_labels": labels, "pixel_scores": scores})
    return pd.DataFrame(records)


def evaluate_maps(
    index: pd.DataFrame,
    table: MapTable,
    max_pixels: int = 4_000_000,
    seed: int = 0,
    annotations: pd.DataFrame | None = None,
    exclude_references: bool = True,
) -> pd.DataFrame:
    """AUROC rows for the images of ``index`` that have a map and a label; see the module docstring.

    ``annotations``: the source's box table (image_id, x1, y1, x2, y2), the ground truth of images
    without a mask.
    """
    in_store = set(table.image_id.tolist())
    rows = index.drop_duplicates("image_id")
    rows = rows[rows["image_id"].isin(in_store)]
    excluded = reference_ids(table) & set(rows["image_id"].astype(str)) if exclude_references else set()
    rows = rows[~rows["image_id"].astype(str).isin(excluded)]
    boxes = ({str(k): g[BOX_COLUMNS].to_numpy(np.float64) for k, g in annotations.groupby("image_id")}
             if has_boxes(annotations) else {})
    images = _image_records(rows, table, boxes, max_pixels, seed)
    if images.empty:
        return pd.DataFrame(columns=EVALUATION_COLUMNS)
    encoder = str(table.attrs.get("encoder", table.attrs.get("identity", {}).get("encoder", "unknown")))
    normals = images[~images["anomalous"]]

    def summarise(level: str, name: str, subset: pd.DataFrame, with_normals: bool) -> dict:
        image_set = pd.concat([subset, normals]).drop_duplicates("image_id") if with_normals else subset
        labels = np.concatenate(list(subset["pixel_labels"])) if len(subset) else np.array([])
        scores = np.concatenate(list(subset["pixel_scores"])) if len(subset) else np.array([])
        truths = sorted(set(image_set["truth"]) - {"normal"})
        return {
            "level": level, "name": name, "encoder": encoder,
            "n_images": int(len(image_set)),
            "n_anomalous": int(image_set["anomalous"].sum()),
            "n_normal": int((~image_set["anomalous"]).sum()),
            "image_auroc": _auroc(image_set["anomalous"].to_numpy(int), image_set["image_score"].to_numpy()),
            "pixel_auroc": _auroc(labels, scores),
            "n_pixels": int(labels.size),
            "ground_truth": "+".join(truths) if truths else "normal",
            "references_excluded": len(excluded),
        }

    out = [summarise("overall", "all", images, with_normals=False)]
    for name, subset in images.groupby("defect_class", sort=True):
        anomalous = subset[subset["anomalous"]]
        if len(anomalous):  # a class of defects: its images against the normal ones
            out.append(summarise("class", str(name), anomalous, with_normals=True))
    for name, subset in images.groupby("category", sort=True):
        out.append(summarise("category", str(name), subset, with_normals=False))
    return pd.DataFrame(out, columns=EVALUATION_COLUMNS)


def with_run_columns(frame: pd.DataFrame, table: MapTable) -> pd.DataFrame:
    """Name the map-store version (encoder, weights, adaptor run, references) and the time of an evaluation."""
    identity = table.attrs.get("identity", {})
    return frame.assign(
        store_version=str(table.attrs.get("version", "")),
        weights=str(table.attrs.get("weights", identity.get("weights", ""))),
        adaptor=str((identity.get("adaptor") or {}).get("run_id") or ""),  # "" = plain features
        evaluated_at=pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
    )


def write_evaluation(frame: pd.DataFrame, uri: str) -> pd.DataFrame:
    """Add ``frame`` to the evaluation history at ``uri`` and return the whole history.

    One block of rows per map-store version: evaluating a version again replaces its rows, while
    evaluations of other versions (another encoder, other weights or references) stay, so encoders can
    be compared on the same source. Files written before the history existed count as version "".
    """
    history = artifact_io.read_parquet(uri) if artifact_io.exists(uri) else pd.DataFrame(columns=frame.columns)
    if "store_version" not in history:
        history = history.assign(store_version="")
    versions = set(frame["store_version"].astype(str)) if "store_version" in frame else {""}
    kept = history[~history["store_version"].astype(str).isin(versions)]
    merged = pd.concat([kept, frame], ignore_index=True) if len(kept) else frame.reset_index(drop=True)
    artifact_io.write_parquet(uri, merged)
    return merged


def evaluation_record(uri: str) -> Record:
    """What the evaluation history at ``uri`` measured: per map-store version its scores; the latest one's maps."""
    source = artifact_io.name(uri).removesuffix(".parquet")
    record = Record(f"KeAD evaluation {source}", label=f"KeAD evaluation {source}", partition=source)
    table = artifact_io.read_parquet(uri)
    overall = table[table["level"] == "overall"] if "level" in table else table
    if "evaluated_at" in overall:
        overall = overall.sort_values("evaluated_at", kind="stable")
    record.fields["evaluated map store versions"] = {
        str(r.get("store_version")): {k: plain(r[k]) for k in ("image_auroc", "pixel_auroc", "evaluated_at")
                                      if k in r and not pd.isna(r[k])} for r in overall.to_dict("records")}
    latest = str(overall["store_version"].iloc[-1]) if "store_version" in overall and len(overall) else None
    record.inputs = map_inputs(source, latest)
    return record
