"""Layout recognition: which registered format reads a folder, from a bounded look at its files.

Every format in ``FORMAT_ADAPTERS`` has a ``claims(root) -> Claim | None`` here (``FORMAT_CLAIMS``); the
highest score wins. Claims read folder listings and at most a few annotation files, never an image, so
``agssp init`` answers in seconds on a plant share. Scores: ~0.9 a format's own annotation files,
~0.5 folder conventions, 0.1 "there are images".
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agssp_pipeline.sources.formats import (
    DEFAULT_VOC_LAYOUTS,
    FORMAT_ADAPTERS,
    LABEL_COLUMNS,
    PATH_COLUMNS,
    PROBABILITY_COLUMNS,
    SPLIT_FOLDER_NAMES,
    is_normal_folder_name,
)
from agssp_pipeline.sources.probe import IMAGE_EXTENSIONS
from agssp_pipeline.sources.scan import is_hidden

MAX_FILES = 20_000  # listing budget per folder
MAX_READ = 20  # annotation files opened per claim


@dataclass
class Claim:
    """A format's bid for a folder: score in (0, 1], options to write, and what the user should check."""

    format: str
    score: float
    options: dict = field(default_factory=dict)
    labels: str = "none"  # what ground truth the layout gives: boxes | masks | image | none
    normal_subfolders: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Listing:
    """A bounded listing of one folder: files by lowercase extension, relative to the root."""

    root: Path
    files: list[Path]

    def with_ext(self, *exts: str) -> list[Path]:
        return [f for f in self.files if f.suffix.lower() in exts]

    @property
    def images(self) -> list[Path]:
        return [f for f in self.files if f.suffix.lower() in IMAGE_EXTENSIONS]


def list_folder(root: Path, limit: int = MAX_FILES) -> Listing:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        here = Path(dirpath).relative_to(root)
        files += [here / n for n in sorted(filenames) if not is_hidden(n)]
        if len(files) >= limit:
            break
    return Listing(root, files)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _first_lines(path: Path, count: int = 5) -> list[str]:
    try:
        return [line for line in path.read_text(errors="replace").splitlines() if line.strip()][:count]
    except OSError:
        return []


