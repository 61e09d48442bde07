"""The boxes stage over the storage layout: what the Dagster assets and the benchmarks call.

Reads the map stores (``kead.store.read_map_table``), the ingestion index and the thresholds table, and
is the one writer of ``thresholds.parquet``, ``pseudo_boxes/<source>.parquet`` and
``evaluations/box_quality/<source>.parquet`` (atomic writes through ``artifact_io``). No Dagster here.

Thresholds pool the sources used for pretraining only: data held apart for downstream evaluation must not
shape the pseudo labels the backbone is pretrained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from agssp_pipeline import artifact_io
from agssp_pipeline.boxes.pseudo import build_pseudo_boxes, index_rows_for_maps
from agssp_pipeline.boxes.quality import evaluate_source, has_ground_truth
from agssp_pipeline.boxes.settings import BoxesSettings
from agssp_pipeline.boxes.thresholds import compute_category_thresholds, map_statistics, reference_ids
from agssp_pipeline.config import PipelineConfig
from agssp_pipeline.records import Input, Record, map_inputs, plain
from agssp_pipeline.storage import StorageLayout
from agssp_pipeline.training.lineage import file_hash


def table_fingerprint(table: pd.DataFrame) -> str:
    """Content hash of a table (row order included): the Dagster data version of what was written."""
    hashed = pd.util.hash_pandas_object(table, index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes() + ",".join(table.columns).encode()).hexdigest()[:16]


def read_index(layout: StorageLayout, source: str) -> pd.DataFrame:
    uri = layout.index(source)
    if not artifact_io.exists(uri):
        raise FileNotFoundError(f"no image index for source '{source}' at {uri}: materialize image_index first")
    return artifact_io.read_parquet(uri)


def read_annotations(layout: StorageLayout, source: str) -> pd.DataFrame | None:
    uri = layout.annotations(source)
    return artifact_io.read_parquet(uri) if artifact_io.exists(uri) else None


def load_maps(layout: StorageLayout, source: str, index: pd.DataFrame | None = None):
    """The current view of a source's maps (``MapTable``): rows of images that are in its index now.

    Rows of images deleted or replaced since they were mapped (a replaced file has a new content id) are
    left out, so one changed file never blocks thresholds or boxes; the next anomaly_maps run maps the new
    ids. A missing store is a clear error.
    """
    from agssp_pipeline.kead.store import read_map_table

    uri = layout.maps_store(source)
    if not artifact_io.exists(uri):
        raise FileNotFoundError(f"no anomaly maps for source '{source}' at {uri}: materialize anomaly_maps first")
    table = read_map_table(uri)
    index = read_index(layout, source) if index is None else index
    return current_rows(table, index)


def current_rows(table, index: pd.DataFrame):
    """The rows of a ``MapTable`` whose image is in ``index``; ``attrs['stale_rows']`` counts the others."""
    from agssp_pipeline.kead.store import MapTable

    keep = np.isin(table.image_id, index["image_id"].astype(str).to_numpy())
    if keep.all():
        return table
    attrs = {**table.attrs, "stale_rows": int((~keep).sum())}
    return MapTable(table.image_id[keep], table.maps[keep], table.image_score[keep],
                    table.zero_shot_score[keep], attrs)


def map_rows_id(image_ids) -> str:
    """``<count>:<digest>`` of the map rows a consumer used: what it verifies, beyond the version id."""
    ids = sorted(str(i) for i in image_ids)
    return f"{len(ids)}:{hashlib.sha256(chr(10).join(ids).encode()).hexdigest()[:16]}"


@dataclass
class ThresholdRun:
    table: pd.DataFrame
    stats: pd.DataFrame
    sources: list[str]
    missing_sources: list[str] = field(default_factory=list)
    uri: str = ""


def compute_thresholds(
    config: PipelineConfig, settings: BoxesSettings | None = None, sources: Sequence[str] | None = None
) -> ThresholdRun:
    """T_c over the map stores of ``sources`` (default: every pretraining source that has maps)."""
    settings = settings or config.boxes
    layout = config.layout()
    wanted = list(sources) if sources is not None else [s.name for s in config.pretrain_sources()]
    parts, versions, rows, used, missing = [], {}, {}, [], []
    for source in wanted:
        index = read_index(layout, source) if artifact_io.exists(layout.index(source)) else None
        try:
            if index is None:
                raise FileNotFoundError(source)
            maps = load_maps(layout, source, index)
        except FileNotFoundError:  # no index or store, or a store without a committed version yet
            missing.append(source)
            continue
        categories = index_rows_for_maps(maps.image_id, index, ("category",))["category"].astype(str).to_numpy()
        references = reference_ids(maps.attrs)
        parts.append(map_statistics(source, maps.image_id, maps.maps, maps.image_score, categories, references))
        versions[source] = str(maps.attrs.get("version"))
        rows[source] = map_rows_id(maps.image_id)
        used.append(source)
    if not parts:
        raise FileNotFoundError(f"no anomaly maps for any of {wanted}: materialize anomaly_maps first")
    stats = pd.concat(parts, ignore_index=True)
    table = compute_category_thresholds(stats, settings, versions, rows)
    return ThresholdRun(table=table, stats=stats, sources=used, missing_sources=missing)


def write_thresholds(config: PipelineConfig, run: ThresholdRun) -> str:
    run.uri = artifact_io.write_parquet(config.layout().thresholds(), run.table)
    return run.uri


def read_thresholds(layout: StorageLayout) -> pd.DataFrame:
    uri = layout.thresholds()
    if not artifact_io.exists(uri):
        raise FileNotFoundError(f"no thresholds at {uri}: materialize category_thresholds first")
    return artifact_io.read_parquet(uri)


def _hashed_record(name: str, uri: str, missing: str, **kwargs) -> Record:
    """A table's version is its file hash (what its consumers record); MISSING when it is gone."""
    version = file_hash(uri)
    record = Record(name, now={"version": version}, fields={"table sha256[:16] now": version}, **kwargs)
    return record if version is not None else record.missing(missing)


