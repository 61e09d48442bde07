"""``ingest_source``: one source folder -> image index, annotations and quarantine tables.

Steps: the format adapter lists candidates and raw boxes (no image opened); a thread pool hashes and
decodes every candidate and reads masks / run-lengths (hashlib, PIL and OpenCV release the GIL); then a
single ordered pass decides duplicates and checks boxes against the decoded sizes. Output rows are
sorted by path, so re-ingesting an unchanged folder writes byte-identical Parquet files.

Duplicates (same bytes) keep their index row and their boxes, with ``duplicate_of`` set to the shared
image_id: image_id is therefore not unique in the index, and ``index[index.duplicate_of.isna()]`` is the
de-duplicated view. Within a source the first path in sorted order is the original; across sources the
caller passes ``known_hashes`` (image_id -> source name) of the sources that take precedence.

Nothing here moves, modifies or deletes a user file; every problem becomes a quarantine row.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from agssp_pipeline import artifact_io
from agssp_pipeline.config import SourceConfig
from agssp_pipeline.records import Record
from agssp_pipeline.sources.formats import check_options, scan_source
from agssp_pipeline.sources.probe import ImageProbe, probe_image
from agssp_pipeline.sources.regions import boxes_from_mask, check_box, decode_rle, read_mask
from agssp_pipeline.sources.scan import ImageEntry, RawBox, option, relative_parts
from agssp_pipeline.sources.schema import (
    ACTION_CLIPPED,
    ACTION_CONVERTED,
    ACTION_FLAGGED,
    ACTION_QUARANTINED,
    ANNOTATION_SCHEMA,
    INDEX_SCHEMA,
    KIND_ANNOTATION,
    KIND_IMAGE,
    KIND_MASK,
    QUARANTINE_SCHEMA,
    QuarantineRow,
    frame,
    to_table,
)
from agssp_pipeline.sources.shapes import ShapeError, mask_bounds, shape_mask, write_mask_png
from agssp_pipeline.storage import StorageLayout

log = logging.getLogger(__name__)


def default_workers() -> int:
    return min(16, 2 * (os.cpu_count() or 1))


@dataclass
class _Outcome:
    """The parallel part's verdict on one candidate image."""

    entry: ImageEntry
    probe: ImageProbe
    boxes: list[RawBox] = field(default_factory=list)
    mask_path: str | None = None
    is_normal: bool | None = None
    notes: list[QuarantineRow] = field(default_factory=list)


def _mask_outcome(outcome: _Outcome, source: SourceConfig) -> None:
    entry, probe = outcome.entry, outcome.probe
    mask_file = str(entry.mask_path)
    try:
        mask = read_mask(mask_file, int(option(source, "mask_threshold", 127)))
    except (ValueError, OSError) as error:
        outcome.notes.append(QuarantineRow(mask_file, KIND_MASK, ACTION_QUARANTINED, f"unusable mask: {error}"))
        return
    if mask.shape != (probe.height, probe.width):
        reason = f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {probe.width}x{probe.height}"
        outcome.notes.append(QuarantineRow(mask_file, KIND_MASK, ACTION_QUARANTINED, reason))
        return
    outcome.mask_path = mask_file
    min_area = int(option(source, "min_component_area", 1))
    boxes = boxes_from_mask(mask, min_area)
    outcome.boxes = [RawBox(entry.path, entry.mask_class or entry.category, *box, origin=mask_file) for box in boxes]
    if boxes:
        if entry.in_normal_folder:
            reason = "non-empty mask in a normal subfolder: image treated as defective"
            outcome.notes.append(QuarantineRow(mask_file, KIND_MASK, ACTION_FLAGGED, reason))
        outcome.is_normal = False
    elif option(source, "empty_mask_is_normal", False):
        outcome.is_normal = True
    elif not entry.in_normal_folder:
        reason = "empty mask outside normal_subfolders: is_normal left unknown (null)"
        outcome.notes.append(QuarantineRow(mask_file, KIND_MASK, ACTION_FLAGGED, reason))
        outcome.is_normal = None


