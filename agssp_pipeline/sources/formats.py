"""Format adapters: one function per dataset layout, registered in ``FORMAT_ADAPTERS``.

Each adapter reads the layout and annotation files of one source and returns a ``Scan``. None opens an
image. Options (``SourceConfig.options``) per format:

image_folder  images (subfolder, default: root), split (constant split name)
voc           layouts: list of {images, annotations, split}; or images + annotations (+ split).
              Default: every pair present among IMAGES/ANNOTATIONS, Validation_Images/Validation_Annotations
              (split "validation") and JPEGImages/Annotations (VOC devkit). XML matched to images by stem.
yolo          names (list or {index: name}); else data.yaml/dataset.yaml 'names', else classes.txt, else
              ``classes``, else the index as text. Labels: the last 'images' path component replaced by
              'labels', suffix .txt (the ultralytics rule). Split from the folder next to 'images'.
coco          annotation_files: {split: path} or a list of paths (default: *.json in root/annotations and
              root); images (folder file_name is relative to, default root/images if present, else root).
mask_folder   images (default root); masks beside the images (default), or mask_dir (folder under root
              mirroring images/), or mask_subdir (a subfolder of each image folder, DAGM's Label/);
              mask_suffix (default "" -> same stem), mask_ext (default .png), mask_threshold (127),
              min_component_area (1), defect_class (fixed class name; default: first subfolder name with
              class_strip_prefix removed, e.g. "MT_"), empty_mask_is_normal / missing_mask_is_normal
              (default false: outside normal_subfolders such images get is_normal null and a flag row).
severstal_rle csv (default train.csv; the 2019 "ImageId_ClassId" layout is read too), images (default
              train_images), class_names ({ClassId: name}; default the id as text).
All formats: split (a constant split name when the layout does not give one).

is_normal semantics: True where the dataset says defect-free (an annotation file without objects, an
image in normal_subfolders, a Severstal image without rows, an empty mask with empty_mask_is_normal);
False where it has objects, mask pixels or runs (even if every box is later rejected); null where the
dataset does not say (no or unreadable annotation file, plain image folders, an empty mask in a
defect folder). Null is not "normal": KeAD's normal references use ``is_normal == True`` only.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import yaml

from agssp_pipeline.config import SOURCE_FORMATS, SourceConfig
from agssp_pipeline.sources.probe import IMAGE_EXTENSIONS
from agssp_pipeline.sources.scan import (
    RawBox,
    Scan,
    by_stem,
    is_hidden,
    list_files,
    list_images,
    make_entry,
    option,
    relative_parts,
)
from agssp_pipeline.sources.schema import ACTION_FLAGGED, KIND_IMAGE, KIND_MASK, QuarantineRow
from agssp_pipeline.sources.shapes import MaskShape

SPLIT_FOLDER_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


def _subdir(root: Path, name: str | None, default: Path | None = None) -> Path:
    return (root / name) if name else (default if default is not None else root)


def _images_dir(source: SourceConfig, root: Path, default: str | None = None) -> Path:
    """The folder of a source's images (option ``images``, default the root); missing is a clear error."""
    folder = _subdir(root, option(source, "images", default))
    if not folder.is_dir():
        raise FileNotFoundError(f"source '{source.name}': images folder {folder} does not exist")
    return folder


# --------------------------------------------------------------------------------------------- image_folder
def scan_image_folder(source: SourceConfig, root: Path) -> Scan:
    scan = Scan()
    base = _images_dir(source, root)
    for path in list_images(base):
        make_entry(scan, source, root, base, path)
    return scan


# ---------------------------------------------------------------------------------------------------- voc
DEFAULT_VOC_LAYOUTS = (
    {"images": "IMAGES", "annotations": "ANNOTATIONS", "split": None},
    {"images": "Validation_Images", "annotations": "Validation_Annotations", "split": "validation"},
    {"images": "JPEGImages", "annotations": "Annotations", "split": None},
)


def _voc_layouts(source: SourceConfig, root: Path) -> list[dict]:
    if "layouts" in source.options:
        return list(source.options["layouts"])
    if "images" in source.options or "annotations" in source.options:
        return [{"images": option(source, "images", "JPEGImages"), "annotations": option(source, "annotations", "Annotations"),
                 "split": option(source, "split")}]
    found = [layout for layout in DEFAULT_VOC_LAYOUTS if (root / layout["images"]).is_dir()]
    if not found:
        names = ", ".join(layout["images"] for layout in DEFAULT_VOC_LAYOUTS)
        raise FileNotFoundError(f"source '{source.name}': no VOC image folder ({names}) under {root}; set options.layouts")
    return found