def thresholds_record(uri: str) -> Record:
    """What the thresholds table is now (T_c per category) and the map-store versions and rows it pooled."""
    record = _hashed_record("thresholds table", uri, f"no thresholds table at {uri}", label="thresholds table")
    if record.flags:
        return record
    table = artifact_io.read_parquet(uri)
    record.fields["per category"] = {
        str(row["category"]): {"T_c": float(row["threshold"]), "image cutoff": float(row["image_cutoff"]),
                               "images": int(row["n_images"]), "sources": row["sources"]}
        for _, row in table.iterrows()}
    record.now["T_c"] = {str(c): float(t) for c, t in zip(table["category"], table["threshold"], strict=True)}
    used: dict[str, str] = {}
    rows: dict[str, str] = {}
    for column, found in (("map_store_versions", used), ("map_rows", rows)):
        for text in table.get(column, pd.Series(dtype=str)).dropna():
            found.update({s: v for s, v in json.loads(text).items() if v})
    record.fields["map store versions used"] = used
    record.inputs = [i for source, version in sorted(used.items())
                     for i in map_inputs(source, version, rows.get(source))]
    return record


def check_thresholds_current(thresholds: pd.DataFrame, source: str, version: str, pretrain: bool,
                             rows: str | None = None) -> None:
    """Thresholds must come from this source's current maps (version and exact rows) when it takes part."""
    recorded = {
        json.loads(row)[source] for row in thresholds["map_store_versions"] if source in json.loads(row)
    }
    if pretrain and not recorded:
        raise ValueError(
            f"thresholds were computed without source '{source}': rematerialize category_thresholds"
        )
    if recorded and recorded != {version}:
        raise ValueError(
            f"thresholds were computed from map store version(s) {sorted(recorded)} of '{source}', the store "
            f"is now at {version}: rematerialize category_thresholds"
        )
    if rows is None or "map_rows" not in thresholds:
        return
    recorded_rows = {json.loads(row).get(source) for row in thresholds["map_rows"] if source in json.loads(row)}
    if recorded_rows and recorded_rows != {rows}:
        raise ValueError(
            f"thresholds were computed from other map rows of '{source}' ({sorted(map(str, recorded_rows))}, "
            f"now {rows}: images were mapped, replaced or deleted since): rematerialize category_thresholds"
        )