def _rle_outcome(outcome: _Outcome) -> None:
    entry, probe = outcome.entry, outcome.probe
    for class_name, encoded, origin in entry.rle:
        try:
            mask = decode_rle(encoded, probe.height, probe.width)
        except ValueError as error:
            reason = f"{entry.path.name} class {class_name}: invalid run-length encoding ({error})"
            outcome.notes.append(QuarantineRow(origin, KIND_ANNOTATION, ACTION_QUARANTINED, reason))
            continue
        outcome.boxes.extend(RawBox(entry.path, class_name, *box, origin=origin) for box in boxes_from_mask(mask))


def _shapes_outcome(outcome: _Outcome, source: SourceConfig, mask_uri: str | None) -> None:
    """Rasterise the entry's polygons / RLE / instance masks into one mask (written to ``mask_uri``).

    Each instance-mask file also gives one box (its pixel bounds); polygon and RLE boxes come from the
    adapter. A shape that cannot be drawn gets a row naming its file and is left out; the mask is written
    when at least one shape could be drawn, so ``mask_path`` never points at a partial failure alone.
    """
    entry, probe = outcome.entry, outcome.probe
    union = np.zeros((probe.height, probe.width), dtype=np.uint8)
    threshold = int(option(source, "mask_threshold", 127))
    drawn = 0
    for shape in entry.shapes:
        kind = KIND_MASK if shape.mask_file is not None else KIND_ANNOTATION
        try:
            mask = shape_mask(shape, probe.height, probe.width, threshold)
        except ShapeError as error:
            reason = f"{entry.path.name} class {shape.class_name}: {error}"
            outcome.notes.append(QuarantineRow(shape.origin, kind, ACTION_QUARANTINED, reason))
            continue
        drawn += 1
        union |= mask
        if shape.mask_file is not None:
            bounds = mask_bounds(mask)
            if bounds is None:
                outcome.notes.append(QuarantineRow(shape.origin, KIND_MASK, ACTION_FLAGGED, "empty instance mask"))
            else:
                outcome.boxes.append(RawBox(entry.path, shape.class_name, *bounds, origin=shape.origin))
    if union.any():
        outcome.is_normal = False
    if drawn and mask_uri is not None:
        outcome.mask_path = write_mask_png(mask_uri, union)


MASK_FORMATS = frozenset({"mask_folder", "split_folders"})  # formats whose images are expected to have a mask


class ProbeCache:
    """Probes of a previous ingestion, reused for files whose size and mtime are unchanged.

    Re-ingesting a plant folder after a few new frames then hashes and decodes only the new files. Only
    successful probes are reused (bad files are re-probed: they are few and may have been fixed); masks
    and run-lengths are always re-read. A file rewritten with identical size and mtime would be missed:
    ``ingest_source(..., cache=None)`` (the asset's ``full_rescan``) re-reads everything.
    """

    def __init__(self, index: pd.DataFrame, quarantine: pd.DataFrame | None = None):
        conversions: dict[str, str] = {}
        if quarantine is not None and not quarantine.empty:
            converted = quarantine[(quarantine["kind"] == KIND_IMAGE) & (quarantine["action"] == ACTION_CONVERTED)]
            conversions = dict(zip(converted["path"], converted["reason"], strict=True))
        self._probes = {
            row.path: ImageProbe(path=row.path, bytes=int(row.bytes), mtime=float(row.mtime), image_id=row.image_id,
                                 width=int(row.width), height=int(row.height), channels=int(row.channels),
                                 conversion=conversions.get(row.path))
            for row in index[["path", "bytes", "mtime", "image_id", "width", "height", "channels"]].itertuples(index=False)
        }
        self.hits = 0

    def __len__(self) -> int:
        return len(self._probes)

    def get(self, path: str) -> ImageProbe | None:
        cached = self._probes.get(path)
        if cached is None:
            return None
        try:
            stat = os.stat(path)
        except OSError:
            return None
        if stat.st_size != cached.bytes or stat.st_mtime != cached.mtime:
            return None
        self.hits += 1  # int += under the GIL from several threads: a statistic, not a contract
        return cached