def _voc_objects(xml_path: Path) -> list[tuple[str, float, float, float, float] | str]:
    """Objects of one VOC file; an entry is a box tuple or, for a malformed object, the reason text."""
    tree = ET.parse(xml_path)
    objects: list[tuple[str, float, float, float, float] | str] = []
    for number, obj in enumerate(tree.getroot().iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            objects.append(f"object {number}: missing name or bndbox")
            continue
        try:
            coords = [float(box.findtext(tag) or "nan") for tag in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            objects.append(f"object {number}: non-numeric bndbox")
            continue
        objects.append((name, *coords))
    return objects


def scan_voc(source: SourceConfig, root: Path) -> Scan:
    scan = Scan()
    for layout in _voc_layouts(source, root):
        images_dir, annotations_dir = root / layout["images"], root / layout["annotations"]
        if not images_dir.is_dir():
            raise FileNotFoundError(f"source '{source.name}': VOC images folder {images_dir} does not exist")
        all_images = list_images(images_dir)
        images = by_stem(all_images)
        xml_files = by_stem(list_files(annotations_dir, {".xml"})) if annotations_dir.is_dir() else {}
        for image_path in all_images:
            stem = image_path.stem
            xml_path = xml_files.get(stem)
            is_normal = None
            if xml_path is not None and images[stem] != image_path:  # annotations are matched by file stem
                reason = f"same file stem as {images[stem]}: {xml_path.name} applied to that image only"
                scan.quarantine.append(QuarantineRow(str(image_path), KIND_IMAGE, ACTION_FLAGGED, reason))
                xml_path = None
            if xml_path is not None:
                try:
                    objects = _voc_objects(xml_path)
                except (ET.ParseError, OSError) as error:
                    scan.reject(xml_path, f"unreadable VOC XML: {error}")
                    objects = None
                if objects is not None:
                    is_normal = not objects
                    for item in objects:
                        if isinstance(item, str):
                            scan.reject(xml_path, item)
                        else:
                            scan.boxes.append(RawBox(image_path, *item, origin=str(xml_path)))
            make_entry(scan, source, root, images_dir, image_path, split=layout.get("split"), is_normal=is_normal)
        for stem, xml_path in xml_files.items():
            if stem not in images:
                scan.reject(xml_path, f"annotation references a missing image '{stem}.*' in {images_dir}")
    return scan


# --------------------------------------------------------------------------------------------------- yolo
def _names_from_mapping(names) -> dict[int, str]:
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    if isinstance(names, list):
        return {i: str(v) for i, v in enumerate(names)}
    raise ValueError(f"'names' must be a list or mapping, got {type(names).__name__}")


def _yolo_names(source: SourceConfig, root: Path, scan: Scan) -> dict[int, str] | None:
    if "names" in source.options:
        return _names_from_mapping(source.options["names"])
    for file in (root / "data.yaml", root / "dataset.yaml"):
        if file.is_file():
            try:
                return _names_from_mapping((yaml.safe_load(file.read_text()) or {})["names"])
            except Exception as error:
                scan.reject(file, f"unreadable YOLO dataset YAML ({type(error).__name__}: {error}); class names not taken from it")
    for file in (root / "classes.txt", root / "labels" / "classes.txt"):
        if file.is_file():
            lines = [line.strip() for line in file.read_text(errors="replace").splitlines()]
            return {i: name for i, name in enumerate(line for line in lines if line)}
    if source.classes:
        return dict(enumerate(source.classes))
    return None


def _yolo_label_path(image_path: Path, images_name: str, labels_name: str) -> Path | None:
    parts = list(image_path.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == images_name:
            parts[i] = labels_name
            return Path(*parts).with_suffix(".txt")
    return None


def _yolo_split(rel: tuple[str, ...], images_name: str) -> str | None:
    if images_name in rel:
        i = rel.index(images_name)
        for candidate in (rel[i + 1] if i + 1 < len(rel) - 1 else None, rel[i - 1] if i > 0 else None):
            if candidate and candidate.lower() in SPLIT_FOLDER_NAMES:
                return candidate
    return None


def scan_yolo(source: SourceConfig, root: Path, segments: bool = False) -> Scan:
    """YOLO detection labels; with ``segments`` (yolo_seg) every object also becomes a mask shape."""
    scan = Scan()
    images_name, labels_name = option(source, "images", "images"), option(source, "labels", "labels")
    names = _yolo_names(source, root, scan)
    images = [p for p in list_images(root) if images_name in relative_parts(p, root)]
    if not images:
        raise FileNotFoundError(f"source '{source.name}': no images under a '{images_name}' folder in {root}")
    used_labels: set[Path] = set()
    for image_path in images:
        label_path = _yolo_label_path(image_path, images_name, labels_name)
        used_labels.add(label_path)
        is_normal = None
        shapes: list[MaskShape] = []
        if label_path is not None and label_path.is_file():
            try:
                lines = label_path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as error:
                scan.reject(label_path, f"unreadable YOLO label file: {error}")
                lines = None
            if lines is not None:
                rows = [(n, line.split()) for n, line in enumerate(lines, start=1) if line.strip()]
                is_normal = not rows
                for number, values in rows:
                    shape = _yolo_box(scan, image_path, label_path, number, values, names)
                    if segments and shape is not None:
                        shapes.append(shape)
        split = option(source, "split") or _yolo_split(relative_parts(image_path, root), images_name)
        make_entry(scan, source, root, root, image_path, split=split, is_normal=is_normal, shapes=shapes)
    for label_path in list_files(root, {".txt"}):
        parts = relative_parts(label_path, root)
        if labels_name in parts[:-1] and label_path not in used_labels and label_path.name != "classes.txt":
            scan.reject(label_path, f"label file references a missing image '{label_path.stem}.*'")
    return scan


def scan_yolo_seg(source: SourceConfig, root: Path) -> Scan:
    """YOLO-seg: polygon lines give a box (their bounds) and a mask; plain box lines are drawn as rectangles."""
    return scan_yolo(source, root, segments=True)


def _yolo_box(scan: Scan, image_path: Path, label_path: Path, number: int, values: list[str],
              names: dict[int, str] | None) -> MaskShape | None:
    """Append the line's box; return its region (polygon, or the box as a rectangle) for yolo_seg."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        scan.reject(label_path, f"line {number}: non-numeric values")
        return
    if not all(math.isfinite(v) for v in numbers):
        scan.reject(label_path, f"line {number}: non-finite value (nan or inf) in {' '.join(values)!r}")
        return
    if len(numbers) < 5 or (len(numbers) > 5 and len(numbers) % 2 == 0):
        scan.reject(label_path, f"line {number}: expected 'class cx cy w h' or a polygon, got {len(numbers)} values")
        return
    index = int(numbers[0])
    if index != numbers[0] or index < 0 or (names is not None and index not in names):
        scan.reject(label_path, f"line {number}: unknown class index {values[0]}")
        return
    class_name = names[index] if names is not None else str(index)
    if len(numbers) == 5:
        cx, cy, w, h = numbers[1:]
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        polygon = (box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3])
    else:  # segmentation polygon: its bounding box
        xs, ys = numbers[1::2], numbers[2::2]
        box = (min(xs), min(ys), max(xs), max(ys))
        polygon = tuple(numbers[1:])
    scan.boxes.append(RawBox(image_path, class_name, *box, origin=str(label_path), normalized=True))
    return MaskShape(class_name, str(label_path), polygon=polygon, normalized=True)


# --------------------------------------------------------------------------------------------------- coco
def _coco_files(source: SourceConfig, root: Path) -> list[tuple[str | None, Path]]:
    given = source.options.get("annotation_files")
    if isinstance(given, dict):
        return [(split, root / path) for split, path in given.items()]
    if isinstance(given, list | str):
        return [(None, root / path) for path in ([given] if isinstance(given, str) else given)]
    found = sorted((root / "annotations").glob("*.json")) if (root / "annotations").is_dir() else []
    found += sorted(root.glob("*.json"))
    if not found:
        raise FileNotFoundError(f"source '{source.name}': no COCO JSON in {root}/annotations or {root}; set options.annotation_files")
    return [(_split_from_name(path.stem), path) for path in found]


def _split_from_name(stem: str) -> str | None:
    lowered = stem.lower()
    for split in ("train", "val", "test"):
        if split in lowered:
            return split
    return None


def scan_coco(source: SourceConfig, root: Path) -> Scan:
    scan = Scan()
    images_dir = _subdir(root, option(source, "images"), root / "images" if (root / "images").is_dir() else root)
    on_disk = list_images(images_dir)
    by_relative = {p.relative_to(images_dir).as_posix(): p for p in on_disk}
    by_name = {}
    for path in on_disk:
        by_name.setdefault(path.name, path)
    known: dict[Path, dict] = {}  # image path -> {"split", "is_normal"}
    shapes: dict[Path, list[MaskShape]] = {}
    for split, json_path in _coco_files(source, root):
        try:
            data = json.loads(json_path.read_text())
            categories = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
            records = _coco_image_records(scan, json_path, data["images"])
            annotations = list(data.get("annotations", []))
        except Exception as error:
            scan.reject(json_path, f"unreadable COCO JSON ({type(error).__name__}: {error}); expected an object "
                        "with 'images' [{id, file_name}], 'annotations' [{image_id, category_id, bbox}] "
                        "and 'categories' [{id, name}]")
            continue
        resolved: dict[int, Path] = {}
        for image_key, file_name in records.items():
            path = _coco_resolve(file_name, split, by_relative, by_name)
            if path is None:
                scan.reject(json_path, f"annotation references a missing image '{file_name}' (id {image_key})")
                continue
            resolved[image_key] = path
            known.setdefault(path, {"split": option(source, "split") or split, "objects": 0})
        for number, ann in enumerate(annotations, start=1):
            if not isinstance(ann, dict):
                scan.reject(json_path, f"annotation {number} is not an object: {str(ann)[:80]!r}")
                continue
            image_key, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
            if image_key not in resolved:
                if image_key not in records:
                    scan.reject(json_path, f"annotation {ann.get('id', number)} references unknown image id {image_key}")
                continue  # missing file already reported once
            known[resolved[image_key]]["objects"] += 1
            if category_id not in categories:
                scan.reject(json_path, f"annotation {ann.get('id', number)}: unknown category id {category_id}")
                continue
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError):
                scan.reject(json_path, f"annotation {ann.get('id', number)}: bbox must be 4 numbers, got {bbox!r}")
                continue
            scan.boxes.append(RawBox(resolved[image_key], categories[category_id], x, y, x + w, y + h, origin=str(json_path)))
            shapes.setdefault(resolved[image_key], []).extend(
                _coco_shapes(scan, json_path, ann, categories[category_id], ann.get("id", number)))
    for path in on_disk:
        info = known.get(path)
        is_normal = None if info is None else info["objects"] == 0
        split = info["split"] if info else option(source, "split")
        make_entry(scan, source, root, images_dir, path, split=split, is_normal=is_normal, shapes=shapes.get(path, []))
    return scan


def _coco_shapes(scan: Scan, json_path: Path, ann: dict, class_name: str, ann_id) -> list[MaskShape]:
    """An annotation's segmentation: polygons (a list of x,y lists) or RLE (uncompressed or compressed)."""
    segmentation = ann.get("segmentation")
    if segmentation in (None, [], {}):
        return []
    if isinstance(segmentation, dict):
        return [MaskShape(class_name, str(json_path), rle=segmentation)]
    if isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation):
        polygons = []
        for part in segmentation:
            try:
                polygons.append(MaskShape(class_name, str(json_path), polygon=tuple(float(v) for v in part)))
            except (TypeError, ValueError):
                scan.reject(json_path, f"annotation {ann_id}: non-numeric segmentation polygon; its mask part is not used")
        return polygons
    scan.reject(json_path, f"annotation {ann_id}: segmentation must be polygons [[x, y, ...]] or RLE "
                f"{{size, counts}}, got {str(segmentation)[:60]!r}; box kept, no mask")
    return []


def _coco_image_records(scan: Scan, json_path: Path, images: list) -> dict[int, str]:
    """image id -> file_name; malformed entries and ids used twice get a row (their boxes are not used)."""
    records: dict[int, str] = {}
    duplicated: set[int] = set()
    malformed: list[str] = []
    for number, record in enumerate(images, start=1):
        try:
            image_key, file_name = int(record["id"]), str(record["file_name"])
        except (TypeError, KeyError, ValueError):
            malformed.append(f"image entry {number} needs an integer 'id' and a 'file_name': {str(record)[:80]!r}")
            continue
        if image_key in records:
            duplicated.add(image_key)
            scan.reject(json_path, f"image id {image_key} is used twice ('{records[image_key]}' and '{file_name}'): "
                        "its annotations cannot be assigned and are not used")
            continue
        records[image_key] = file_name
    if malformed and not records and not duplicated:
        raise ValueError(f"no image entry has an integer 'id' and a 'file_name' (first: {malformed[0]})")
    for reason in malformed:
        scan.reject(json_path, reason)
    for image_key in duplicated:
        records.pop(image_key)
    return records


def _coco_resolve(file_name: str, split: str | None, by_relative: dict[str, Path],
                  by_name: dict[str, Path]) -> Path | None:
    """The image a COCO file_name names: relative path first, then by base name unless it leaves the folder."""
    for candidate in (file_name, f"{split}/{file_name}" if split else None):
        if candidate in by_relative:
            return by_relative[candidate]
    posix = PurePosixPath(file_name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:
        return None  # '../x.jpg' is another folder's x.jpg, not ours
    return by_name.get(posix.name)


# -------------------------------------------------------------------------------------------- mask_folder
def scan_mask_folder(source: SourceConfig, root: Path) -> Scan:
    scan = Scan()
    images_dir = _images_dir(source, root)
    mask_dir_name, mask_subdir = option(source, "mask_dir"), option(source, "mask_subdir")
    mask_dir = root / mask_dir_name if mask_dir_name else None
    suffix, mask_ext = option(source, "mask_suffix", ""), option(source, "mask_ext", ".png")
    fixed_class, strip_prefix = option(source, "defect_class"), option(source, "class_strip_prefix", "")
    files = list_images(images_dir, exclude=[mask_dir] if mask_dir else ())
    if mask_subdir:  # DAGM: <folder>/Label/<stem>_label.PNG beside <folder>/<stem>.PNG
        files = [p for p in files if mask_subdir not in relative_parts(p, images_dir)[:-1]]
    stems_by_folder: dict[tuple[Path, str], list[Path]] = {}
    for path in files:
        stems_by_folder.setdefault((path.parent, path.stem), []).append(path)

    def is_mask_beside(path: Path) -> bool:
        if mask_dir is not None or mask_subdir or path.suffix.lower() != mask_ext.lower():
            return False
        if suffix:
            return path.stem.endswith(suffix)
        return any(other.suffix.lower() != mask_ext.lower() for other in stems_by_folder[(path.parent, path.stem)])

    def mask_of(path: Path) -> Path:
        name = f"{path.stem}{suffix}{mask_ext}"
        if mask_dir is not None:
            return mask_dir / path.relative_to(images_dir).parent / name
        return path.parent / mask_subdir / name if mask_subdir else path.parent / name

    # folders where masks lie beside images (some stem has both): there a lone mask-type file is a mask
    # whose image is gone, not an image
    paired = {folder for (folder, _), paths in stems_by_folder.items()
              if len(paths) > 1 and any(p.suffix.lower() == mask_ext.lower() for p in paths)}
    beside = mask_dir is None and not mask_subdir
    used_masks: set[Path] = set()
    for path in files:
        if is_mask_beside(path):
            continue
        if (beside and not suffix and path.suffix.lower() == mask_ext.lower() and path.parent in paired
                and len(stems_by_folder[(path.parent, path.stem)]) == 1):
            scan.reject(path, "mask without its image (images and masks lie side by side in this folder and no "
                        f"image has the stem '{path.stem}'): not indexed", KIND_IMAGE)
            continue
        mask_path = mask_of(path)
        # a lone PNG is an image without a mask, never its own ground truth
        has_mask = mask_path != path and mask_path.is_file()
        if has_mask:
            used_masks.add(mask_path)
        rel = relative_parts(path, images_dir)
        mask_class = fixed_class or (rel[0].removeprefix(strip_prefix) if len(rel) > 1 else source.category or source.name)
        is_normal = True if (not has_mask and option(source, "missing_mask_is_normal", False)) else None
        make_entry(scan, source, root, images_dir, path, mask_path=mask_path if has_mask else None,
                   mask_class=mask_class, is_normal=is_normal)
    for path in files:
        if beside and suffix and is_mask_beside(path) and path not in used_masks:
            scan.reject(path, f"mask without its image (no image '{path.stem.removesuffix(suffix)}.*' beside it)")
    return scan


# ----------------------------------------------------------------------------------------- severstal_rle
def scan_severstal_rle(source: SourceConfig, root: Path) -> Scan:
    scan = Scan()
    csv_path = root / option(source, "csv", "train.csv")
    images_dir = _images_dir(source, root, "train_images")
    class_names = {str(k): str(v) for k, v in (option(source, "class_names") or {}).items()}
    images = list_images(images_dir)
    by_name = {p.name: p for p in images}
    runs: dict[str, list[tuple[str, str, str]]] = {}
    rows = _read_rle_rows(scan, csv_path)
    for image_name, class_id, encoded in rows or []:
        if image_name not in by_name:
            scan.reject(csv_path, f"row references a missing image '{image_name}'")
            continue
        if encoded.strip():
            runs.setdefault(image_name, []).append((class_names.get(class_id, class_id), encoded, str(csv_path)))
    labelled = rows is not None
    for path in images:
        entry_runs = runs.get(path.name, [])
        make_entry(scan, source, root, images_dir, path, rle=entry_runs,
                   is_normal=(not entry_runs) if labelled else None)
    return scan


def csv_rows(scan: Scan, csv_path: Path, lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each data line, parsed one line at a time: a line that does not parse
    (e.g. an unterminated quote) gets a row and is skipped instead of swallowing the rest of the file."""
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            yield number, next(csv.reader([line], strict=True))
        except csv.Error as error:
            scan.reject(csv_path, f"line {number}: {error}; line skipped")


def _read_rle_rows(scan: Scan, csv_path: Path) -> list[tuple[str, str, str]] | None:
    """(ImageId, ClassId, EncodedPixels) rows; a bad line gets a row naming it and the others are kept.

    Lines are parsed one at a time (the format has no multi-line fields), so one unterminated quote costs
    one line, not the whole file; a repeated row is reported and read once. None: no usable CSV at all.
    """
    try:
        lines = csv_path.read_text(errors="replace").splitlines()
        header = next(csv.reader([lines[0]])) if lines else []
    except (OSError, csv.Error) as error:
        scan.reject(csv_path, f"unreadable run-length CSV ({type(error).__name__}: {error}); images indexed without labels")
        return None
    legacy = "ImageId_ClassId" in header
    wanted = ["ImageId_ClassId", "EncodedPixels"] if legacy else ["ImageId", "ClassId", "EncodedPixels"]
    missing = [column for column in wanted if column not in header]
    if missing:
        scan.reject(csv_path, f"run-length CSV lacks column(s) {missing} (header: {header}); expected "
                    "ImageId,ClassId,EncodedPixels; images indexed without labels")
        return None
    positions = [header.index(column) for column in wanted]
    rows: list[tuple[str, str, str]] = []
    seen: dict[tuple[str, str, str], int] = {}
    for number, fields in csv_rows(scan, csv_path, lines):
        if len(fields) != len(header):
            scan.reject(csv_path, f"line {number}: {len(fields)} fields, the header has {len(header)}; line skipped")
            continue
        picked = [fields[i].strip() for i in positions]
        row = (*picked[0].rsplit("_", 1), picked[1]) if legacy else tuple(picked)
        if len(row) != 3:
            scan.reject(csv_path, f"line {number}: ImageId_ClassId '{picked[0]}' has no '_<class>' part")
            continue
        if row in seen:
            scan.reject(csv_path, f"line {number}: repeats line {seen[row]}; read once")
            continue
        seen[row] = number
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ labelme
def _labelme_shape(scan: Scan, json_path: Path, number: int, shape) -> tuple[str, tuple[float, ...]] | None:
    """(label, polygon in pixels) of one labelme shape; a row naming the shape for what has no area."""
    if not isinstance(shape, dict):
        scan.reject(json_path, f"shape {number} is not an object")
        return None
    label, kind = str(shape.get("label") or "").strip(), shape.get("shape_type") or "polygon"
    try:
        points = [(float(x), float(y)) for x, y in shape.get("points") or []]
    except (TypeError, ValueError):
        scan.reject(json_path, f"shape {number} ({label or 'no label'}): points must be [x, y] pairs")
        return None
    if not label:
        scan.reject(json_path, f"shape {number}: no label")
        return None
    if kind == "rectangle" and len(points) == 2:
        (x1, y1), (x2, y2) = points
        x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
        return label, (x1, y1, x2, y1, x2, y2, x1, y2)
    if kind == "circle" and len(points) == 2:
        (cx, cy), (px, py) = points
        radius = math.hypot(px - cx, py - cy)
        angles = [2 * math.pi * i / 32 for i in range(32)]
        return label, tuple(v for a in angles for v in (cx + radius * math.cos(a), cy + radius * math.sin(a)))
    if kind == "polygon" and len(points) >= 3:
        return label, tuple(v for point in points for v in point)
    scan.reject(json_path, f"shape {number} ({label}): shape_type '{kind}' with {len(points)} point(s) has no "
                "area (polygon >= 3 points, rectangle or circle = 2); not used")
    return None


def _read_labelme(scan: Scan, json_path: Path) -> dict | None:
    try:
        data = json.loads(json_path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            raise ValueError("no 'shapes' list")
        return data
    except (OSError, ValueError) as error:
        scan.reject(json_path, f"unreadable labelme JSON ({error}); expected an object with 'shapes' "
                    "[{label, points, shape_type}] and 'imagePath'")
        return None


def scan_labelme(source: SourceConfig, root: Path) -> Scan:
    """labelme JSON beside (or mirrored under ``annotations``) each image: polygons -> boxes and masks."""
    scan = Scan()
    images_dir = _images_dir(source, root)
    annotations_dir = _subdir(root, option(source, "annotations"), images_dir)
    images = list_images(images_dir)
    by_location = {(p.relative_to(images_dir).parent, p.stem): p for p in images}
    found: dict[Path, tuple[Path, dict]] = {}
    on_disk = set(images)
    for json_path in list_files(annotations_dir, {".json"}):
        data = _read_labelme(scan, json_path)
        if data is None:
            continue
        named = Path(os.path.normpath(json_path.parent / str(data.get("imagePath") or "").replace("\\", "/")))
        image = named if named in on_disk else by_location.get(
            (json_path.relative_to(annotations_dir).parent, json_path.stem))
        if image is None:
            scan.reject(json_path, f"labelme file names image '{data.get('imagePath')}', which is not in {images_dir} "
                        "(an image only embedded as imageData is not extracted)")
            continue
        found[image] = (json_path, data)
    for image in images:
        if image not in found:
            make_entry(scan, source, root, images_dir, image)
            continue
        json_path, data = found[image]
        shapes = []
        for number, raw in enumerate(data["shapes"], start=1):
            parsed = _labelme_shape(scan, json_path, number, raw)
            if parsed is not None:
                label, polygon = parsed
                xs, ys = polygon[0::2], polygon[1::2]
                scan.boxes.append(RawBox(image, label, min(xs), min(ys), max(xs), max(ys), origin=str(json_path)))
                shapes.append(MaskShape(label, str(json_path), polygon=polygon))
        make_entry(scan, source, root, images_dir, image, is_normal=not data["shapes"], shapes=shapes)
    return scan


# ------------------------------------------------------------------------------------------ class_folders
NORMAL_FOLDER_TOKENS = frozenset({"ok", "good", "normal", "free", "defectfree", "nodefect", "negative", "pass"})


def is_normal_folder_name(name: str, normal_folders: list[str] | None = None) -> bool:
    """``normal_folders`` (exact, case-insensitive) when given; else the first word is ok/good/normal/free...

    ``ok_front``, ``good``, ``MT_Free`` (last word) and ``defect-free`` count; ``not_ok`` and ``def_front`` do not.
    """
    if normal_folders is not None:
        return name.lower() in {n.lower() for n in normal_folders}
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    joined = "".join(words)
    return bool(words) and (words[0] in NORMAL_FOLDER_TOKENS or words[-1] == "free" or joined in NORMAL_FOLDER_TOKENS)


def scan_class_folders(source: SourceConfig, root: Path) -> Scan:
    """Folder name = image-level label (or category); split folders (train/test...) are read as the split."""
    scan = Scan()
    base = _images_dir(source, root)
    folder_is, normal_folders = option(source, "folder_is", "class"), option(source, "normal_folders")
    if folder_is not in ("class", "category"):
        raise ValueError(f"source '{source.name}': options.folder_is must be 'class' or 'category', got {folder_is!r}")
    for path in list_images(base):
        folders = relative_parts(path, base)[:-1]
        labels = [f for f in folders if f.lower() not in SPLIT_FOLDER_NAMES]
        splits = [f for f in folders if f.lower() in SPLIT_FOLDER_NAMES]
        if not labels:
            scan.reject(path, f"class_folders: the image lies in no class folder under {base}", KIND_IMAGE)
            continue
        category = labels[-1] if folder_is == "category" else source.category
        if category is None:  # folder_is class with category_from: the folder above the class folder
            if len(labels) < 2:
                scan.reject(path, "category_from=subfolder needs a category folder above the class folder "
                            f"'{labels[-1]}' (or set category)", KIND_IMAGE)
                continue
            category = labels[0]
        entry = make_entry(scan, source, root, base, path, category=category,
                           split=option(source, "split") or (splits[0] if splits else None),
                           is_normal=is_normal_folder_name(labels[-1], normal_folders))
        if entry is not None and entry.in_normal_folder:
            entry.is_normal = True
    return scan


# --------------------------------------------------------------------------------------- image_labels_csv
PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_path", "image_name", "name")
LABEL_COLUMNS = ("label", "class", "class_name", "target", "defect", "is_defective", "status")
PROBABILITY_COLUMNS = ("probability", "prob", "p_defect", "defect_probability", "score")
NORMAL_LABELS = ("ok", "good", "normal", "0", "false", "no", "negative", "pass", "defect_free", "free")


def _csv_file(source: SourceConfig, root: Path) -> Path:
    given = option(source, "csv")
    if given:
        return root / given
    found = sorted(root.glob("*.csv"))
    if len(found) != 1:
        raise FileNotFoundError(f"source '{source.name}': {len(found)} CSV files in {root} "
                                f"({', '.join(p.name for p in found) or 'none'}); set options.csv")
    return found[0]


def _pick_column(header: list[str], given: str | None, candidates: tuple[str, ...]) -> str | None:
    if given:
        return given if given in header else None
    lowered = {h.strip().lower(): h for h in header}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _csv_verdict(row: dict, label_col: str | None, prob_col: str | None, normal: set[str],
                 threshold: float) -> bool | str:
    """is_normal of one row, or the reason it cannot be read."""
    if prob_col is not None and (row.get(prob_col) or "").strip():
        try:
            probability = float(row[prob_col])
        except ValueError:
            return f"{prob_col} {row[prob_col]!r} is not a number"
        if not 0.0 <= probability <= 1.0:
            return f"{prob_col} {probability:g} is outside [0, 1] (it is the probability of a defect)"
        return probability < threshold
    value = (row.get(label_col) or "").strip() if label_col else ""
    if not value:
        return f"no {label_col or prob_col} value"
    return value.lower() in normal


def scan_image_labels_csv(source: SourceConfig, root: Path) -> Scan:
    """A CSV of image path + label (normal names in normal_labels) or defect probability (>= threshold)."""
    scan = Scan()
    csv_path = _csv_file(source, root)
    images_dir = _subdir(root, option(source, "images"))
    lines = csv_path.read_text(errors="replace").splitlines()
    header = next(csv.reader([lines[0]])) if lines else []
    path_col = _pick_column(header, option(source, "path_column"), PATH_COLUMNS)
    label_col = _pick_column(header, option(source, "label_column"), LABEL_COLUMNS)
    prob_col = _pick_column(header, option(source, "probability_column"), PROBABILITY_COLUMNS)
    if path_col is None or (label_col is None and prob_col is None):
        raise ValueError(f"source '{source.name}': {csv_path} header {header} needs a path column ({', '.join(PATH_COLUMNS)}) "
                         f"and a label ({', '.join(LABEL_COLUMNS)}) or probability column; set options.path_column / "
                         "label_column / probability_column")
    normal = {str(v).lower() for v in option(source, "normal_labels", NORMAL_LABELS)}
    threshold = float(option(source, "threshold", 0.5))
    images = list_images(images_dir)
    by_relative = {p.relative_to(images_dir).as_posix(): p for p in images}
    verdicts: dict[Path, tuple[bool, int]] = {}
    for number, fields in csv_rows(scan, csv_path, lines):
        row = dict(zip(header, fields, strict=False))
        name = (row.get(path_col) or "").strip().replace("\\", "/")
        image = by_relative.get(name.removeprefix("./"))
        if image is None:
            scan.reject(csv_path, f"line {number}: {path_col} '{name}' is not an image under {images_dir}")
            continue
        verdict = _csv_verdict(row, label_col, prob_col, normal, threshold)
        if isinstance(verdict, str):
            scan.reject(csv_path, f"line {number} ({name}): {verdict}; image indexed without a label")
        elif image in verdicts and verdicts[image][0] != verdict:
            scan.reject(csv_path, f"line {number} ({name}): contradicts line {verdicts[image][1]}; the first is kept")
        else:
            verdicts.setdefault(image, (verdict, number))
    for image in images:
        is_normal = verdicts[image][0] if image in verdicts else None
        make_entry(scan, source, root, images_dir, image, is_normal=is_normal)
    return scan


# ----------------------------------------------------------------------------------------- instance_masks
def _instance_owner(mask: Path, masks_dir: Path, stems: dict[tuple[str, ...], set[str]]) -> tuple[tuple, str, str] | None:
    """(image folder parts, image stem, the name's remainder) for a mask: masks/<stem>/<any> or <stem>_<any>."""
    parts = relative_parts(mask, masks_dir)
    folder = parts[:-1]
    if folder and folder[-1] in stems.get(folder[:-1], set()):
        return folder[:-1], folder[-1], mask.stem
    name = mask.stem
    for i in range(len(name) - 1, 0, -1):  # longest image stem first
        if name[i] == "_" and name[:i] in stems.get(folder, set()):
            return folder, name[:i], name[i + 1:]
    return None


def _instance_class(remainder: str, fixed: str | None, fallback: str) -> str:
    """defect_class, else the mask name's words without the instance number (img_3_scratch_2 -> scratch)."""
    if fixed:
        return fixed
    words = [w for w in remainder.split("_") if w and not w.isdigit()]
    return "_".join(words) or fallback


def scan_instance_masks(source: SourceConfig, root: Path) -> Scan:
    """One binary mask file per defect instance under ``masks``; each gives one box, all of them one mask."""
    scan = Scan()
    images_dir = _subdir(root, option(source, "images"), root / "images" if (root / "images").is_dir() else root)
    masks_dir = root / option(source, "masks", "masks")
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"source '{source.name}': instance mask folder {masks_dir} does not exist")
    images = list_images(images_dir, exclude=[masks_dir])
    stems: dict[tuple[str, ...], set[str]] = {}
    for image in images:
        stems.setdefault(relative_parts(image, images_dir)[:-1], set()).add(image.stem)
    by_key = {(relative_parts(p, images_dir)[:-1], p.stem): p for p in images}
    shapes: dict[Path, list[MaskShape]] = {}
    for mask in list_files(masks_dir, {option(source, "mask_ext", ".png")}):
        owner = _instance_owner(mask, masks_dir, stems)
        if owner is None:
            scan.reject(mask, "instance mask matches no image (expected masks/<image stem>_<n>.png or "
                        "masks/<image stem>/<n>.png)", KIND_MASK)
            continue
        image = by_key[owner[:2]]
        class_name = _instance_class(owner[2], option(source, "defect_class"), source.category or source.name)
        shapes.setdefault(image, []).append(MaskShape(class_name, str(mask), mask_file=mask))
    missing_normal = bool(option(source, "missing_mask_is_normal", False))
    for image in images:
        found = shapes.get(image, [])
        make_entry(scan, source, root, images_dir, image, shapes=found,
                   is_normal=None if found else (True if missing_normal else None))
    return scan


# ------------------------------------------------------------------------------------------- pixel_boxes
def _pixel_box_line(scan: Scan, image: Path, txt: Path, number: int, line: str) -> bool:
    """One 'x1 y1 x2 y2 class' line into a box (the class may contain spaces); False when rejected."""
    values = line.split()
    if len(values) < 5:
        scan.reject(txt, f"line {number}: expected 'x1 y1 x2 y2 class', got {len(values)} value(s)")
        return False
    try:
        coords = [float(v) for v in values[:4]]
    except ValueError:
        scan.reject(txt, f"line {number}: x1 y1 x2 y2 must be numbers, got {' '.join(values[:4])!r}")
        return False
    if not all(math.isfinite(v) for v in coords):
        scan.reject(txt, f"line {number}: non-finite coordinate")
        return False
    scan.boxes.append(RawBox(image, " ".join(values[4:]), *coords, origin=str(txt)))
    return True


def scan_pixel_boxes(source: SourceConfig, root: Path) -> Scan:
    """Plain-text pixel boxes: ``<stem>.txt`` beside each image (or mirrored under ``labels``)."""
    scan = Scan()
    images_dir = _images_dir(source, root)
    labels_dir = _subdir(root, option(source, "labels"), images_dir)
    ext = option(source, "label_ext", ".txt")
    used: set[Path] = set()
    for image in list_images(images_dir):
        txt = labels_dir / image.relative_to(images_dir).parent / f"{image.stem}{ext}"
        is_normal = None
        if txt.is_file():
            used.add(txt)
            try:
                lines = txt.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as error:
                scan.reject(txt, f"unreadable box file: {error}")
                lines = None
            if lines is not None:
                rows = [(n, line) for n, line in enumerate(lines, start=1) if line.strip() and not line.startswith("#")]
                is_normal = not rows
                for number, line in rows:
                    _pixel_box_line(scan, image, txt, number, line)
        make_entry(scan, source, root, images_dir, image, is_normal=is_normal)
    for txt in list_files(labels_dir, {ext}):
        if txt not in used and txt.name != "classes.txt":
            scan.reject(txt, f"box file references a missing image '{txt.stem}.*'")
    return scan


# ----------------------------------------------------------------------------------------- split_folders
MASK_FOLDER_PASSTHROUGH = ("mask_suffix", "mask_ext", "mask_threshold", "min_component_area", "defect_class",
                           "empty_mask_is_normal", "missing_mask_is_normal")


def scan_split_folders(source: SourceConfig, root: Path) -> Scan:
    """``<split>/images`` + ``<split>/masks`` (same stems) for every split folder: mask_folder per split."""
    images_name, masks_name = option(source, "images", "images"), option(source, "masks", "masks")
    splits = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p.name) and (p / images_name).is_dir())
    if not splits:
        raise FileNotFoundError(f"source '{source.name}': no <split>/{images_name} folder under {root}")
    scan = Scan()
    suffix, mask_ext = option(source, "mask_suffix", ""), option(source, "mask_ext", ".png")
    for split in splits:
        options = {k: v for k, v in source.options.items() if k in MASK_FOLDER_PASSTHROUGH}
        options.update(images=f"{split}/{images_name}", mask_dir=f"{split}/{masks_name}", split=split)
        part = scan_mask_folder(source.model_copy(update={"options": options}), root)
        scan.entries += part.entries
        scan.boxes += part.boxes
        scan.quarantine += part.quarantine
        used = {entry.mask_path for entry in part.entries if entry.mask_path is not None}
        masks_dir = root / split / masks_name
        for mask in list_files(masks_dir, {mask_ext}) if masks_dir.is_dir() else []:
            if mask not in used:
                scan.reject(mask, f"mask without its image (no '{mask.stem.removesuffix(suffix)}.*' in "
                            f"{split}/{images_name})", KIND_MASK)
    return scan


FormatAdapter = Callable[[SourceConfig, Path], Scan]

FORMAT_ADAPTERS: dict[str, FormatAdapter] = {
    "image_folder": scan_image_folder,
    "voc": scan_voc,
    "yolo": scan_yolo,
    "coco": scan_coco,
    "mask_folder": scan_mask_folder,
    "severstal_rle": scan_severstal_rle,
    "yolo_seg": scan_yolo_seg,
    "labelme": scan_labelme,
    "class_folders": scan_class_folders,
    "image_labels_csv": scan_image_labels_csv,
    "instance_masks": scan_instance_masks,
    "pixel_boxes": scan_pixel_boxes,
    "split_folders": scan_split_folders,
}
assert set(FORMAT_ADAPTERS) == set(SOURCE_FORMATS), "every configured format needs an adapter"

# image files the pipeline cannot decode: each gets a quarantine row instead of vanishing from the count
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({
    ".gif", ".svg", ".psd", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".exr", ".ico",
    ".dng", ".cr2", ".nef", ".arw", ".raw",
})


def scan_source(source: SourceConfig, root: Path) -> Scan:
    """The source's adapter, plus a row for every image file in a format the pipeline does not read
    and for every image behind a symlink that leaves the source's root (unless the source allows them)."""
    scan = FORMAT_ADAPTERS[source.format](source, root)
    for path in list_files(root, UNSUPPORTED_IMAGE_EXTENSIONS):
        scan.reject(path, f"unsupported image format '{path.suffix.lower()}' (supported: "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}); convert it to PNG, JPEG or TIFF", KIND_IMAGE)
    if not option(source, "follow_external_symlinks", False):
        _drop_external_symlinks(scan, root)
    return scan


def _drop_external_symlinks(scan: Scan, root: Path) -> None:
    """Images (and masks) that resolve outside the root are another folder's files: quarantine, never index."""
    real_root = root.resolve()

    def leaves_root(path: Path | None) -> bool:
        return path is not None and not path.resolve().is_relative_to(real_root)

    kept = []
    for entry in scan.entries:
        if leaves_root(entry.path) or leaves_root(entry.mask_path):
            outside = entry.path if leaves_root(entry.path) else entry.mask_path
            scan.reject(entry.path, f"symlink leaves the source root: {outside} -> {outside.resolve()} "
                        "(set options.follow_external_symlinks: true to index it)", KIND_IMAGE)
        else:
            kept.append(entry)
    dropped = {entry.path for entry in scan.entries} - {entry.path for entry in kept}
    scan.entries = kept
    scan.boxes = [box for box in scan.boxes if box.image_path not in dropped]

# options read outside the adapters: the sensor (settle_seconds) and the quarantine-rate check
COMMON_OPTIONS = frozenset({"split", "settle_seconds", "max_quarantine_rate", "follow_external_symlinks"})
FORMAT_OPTIONS: dict[str, frozenset[str]] = {
    "image_folder": frozenset({"images"}),
    "voc": frozenset({"layouts", "images", "annotations"}),
    "yolo": frozenset({"images", "labels", "names"}),
    "coco": frozenset({"annotation_files", "images"}),
    "mask_folder": frozenset({"images", "mask_dir", "mask_subdir", "mask_suffix", "mask_ext", "mask_threshold",
                              "min_component_area", "defect_class", "class_strip_prefix", "empty_mask_is_normal",
                              "missing_mask_is_normal"}),
    "severstal_rle": frozenset({"csv", "images", "class_names"}),
    "yolo_seg": frozenset({"images", "labels", "names"}),
    "labelme": frozenset({"images", "annotations"}),
    "class_folders": frozenset({"images", "folder_is", "normal_folders"}),
    "image_labels_csv": frozenset({"csv", "images", "path_column", "label_column", "probability_column",
                                   "normal_labels", "threshold"}),
    "instance_masks": frozenset({"images", "masks", "mask_ext", "mask_threshold", "defect_class",
                                 "missing_mask_is_normal"}),
    "pixel_boxes": frozenset({"images", "labels", "label_ext"}),
    "split_folders": frozenset({"images", "masks", *MASK_FOLDER_PASSTHROUGH}),
}


def check_options(source: SourceConfig) -> None:
    """A misspelt option would silently fall back to a default and index the wrong files: refuse it."""
    accepted = FORMAT_OPTIONS[source.format] | COMMON_OPTIONS
    unknown = sorted(set(source.options) - accepted)
    if unknown:
        raise ValueError(f"source '{source.name}' ({source.format}): unknown option(s) {unknown}; "
                         f"accepted: {sorted(accepted)}")
