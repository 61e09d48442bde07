"""What a format adapter reports before any image is opened: candidate images, raw boxes, problems.

Adapters only read folder listings and annotation files; the expensive work (hashing, decoding,
mask reading) happens afterwards, in parallel, in ``ingest.py``. Keeping them this small is what makes
adding a format a one-function change.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from agssp_pipeline.config import SourceConfig
from agssp_pipeline.sources.probe import IMAGE_EXTENSIONS
from agssp_pipeline.sources.schema import ACTION_QUARANTINED, KIND_ANNOTATION, KIND_IMAGE, QuarantineRow
from agssp_pipeline.sources.shapes import MaskShape


@dataclass
class ImageEntry:
    """One candidate image and what its dataset says about it."""

    path: Path
    category: str
    split: str | None = None
    mask_path: Path | None = None
    mask_class: str | None = None  # class of boxes derived from the mask
    # adapter's knowledge: True (annotation file with no objects, normal folder), False (has objects)
    is_normal: bool | None = None
    in_normal_folder: bool = False
    rle: list[tuple[str, str, str]] = field(default_factory=list)  # (class_name, encoded, origin file)
    # polygons / COCO RLE / instance-mask files: rasterised by ingestion into one derived mask (shapes.py)
    shapes: list[MaskShape] = field(default_factory=list)


@dataclass
class RawBox:
    """A box as written in the annotation file; ``normalized`` (YOLO) boxes are in [0, 1] units."""

    image_path: Path
    class_name: str
    x1: float
    y1: float
    x2: float
    y2: float
    origin: str  # the annotation file, for quarantine rows
    normalized: bool = False


@dataclass
class Scan:
    entries: list[ImageEntry] = field(default_factory=list)
    boxes: list[RawBox] = field(default_factory=list)
    quarantine: list[QuarantineRow] = field(default_factory=list)

    def reject(self, path: str | Path, reason: str, kind: str = KIND_ANNOTATION) -> None:
        self.quarantine.append(QuarantineRow(str(path), kind, ACTION_QUARANTINED, reason))


def option(source: SourceConfig, key: str, default=None):
    return source.options.get(key, default)


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__MACOSX")


def list_files(folder: Path, extensions: Iterable[str] | None = None, exclude: Iterable[Path] = ()) -> list[Path]:
    """Files under ``folder`` (recursive, sorted, hidden entries skipped) with one of ``extensions``."""
    wanted = None if extensions is None else {e.lower() for e in extensions}
    excluded = {Path(p).resolve() for p in exclude}
    found: list[Path] = []
    # symlinked subfolders are not followed (a link loop on a plant share would never end); a symlinked root is
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d) and not (excluded and (here / d).resolve() in excluded))
        for name in filenames:
            if is_hidden(name):
                continue
            if wanted is None or os.path.splitext(name)[1].lower() in wanted:
                found.append(here / name)
    return sorted(found, key=str)  # the same order ingest_source uses for "first copy" decisions


def list_images(folder: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    return list_files(folder, IMAGE_EXTENSIONS, exclude)


def relative_parts(path: Path, base: Path) -> tuple[str, ...]:
    return PurePosixPath(path.relative_to(base).as_posix()).parts


def in_normal_folder(source: SourceConfig, root: Path, path: Path) -> bool:
    rel = relative_parts(path, root)
    for folder in source.normal_subfolders:
        prefix = PurePosixPath(folder.strip("/")).parts
        if rel[: len(prefix)] == prefix:
            return True
    return False


def category_of(source: SourceConfig, base: Path, path: Path) -> str | None:
    """The configured category, or the first subfolder under ``base``; None when there is none."""
    if source.category is not None:
        return source.category
    parts = relative_parts(path, base)
    return parts[0] if len(parts) > 1 else None


def make_entry(scan: Scan, source: SourceConfig, root: Path, base: Path, path: Path, *,
               category: str | None = None, **fields) -> ImageEntry | None:
    """An entry with category/normal-folder resolved, or a quarantine row when no category applies.

    ``category`` overrides the config's rule (class_folders with ``folder_is: category``)."""
    category = category or category_of(source, base, path)
    if category is None:
        scan.reject(path, f"category_from=subfolder, but the image lies directly in {base}", KIND_IMAGE)
        return None
    fields.setdefault("split", option(source, "split"))
    entry = ImageEntry(path=path, category=category, in_normal_folder=in_normal_folder(source, root, path), **fields)
    if entry.in_normal_folder and entry.is_normal is None:
        entry.is_normal = True
    scan.entries.append(entry)
    return entry


def by_stem(paths: Iterable[Path]) -> dict[str, Path]:
    """Stem -> first path (sorted order) with that stem."""
    mapping: dict[str, Path] = {}
    for path in sorted(paths, key=str):
        mapping.setdefault(path.stem, path)
    return mapping