def _process(entry: ImageEntry, source: SourceConfig, cache: ProbeCache | None = None,
             mask_uri: str | None = None) -> _Outcome:
    probe = (cache.get(str(entry.path)) if cache is not None else None) or probe_image(entry.path)
    outcome = _Outcome(entry, probe, is_normal=entry.is_normal)
    if probe.error:
        outcome.notes.append(QuarantineRow(probe.path, KIND_IMAGE, ACTION_QUARANTINED, probe.error))
        return outcome
    if probe.conversion:
        outcome.notes.append(QuarantineRow(probe.path, KIND_IMAGE, ACTION_CONVERTED, probe.conversion))
    if entry.mask_path is not None:
        _mask_outcome(outcome, source)
    elif source.format in MASK_FORMATS and entry.is_normal is None:
        outcome.notes.append(QuarantineRow(probe.path, KIND_MASK, ACTION_FLAGGED, "no mask found: is_normal unknown"))
    if entry.rle:
        _rle_outcome(outcome)
    if entry.shapes:
        _shapes_outcome(outcome, source, mask_uri)
    return outcome


@dataclass
class IngestResult:
    """The three tables of one source. ``images`` may hold several rows per image_id (duplicates)."""

    source: str
    images: pd.DataFrame
    annotations: pd.DataFrame
    quarantine: pd.DataFrame

    def counts(self) -> dict[str, int]:
        images, quarantine = self.images, self.quarantine
        quarantined = quarantine["action"] == ACTION_QUARANTINED
        return {
            "images": len(images),
            "unique_images": int(images["duplicate_of"].isna().sum()),
            "boxes": len(self.annotations),
            "duplicates": int(images["duplicate_of"].notna().sum()),
            "normal": int((images["is_normal"] == True).sum()),  # noqa: E712  (nullable column)
            "defective": int((images["is_normal"] == False).sum()),  # noqa: E712
            "with_mask": int(images["mask_path"].notna().sum()),
            "quarantined": int(quarantined.sum()),
            "quarantined_images": int((quarantined & (quarantine["kind"] == KIND_IMAGE)).sum()),
            "clipped_boxes": int((quarantine["action"] == ACTION_CLIPPED).sum()),
            "converted_images": int((quarantine["action"] == ACTION_CONVERTED).sum()),
        }

    def tables(self) -> dict[str, pa.Table]:
        return {
            "index": to_table(self.images, INDEX_SCHEMA),
            "annotations": to_table(self.annotations, ANNOTATION_SCHEMA),
            "quarantine": to_table(self.quarantine, QUARANTINE_SCHEMA),
        }

    def serialized(self) -> dict[str, bytes]:
        return {key: artifact_io.parquet_bytes(table) for key, table in self.tables().items()}

    def content_hash(self) -> str:
        """Hash of the three Parquet files' bytes: the data version of the ingested source."""
        digest = hashlib.sha256()
        for key, data in sorted(self.serialized().items()):
            digest.update(key.encode() + b"\0" + data)
        return digest.hexdigest()[:16]

    def write(self, layout: StorageLayout, source_name: str | None = None) -> dict[str, str]:
        """Write the three files atomically (index last, so its presence means the set is complete)."""
        name = source_name or self.source
        targets = {"annotations": layout.annotations(name), "quarantine": layout.quarantine(name), "index": layout.index(name)}
        data = self.serialized()
        for key, target in targets.items():
            artifact_io.write_bytes(target, data[key])
        return targets


def index_record(uri: str) -> Record:
    """What the index at ``uri`` is now: its file hash is the version its consumers record.

    It is read from the source folder itself, so it has no recorded inputs that are artifacts.
    """
    from agssp_pipeline.training.lineage import file_hash

    source = artifact_io.name(uri).removesuffix(".parquet")
    version = file_hash(uri)
    record = Record(f"index {source}", partition=source, now={"version": version},
                    fields={"index sha256[:16] now": version})
    if version is None:
        return record.missing(f"index file {uri} no longer exists")
    index = artifact_io.read_parquet(uri)
    normal = index["is_normal"] if "is_normal" in index else pd.Series(dtype=object)
    record.fields.update({
        "images": len(index), "unique images": int(index["image_id"].nunique()),
        "categories": sorted(index.get("category", pd.Series(dtype=str)).dropna().astype(str).unique()),
        "normal / defective / unknown": f"{int((normal == True).sum())} / "  # noqa: E712  (nullable column)
        f"{int((normal == False).sum())} / {int(normal.isna().sum())}"})  # noqa: E712
    annotations = artifact_io.join(artifact_io.parent(uri), f"{source}.annotations.parquet")
    if artifact_io.is_file(annotations):
        record.fields["annotation boxes"] = len(artifact_io.read_parquet(annotations, columns=["image_id"]))
    return record