def _numbers(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def claim_image_folder(listing: Listing) -> Claim | None:
    return Claim("image_folder", 0.1, labels="none") if listing.images else None


def claim_voc(listing: Listing) -> Claim | None:
    dirs = {f.parts[0] for f in listing.files if len(f.parts) > 1}
    for layout in DEFAULT_VOC_LAYOUTS:
        if layout["images"] in dirs and layout["annotations"] in dirs:
            return Claim("voc", 0.9, labels="boxes")
    return None


def _label_files(listing: Listing, folder: str = "labels") -> list[Path]:
    return [f for f in listing.with_ext(".txt") if folder in f.parts[:-1] and f.name != "classes.txt"]


def _yolo_kind(listing: Listing) -> str | None:
    """'box' or 'polygon' from the first label lines, None when they are not YOLO."""
    if not any("images" in f.parts[:-1] for f in listing.images):
        return None
    kinds = {"box": 0, "polygon": 0, "other": 0}  # by line: one bad line does not hide the layout
    for label in _label_files(listing)[:MAX_READ]:
        for line in _first_lines(listing.root / label):
            values = line.split()
            if not _numbers(values) or len(values) < 5 or (len(values) > 5 and len(values) % 2 == 0):
                kinds["other"] += 1
            else:
                kinds["box" if len(values) == 5 else "polygon"] += 1
    if kinds["box"] + kinds["polygon"] <= kinds["other"]:
        return None
    return "polygon" if kinds["polygon"] > kinds["box"] else "box"


def claim_yolo(listing: Listing) -> Claim | None:
    kind = _yolo_kind(listing)
    return Claim("yolo", 0.85, labels="boxes") if kind == "box" else None


def claim_yolo_seg(listing: Listing) -> Claim | None:
    kind = _yolo_kind(listing)
    return Claim("yolo_seg", 0.9, labels="masks") if kind == "polygon" else None


def claim_coco(listing: Listing) -> Claim | None:
    candidates = [f for f in listing.with_ext(".json") if len(f.parts) == 1 or f.parts[0] == "annotations"]
    for json_file in candidates[:MAX_READ]:
        data = _read_json(listing.root / json_file)
        if isinstance(data, dict) and {"images", "annotations"} <= set(data):
            segmented = any(isinstance(a, dict) and a.get("segmentation") for a in data["annotations"][:200])
            return Claim("coco", 0.9, labels="masks" if segmented else "boxes")
    return None


def claim_labelme(listing: Listing) -> Claim | None:
    for json_file in listing.with_ext(".json")[:MAX_READ]:
        data = _read_json(listing.root / json_file)
        if isinstance(data, dict) and "shapes" in data and "imagePath" in data:
            return Claim("labelme", 0.9, labels="masks")
    return None


def _top_level_normals(listing: Listing) -> list[str]:
    tops = sorted({f.parts[0] for f in listing.images if len(f.parts) > 1})
    return [t for t in tops if is_normal_folder_name(t)]


def claim_mask_folder(listing: Listing) -> Claim | None:
    stems: dict[tuple, set[str]] = {}
    for image in listing.images:
        stems.setdefault((image.parent, image.stem), set()).add(image.suffix.lower())
    pairs = sum(1 for exts in stems.values() if ".png" in exts and len(exts) > 1)
    if pairs == 0:
        return None
    tops = sorted({f.parts[0] for f in listing.images if len(f.parts) > 1})
    options = {}
    prefix = os.path.commonprefix(tops) if len(tops) > 1 else ""
    if prefix.endswith("_"):
        options["class_strip_prefix"] = prefix
    return Claim("mask_folder", 0.8, options=options, labels="masks", normal_subfolders=_top_level_normals(listing))


def claim_severstal_rle(listing: Listing) -> Claim | None:
    for csv_file in [f for f in listing.with_ext(".csv") if len(f.parts) == 1]:
        header = (_first_lines(listing.root / csv_file, 1) or [""])[0]
        if "EncodedPixels" in header:
            return Claim("severstal_rle", 0.95, options={"csv": csv_file.name}, labels="masks")
    return None


def claim_class_folders(listing: Listing) -> Claim | None:
    images = listing.images
    labels = [[p for p in f.parts[:-1] if p.lower() not in SPLIT_FOLDER_NAMES] for f in images]
    if not images or not all(labels) or listing.with_ext(".xml", ".json", ".txt", ".csv"):
        return None
    classes = sorted({parts[-1] for parts in labels})
    if len(classes) < 2:
        return None
    normals = [c for c in classes if is_normal_folder_name(c)]
    notes = [f"classes from folder names: {', '.join(classes)}"]
    if normals:
        notes.append(f"normal (defect-free) folders: {', '.join(normals)}; the others are defective")
    else:
        notes.append("no ok/good/normal folder: every image is taken as defective (set options.normal_folders)")
    return Claim("class_folders", 0.6 if normals else 0.5, labels="image", notes=notes)


def claim_image_labels_csv(listing: Listing) -> Claim | None:
    for csv_file in [f for f in listing.with_ext(".csv") if len(f.parts) == 1]:
        try:
            header = next(csv.reader(_first_lines(listing.root / csv_file, 1)))
        except (StopIteration, csv.Error):
            continue
        lowered = {h.strip().lower() for h in header}
        if lowered & set(PATH_COLUMNS) and lowered & set(LABEL_COLUMNS + PROBABILITY_COLUMNS):
            return Claim("image_labels_csv", 0.8, options={"csv": csv_file.name}, labels="image")
    return None


def claim_instance_masks(listing: Listing) -> Claim | None:
    image_stems = {f.stem for f in listing.images if f.parts[0] == "images"}
    masks = [f for f in listing.images if f.parts[0] == "masks"]
    if not image_stems or not masks:
        return None
    per_instance = sum(1 for m in masks if m.stem not in image_stems and (
        m.parent.name in image_stems or any(m.stem.startswith(f"{s}_") for s in image_stems)))
    if per_instance < max(1, len(masks) // 2):
        if sum(m.stem in image_stems for m in masks) >= len(masks) // 2:  # one mask per image: mask_folder
            return Claim("mask_folder", 0.8, options={"images": "images", "mask_dir": "masks"}, labels="masks")
        return None
    return Claim("instance_masks", 0.85, labels="masks")


def claim_pixel_boxes(listing: Listing) -> Claim | None:
    image_keys = {(f.parent, f.stem) for f in listing.images}
    texts = [f for f in listing.with_ext(".txt") if (f.parent, f.stem) in image_keys]
    if not texts:
        return None
    for text in texts[:MAX_READ]:
        for line in _first_lines(listing.root / text):
            values = line.split()
            if line.startswith("#"):
                continue
            if len(values) < 5 or not _numbers(values[:4]) or _numbers(values[4:]):
                return None
    return Claim("pixel_boxes", 0.85, labels="boxes")


def claim_split_folders(listing: Listing) -> Claim | None:
    splits = sorted({f.parts[0] for f in listing.images if len(f.parts) > 2 and f.parts[1] == "images"})
    with_masks = [s for s in splits if any(f.parts[:2] == (s, "masks") for f in listing.images)]
    if not with_masks:
        return None
    return Claim("split_folders", 0.9, labels="masks", notes=[f"splits: {', '.join(splits)}"])


FORMAT_CLAIMS: dict[str, Callable[[Listing], Claim | None]] = {
    "image_folder": claim_image_folder,
    "voc": claim_voc,
    "yolo": claim_yolo,
    "coco": claim_coco,
    "mask_folder": claim_mask_folder,
    "severstal_rle": claim_severstal_rle,
    "yolo_seg": claim_yolo_seg,
    "labelme": claim_labelme,
    "class_folders": claim_class_folders,
    "image_labels_csv": claim_image_labels_csv,
    "instance_masks": claim_instance_masks,
    "pixel_boxes": claim_pixel_boxes,
    "split_folders": claim_split_folders,
}
assert set(FORMAT_CLAIMS) == set(FORMAT_ADAPTERS), "every format needs a layout claim"


def claims(root: str | os.PathLike[str]) -> list[Claim]:
    """Every format's claim on ``root``, best first (empty: no images found)."""
    listing = list_folder(Path(root))
    found = [claim for claim in (rule(listing) for rule in FORMAT_CLAIMS.values()) if claim is not None]
    return sorted(found, key=lambda c: -c.score)


def recognise(root: str | os.PathLike[str]) -> Claim | None:
    """The best claim on ``root``; None when no format sees images there."""
    found = claims(root)
    return found[0] if found else None