def compute_pseudo_boxes(
    config: PipelineConfig, source: str, settings: BoxesSettings | None = None, thresholds: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The pseudo-box table of one source from its current maps and the thresholds table."""
    settings = settings or config.boxes
    layout = config.layout()
    index = read_index(layout, source)
    maps = load_maps(layout, source, index)
    thresholds = read_thresholds(layout) if thresholds is None else thresholds
    rows = map_rows_id(maps.image_id)
    check_thresholds_current(
        thresholds, source, str(maps.attrs.get("version")), config.source(source).used_for_pretraining, rows
    )
    table = build_pseudo_boxes(
        source,
        maps.image_id,
        maps.maps,
        maps.image_score,
        index,
        thresholds,
        settings,
        str(maps.attrs.get("version")),
    )
    table.attrs["map_rows"] = rows
    return table


def write_pseudo_boxes(layout: StorageLayout, source: str, table: pd.DataFrame) -> str:
    """The one writer of ``pseudo_boxes/<source>.parquet`` (atomic; the table's settings travel in its attrs)."""
    return artifact_io.write_parquet(layout.pseudo_boxes(source), table)


def read_pseudo_boxes(layout: StorageLayout, source: str) -> pd.DataFrame | None:
    """The pseudo-box table of ``source`` as written (settings in ``attrs``), None when there is none."""
    uri = layout.pseudo_boxes(source)
    return artifact_io.read_parquet(uri) if artifact_io.exists(uri) else None


def pseudo_boxes_record(uri: str) -> Record:
    """What a pseudo-box table is now and what it recorded: map-store version and rows, T_c of every row."""
    source = artifact_io.name(uri).removesuffix(".parquet")
    record = _hashed_record(f"pseudo boxes {source}", uri, f"pseudo-box table {uri} no longer exists",
                            partition=source)
    if record.flags:
        return record
    table = artifact_io.read_parquet(uri)
    images = table.drop_duplicates("image_id")
    versions = sorted(set(table["map_store_version"].dropna().astype(str)))
    used = images.dropna(subset=["threshold"]).groupby("category")["threshold"].first()
    t_c = {str(k): float(v) for k, v in used.items()}
    record.fields.update({
        "images": len(images), "judged defective": int(images["judged_defective"].sum()),
        "boxes": int(table["box_index"].notna().sum()), "built from map store version": versions,
        "map rows": table.attrs.get("map_rows"), "T_c used": t_c})
    extra = {k: v[:500] for k, v in artifact_io.parquet_metadata(uri).items()}
    if extra:
        record.fields["parquet metadata"] = extra
    record.notes.append(("pseudo_boxes", "pseudo-box tables record the T_c value per row, not the thresholds "
                                         "table version: staleness against the thresholds is judged by comparing "
                                         "those values"))
    record.inputs = [Input("index", source), *map_inputs(source, versions, table.attrs.get("map_rows")),
                     Input("thresholds", "thresholds", version=t_c, measure="T_c")]
    return record


def source_has_ground_truth(config: PipelineConfig, source: str) -> bool:
    layout = config.layout()
    return has_ground_truth(read_index(layout, source), read_annotations(layout, source))


def compute_quality(config: PipelineConfig, source: str, settings: BoxesSettings | None = None) -> pd.DataFrame:
    """The quality table of one source (needs its pseudo-box table, maps and ground truth)."""
    settings = settings or config.boxes
    layout = config.layout()
    pseudo = read_pseudo_boxes(layout, source)
    if pseudo is None:
        raise FileNotFoundError(f"no pseudo boxes for '{source}' at {layout.pseudo_boxes(source)}: "
                                "materialize pseudo_boxes first")
    index = read_index(layout, source)
    maps = load_maps(layout, source, index)
    rows = map_rows_id(maps.image_id)
    versions = set(pseudo["map_store_version"].dropna().unique())
    recorded_rows = pseudo.attrs.get("map_rows")
    if (versions and versions != {str(maps.attrs.get("version"))}) or (recorded_rows and recorded_rows != rows):
        raise ValueError(
            f"pseudo boxes of '{source}' were built from map store version(s) {sorted(versions)} "
            f"(rows {recorded_rows}) but the store is at {maps.attrs.get('version')} "
            f"(rows {rows}): rematerialize pseudo_boxes"
        )
    table = evaluate_source(
        source,
        maps.image_id,
        maps.maps,
        index,
        read_annotations(layout, source),
        pseudo,
        read_thresholds(layout),
        settings,
    )
    table.attrs["pseudo_boxes_version"] = file_hash(layout.pseudo_boxes(source))  # what it measured
    return table


def write_quality(layout: StorageLayout, source: str, table: pd.DataFrame) -> str:
    """The one writer of ``evaluations/box_quality/<source>.parquet`` (atomic)."""
    return artifact_io.write_parquet(layout.evaluations("box_quality", source), table)


def quality_record(uri: str) -> Record:
    """What a box-quality table measured: the pseudo boxes of its source (their table hash when recorded)."""
    table = artifact_io.read_parquet(uri)
    source = str(table["source"].iloc[0]) if "source" in table and len(table) else artifact_io.name(uri)
    record = Record(f"box quality {source}", label=f"box quality {source}", partition=source)
    measured = {"view", "method", "iou_threshold"} <= set(table.columns)
    boxes = table[(table["view"] == "boxes") & (table["method"] == "pseudo")] if measured else table.iloc[:0]
    record.fields["pseudo boxes vs ground truth"] = {
        f"IoU {r['iou_threshold']:g}": {"recall": plain(r["recall"]), "precision": plain(r["precision"])}
        for r in boxes.to_dict("records")}
    version = table.attrs.get("pseudo_boxes_version")
    if version is None:
        record.notes.append(("box_quality", f"box-quality table of {source} does not record the pseudo-box table "
                                            "it measured (shown: the table there now)"))
    record.inputs = [Input("pseudo_boxes", source, version=version)]
    return record