def known_hashes_from(layout: StorageLayout, sources: list[str]) -> dict[str, str]:
    """image_id -> source over the written indexes of ``sources`` (earlier sources win); missing ones skipped."""
    known: dict[str, str] = {}
    for name in sources:
        target = layout.index(name)
        if not artifact_io.exists(target):
            continue
        index = artifact_io.read_parquet(target)
        for image_id in index.loc[index["duplicate_of"].isna(), "image_id"]:
            known.setdefault(image_id, name)
    return known


def require_source_root(source: SourceConfig) -> Path:
    """The source's root folder, or FileNotFoundError naming source and path (fails one partition only)."""
    root = artifact_io.local_path(source.root)
    if root is None:
        raise FileNotFoundError(
            f"source '{source.name}': root {source.root} is a URL; ingestion reads local or mounted folders "
            "(mount the bucket, e.g. with s3fs or rclone, and give the mount path)")
    if not root.is_dir():
        raise FileNotFoundError(f"source '{source.name}': root folder {root} does not exist (or is not a folder)")
    return root


def ingest_source(source: SourceConfig, known_hashes: dict[str, str] | None = None, *,
                  workers: int | None = None, cache: ProbeCache | None = None,
                  derived_masks: str | None = None) -> IngestResult:
    """Index one source. Raises FileNotFoundError when the source's folders are missing and
    every problem with an individual file becomes a quarantine row instead; ValueError for an unknown
    option. ``cache`` (a ``ProbeCache`` of the previous tables) skips re-reading unchanged files; the
    result is the same as without it. ``derived_masks`` (``StorageLayout.derived_masks(source)``) is where
    masks drawn from polygons, COCO RLE and instance-mask files are written (never the user's folders);
    without it those images keep their boxes but get no ``mask_path``."""
    check_options(source)
    root = require_source_root(source)
    known = known_hashes or {}
    scan = scan_source(source, root)
    entries = sorted({str(e.path): e for e in scan.entries}.values(), key=lambda e: str(e.path))
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="ingest") as pool:
        outcomes = list(pool.map(lambda entry: _process(entry, source, cache, _derived_uri(derived_masks, root, entry)),
                                 entries))

    quarantine = list(scan.quarantine)
    index_rows: list[dict] = []
    probes: dict[Path, ImageProbe] = {}
    first_path: dict[str, str] = {}
    derived: list[RawBox] = []
    for outcome in outcomes:
        quarantine.extend(outcome.notes)
        probe, entry = outcome.probe, outcome.entry
        if probe.error:
            continue
        duplicate_of = None
        other_source = known.get(probe.image_id)
        if other_source is not None and other_source != source.name:
            duplicate_of = probe.image_id
            reason = f"same bytes as image {probe.image_id} of source '{other_source}'"
            quarantine.append(QuarantineRow(probe.path, KIND_IMAGE, ACTION_FLAGGED, reason))
        elif probe.image_id in first_path:
            duplicate_of = probe.image_id
            reason = f"same bytes as {first_path[probe.image_id]}"
            quarantine.append(QuarantineRow(probe.path, KIND_IMAGE, ACTION_FLAGGED, reason))
        else:
            first_path[probe.image_id] = probe.path
        probes[entry.path] = probe
        derived.extend(outcome.boxes)
        index_rows.append({
            "image_id": probe.image_id, "path": probe.path, "source": source.name, "category": entry.category,
            "width": probe.width, "height": probe.height, "channels": probe.channels, "bytes": probe.bytes,
            "mtime": probe.mtime, "split": entry.split, "mask_path": outcome.mask_path,
            "is_normal": outcome.is_normal, "duplicate_of": duplicate_of,
        })

    annotation_rows = _check_boxes(scan.boxes + derived, probes, source, quarantine)
    annotation_rows.sort(key=lambda row: row["path"])  # stable: keeps file order within an image
    quarantine.sort(key=lambda row: (row.path, row.kind, row.action, row.reason))
    result = IngestResult(
        source=source.name,
        images=frame(index_rows, INDEX_SCHEMA),
        annotations=frame(annotation_rows, ANNOTATION_SCHEMA),
        quarantine=frame([row.__dict__ for row in quarantine], QUARANTINE_SCHEMA),
    )
    log.info("ingested source %s: %s (%d unchanged files not re-read)", source.name, result.counts(),
             cache.hits if cache is not None else 0)
    return result


