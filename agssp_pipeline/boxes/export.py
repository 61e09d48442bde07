"""Training exports: YOLO (ultralytics) and COCO JSON, from the Parquet tables; never copies user images.

YOLO layout (what ultralytics reads; it derives a label path from an image path by replacing the last
``/images/`` with ``/labels/`` and the extension with ``.txt``)::

    out_dir/data.yaml
    out_dir/<split>/images/<image_id><ext>  -> symlink to the user's image (absolute target)
    out_dir/<split>/labels/<image_id>.txt   -> "class cx cy w h" normalised, one line per box

Symlinks (not a list file of original paths) because ultralytics would look for labels beside the user's
images otherwise. Link names are content ids, so two sources with the same file name cannot collide.
Exports are deterministic: same tables in, byte-identical files out; stale links and labels of a split
(ours, from an earlier export) are removed, anything else found there is an error, never overwritten.

Exports are local folders (symlinks, and ultralytics opens paths): the default folder is
``layout.export_dir(...)``, i.e. ``exports/`` under a local root and a scratch folder under an object-store
root. They are derived data, rebuilt from the Parquet tables (read through ``artifact_io``) at any time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from agssp_pipeline import artifact_io
from agssp_pipeline.storage import StorageLayout

RECORD_COLUMNS = ["image_id", "path", "width", "height"]
BOX_COORDS = ["x1", "y1", "x2", "y2"]
PSEUDO_CLASS_NAMES = ("defect",)


def _check_columns(frame: pd.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = set(needed) - set(frame.columns)
    if missing:
        raise ValueError(f"{what} lacks columns {sorted(missing)}")


def _class_ids(boxes: pd.DataFrame, class_names: Sequence[str]) -> np.ndarray:
    if "class_id" in boxes.columns:
        ids = boxes["class_id"].to_numpy(np.int64)
        bad = ids[(ids < 0) | (ids >= len(class_names))]
        if bad.size:
            raise ValueError(f"class ids {sorted(set(bad.tolist()))} outside 0..{len(class_names) - 1}")
        return ids
    if "class_name" not in boxes.columns:
        raise ValueError("boxes need a class_id or a class_name column")
    lookup = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(boxes["class_name"].astype(str)) - set(lookup))
    if unknown:
        raise ValueError(f"box classes {unknown} are not in class_names {list(class_names)}")
    return boxes["class_name"].astype(str).map(lookup).to_numpy(np.int64)


def yolo_label_lines(boxes: pd.DataFrame, width: float, height: float) -> list[str]:
    """Normalised ``class cx cy w h`` lines; boxes are clipped to the image and empty ones dropped."""
    x1 = np.clip(boxes["x1"].to_numpy(np.float64), 0, width)
    x2 = np.clip(boxes["x2"].to_numpy(np.float64), 0, width)
    y1 = np.clip(boxes["y1"].to_numpy(np.float64), 0, height)
    y2 = np.clip(boxes["y2"].to_numpy(np.float64), 0, height)
    keep = (x2 > x1) & (y2 > y1)
    cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
    bw, bh = (x2 - x1) / width, (y2 - y1) / height
    classes = boxes["class_id"].to_numpy(np.int64)
    return [
        f"{c} {a:.6f} {b:.6f} {w:.6f} {h:.6f}"
        for c, a, b, w, h in zip(classes[keep], cx[keep], cy[keep], bw[keep], bh[keep], strict=True)
    ]


def _link(target: Path, link: Path) -> None:
    if link.is_symlink():
        if os.readlink(link) == str(target):
            return
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not an export link; refusing to overwrite it")
    link.symlink_to(target)


def _remove_stale(folder: Path, keep: set[str], suffix: str | None) -> None:
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        ours = entry.is_symlink() if suffix is None else (entry.is_file() and entry.suffix == suffix)
        if not ours:
            raise FileExistsError(f"unexpected {entry} in an export folder; refusing to touch it")
        entry.unlink()


def _write_data_yaml(out_dir: Path, class_names: Sequence[str]) -> Path:
    splits = sorted(p.name for p in out_dir.iterdir() if (p / "images").is_dir())
    if not splits:
        raise ValueError(f"no split folders under {out_dir}")
    train = "train" if "train" in splits else splits[0]
    data = {
        "path": str(out_dir.resolve()),
        "train": f"{train}/images",
        # ultralytics requires a val entry; a single-split export validates on its training images
        "val": f"{'val' if 'val' in splits else train}/images",
        **({"test": "test/images"} if "test" in splits else {}),
        "nc": len(class_names),
        "names": {i: name for i, name in enumerate(class_names)},
    }
    path = out_dir / "data.yaml"
    artifact_io.write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def export_yolo_dataset(
    records: pd.DataFrame,
    boxes: pd.DataFrame,
    class_names: Sequence[str],
    out_dir: str | os.PathLike[str],
    split_name: str = "train",
) -> Path:
    """Write one split of a YOLO dataset and (re)write ``data.yaml``; returns the data.yaml path.

    ``records``: images [image_id, path, width, height] (all of them appear; no boxes = background image);
    ``boxes``: [image_id, class_id or class_name, x1, y1, x2, y2] in pixels.
    """
    _check_columns(records, RECORD_COLUMNS, "records")
    _check_columns(boxes, ["image_id", *BOX_COORDS], "boxes")
    if not class_names:
        raise ValueError("class_names is empty")
    if records["image_id"].duplicated().any():
        dupes = records.loc[records["image_id"].duplicated(), "image_id"].head(3).tolist()
        raise ValueError(f"records hold duplicate image ids, e.g. {dupes}")
    unknown = set(boxes["image_id"]) - set(records["image_id"])
    if unknown:
        raise ValueError(f"{len(unknown)} boxes' images are not in records, e.g. {sorted(unknown)[:3]}")
    boxes = boxes.assign(class_id=_class_ids(boxes, class_names))
    out = Path(out_dir)
    images_dir, labels_dir = out / split_name / "images", out / split_name / "labels"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    records = records.sort_values("image_id", kind="stable")
    boxes = boxes.sort_values(["image_id", "class_id", *BOX_COORDS], kind="stable")
    grouped = dict(tuple(boxes.groupby("image_id", sort=False)))
    link_names, label_names = set(), set()
    empty = boxes.iloc[:0]
    for image_id, path, width, height in records[RECORD_COLUMNS].itertuples(index=False):
        target = Path(path).resolve()
        if not target.is_file():
            raise FileNotFoundError(f"image {image_id} not found at {path}")
        link = images_dir / f"{image_id}{target.suffix.lower()}"
        _link(target, link)
        lines = yolo_label_lines(grouped.get(image_id, empty), float(width), float(height))
        label = labels_dir / f"{image_id}.txt"
        label.write_text("".join(line + "\n" for line in lines))  # a local export file, not an artifact
        link_names.add(link.name)
        label_names.add(label.name)
    _remove_stale(images_dir, link_names, suffix=None)
    _remove_stale(labels_dir, label_names, suffix=".txt")
    cache = out / split_name / "labels.cache"  # ultralytics' label cache would be stale after a re-export
    if cache.exists():
        cache.unlink()
    return _write_data_yaml(out, class_names)


def export_coco_dataset(
    records: pd.DataFrame, boxes: pd.DataFrame, class_names: Sequence[str], out_path: str | os.PathLike[str]
) -> Path:
    """COCO detection JSON (file_name = absolute image path, ids 1.. in image_id order, scores kept)."""
    _check_columns(records, RECORD_COLUMNS, "records")
    _check_columns(boxes, ["image_id", *BOX_COORDS], "boxes")
    boxes = boxes.assign(class_id=_class_ids(boxes, class_names))
    records = records.sort_values("image_id", kind="stable").reset_index(drop=True)
    coco_ids = {image_id: i + 1 for i, image_id in enumerate(records["image_id"])}
    images = [
        {
            "id": coco_ids[row.image_id],
            "file_name": str(Path(row.path).resolve()),
            "width": int(row.width),
            "height": int(row.height),
            "agssp_image_id": str(row.image_id),
            **({"source": str(row.source)} if "source" in records.columns else {}),
        }
        for row in records.itertuples(index=False)
    ]
    boxes = boxes[boxes["image_id"].isin(coco_ids)].sort_values(["image_id", "class_id", *BOX_COORDS])
    annotations = []
    for n, row in enumerate(boxes.itertuples(index=False), start=1):
        w, h = float(row.x2 - row.x1), float(row.y2 - row.y1)
        annotation = {
            "id": n,
            "image_id": coco_ids[row.image_id],
            "category_id": int(row.class_id) + 1,
            "bbox": [float(row.x1), float(row.y1), w, h],
            "area": w * h,
            "iscrowd": 0,
        }
        if "score" in boxes.columns:
            annotation["score"] = float(row.score)
        annotations.append(annotation)
    data = {
        "info": {"description": "AGSSP export", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "defect"} for i, name in enumerate(class_names)],
    }
    path = Path(out_path)
    artifact_io.write_text(path, json.dumps(data, indent=1, sort_keys=True))
    return path


def pseudo_box_training_set(
    layout: StorageLayout, sources: Sequence[str], include_negatives: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records, boxes) for training from the pseudo-box tables of ``sources``.

    Images with boxes are positives; images judged normal are negatives when ``include_negatives``;
    images judged defective without any box are left out (ambiguous: neither a box nor a clean negative).
    Index duplicates (``duplicate_of`` set) are left out so an image is never trained on twice.
    """
    record_parts, box_parts = [], []
    for source in sorted(sources):
        table = artifact_io.read_parquet(layout.pseudo_boxes(source))
        index = artifact_io.read_parquet(layout.index(source), columns=["image_id", "path", "duplicate_of"])
        index = index[index["duplicate_of"].isna()].drop_duplicates("image_id")
        has_box = table["box_index"].notna()
        positives = set(table.loc[has_box, "image_id"])
        negatives = set(table.loc[~table["judged_defective"], "image_id"]) if include_negatives else set()
        wanted = table[table["image_id"].isin(positives | negatives)].drop_duplicates("image_id")
        wanted = wanted[["image_id", "width", "height"]].merge(index, on="image_id", how="inner")
        record_parts.append(wanted.assign(source=source)[[*RECORD_COLUMNS, "source"]])
        boxes = table[has_box & table["image_id"].isin(wanted["image_id"])]
        box_parts.append(boxes[["image_id", *BOX_COORDS, "score"]].assign(class_id=0))
    records = pd.concat(record_parts, ignore_index=True).drop_duplicates("image_id")
    boxes = pd.concat(box_parts, ignore_index=True)
    return records.reset_index(drop=True), boxes.reset_index(drop=True)


def export_pseudo_yolo(
    layout: StorageLayout,
    sources: Sequence[str],
    out_dir: str | os.PathLike[str] | None = None,
    include_negatives: bool = True,
    split_name: str = "train",
) -> Path:
    """YOLO export (single class "defect") of the pseudo boxes of ``sources``; returns data.yaml."""
    records, boxes = pseudo_box_training_set(layout, sources, include_negatives)
    target = out_dir or layout.export_dir("pseudo_yolo")
    return export_yolo_dataset(records, boxes, PSEUDO_CLASS_NAMES, target, split_name)


def export_pseudo_coco(
    layout: StorageLayout,
    sources: Sequence[str],
    out_path: str | os.PathLike[str] | None = None,
    include_negatives: bool = True,
) -> Path:
    """COCO JSON (single category "defect", box scores kept) of the pseudo boxes of ``sources``."""
    records, boxes = pseudo_box_training_set(layout, sources, include_negatives)
    target = out_path or layout.export_dir() / "pseudo_coco.json"
    return export_coco_dataset(records, boxes, PSEUDO_CLASS_NAMES, target)


def export_ground_truth_yolo(
    layout: StorageLayout,
    source: str,
    class_names: Sequence[str],
    out_dir: str | os.PathLike[str],
    split_name: str,
    image_ids: Sequence[str] | None = None,
) -> Path:
    """YOLO export of a source's ground-truth boxes (``index/<source>.annotations.parquet``).

    ``image_ids`` restricts the split (e.g. the finetune train or val ids); default: every image of the
    index that is not a duplicate. Boxes of classes outside ``class_names`` are an error.
    """
    index = artifact_io.read_parquet(layout.index(source))
    index = index[index["duplicate_of"].isna()] if "duplicate_of" in index.columns else index
    if image_ids is not None:
        wanted = set(image_ids)
        missing = wanted - set(index["image_id"])
        if missing:
            raise ValueError(f"{len(missing)} image ids are not in the index of {source}, e.g. {sorted(missing)[:3]}")
        index = index[index["image_id"].isin(wanted)]
    annotations = artifact_io.read_parquet(layout.annotations(source))
    annotations = annotations[annotations["image_id"].isin(index["image_id"])]
    return export_yolo_dataset(
        index[RECORD_COLUMNS].drop_duplicates("image_id"), annotations, class_names, out_dir, split_name
    )