def _derived_uri(derived_masks: str | None, root: Path, entry: ImageEntry) -> str | None:
    """``<derived_masks>/<image path relative to the root>.png`` for an entry with shapes, else None."""
    if derived_masks is None or not entry.shapes:
        return None
    rel = relative_parts(entry.path, root)
    return artifact_io.join(derived_masks, *rel[:-1], f"{rel[-1]}.png")


def _check_boxes(boxes: list[RawBox], probes: dict[Path, ImageProbe], source: SourceConfig,
                 quarantine: list[QuarantineRow]) -> list[dict]:
    allowed = set(source.classes)
    rows: list[dict] = []
    dropped_for_image: dict[tuple[str, str], int] = {}
    for box in boxes:
        probe = probes.get(box.image_path)
        if probe is None:
            key = (box.origin, box.image_path.name)
            dropped_for_image[key] = dropped_for_image.get(key, 0) + 1
            continue
        if allowed and box.class_name not in allowed:
            reason = f"{box.image_path.name}: unknown class '{box.class_name}' (not in the source's classes)"
            quarantine.append(QuarantineRow(box.origin, KIND_ANNOTATION, ACTION_QUARANTINED, reason))
            continue
        coords = (box.x1, box.y1, box.x2, box.y2)
        if box.normalized:
            coords = (box.x1 * probe.width, box.y1 * probe.height, box.x2 * probe.width, box.y2 * probe.height)
        verdict = check_box(*coords, probe.width, probe.height)
        if verdict.box is None:
            reason = f"{box.image_path.name}: {verdict.reason}"
            quarantine.append(QuarantineRow(box.origin, KIND_ANNOTATION, ACTION_QUARANTINED, reason))
            continue
        if verdict.clipped:
            reason = f"{box.image_path.name}: box {tuple(round(v, 2) for v in coords)} clipped to the {probe.width}x{probe.height} image"
            quarantine.append(QuarantineRow(box.origin, KIND_ANNOTATION, ACTION_CLIPPED, reason))
        x1, y1, x2, y2 = verdict.box
        rows.append({"image_id": probe.image_id, "path": probe.path, "class_name": box.class_name,
                     "x1": x1, "y1": y1, "x2": x2, "y2": y2})
    for (origin, image_name), count in sorted(dropped_for_image.items()):
        reason = f"{count} box(es) dropped: image {image_name} is quarantined"
        quarantine.append(QuarantineRow(origin, KIND_ANNOTATION, ACTION_QUARANTINED, reason))
    return rows


def previous_probe_cache(layout: StorageLayout, source: str) -> ProbeCache | None:
    """A ProbeCache from the tables last written for ``source``; None when there are none or unreadable."""
    try:
        if not artifact_io.exists(layout.index(source)):
            return None
        quarantine_uri = layout.quarantine(source)
        quarantine = artifact_io.read_parquet(quarantine_uri) if artifact_io.exists(quarantine_uri) else None
        return ProbeCache(artifact_io.read_parquet(layout.index(source)), quarantine)
    except Exception as error:  # a damaged previous index only costs a full re-read
        log.warning("previous index of %s unusable as a cache (%s); reading every file", source, error)
        return None
