"""``agssp lineage``: the chain from image sources to the evaluations, read from the artifacts themselves.

Why it reads artifacts rather than Dagster: a checkpoint copied to another machine, or a storage root
whose Dagster instance was lost, must still answer "which maps, thresholds and boxes made this?". Every
stage records what it consumed in the artifact it writes:

- backbone checkpoints: ``lineage.json`` -> ``data.sources`` (index sha256[:16], map store version,
  encoder identity, images used) and ``data.threshold_table_version``;
- detector checkpoints: ``lineage.json`` -> ``backbone`` (run dir, weights digest, the backbone's own
  lineage) and ``pseudo_boxes`` (table sha256, index sha256, map store versions per source);
- evaluation tables: one row per regime x variant with ``checkpoint``, ``checkpoint_run_id``,
  ``initial_digest`` and the full ``checkpoint_lineage`` JSON;
- pseudo-box tables: ``map_store_version`` and the per-category ``threshold`` of every row;
- the thresholds table: ``map_store_versions`` per category; map stores: the version group's attrs.

The report compares each recorded value with the artifact as it is now and flags the differences
(``STALE``: the upstream artifact changed after it was consumed; ``NEWER``: a later run exists;
``MISSING``: the artifact is gone). Links nobody recorded are stated as such, never filled in. When a
Dagster instance is at hand, each artifact also gets its materialisation records (run id, time, data
version).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd

from agssp_pipeline.storage import StorageLayout
from agssp_pipeline.training.lineage import file_hash

STAGES: list[tuple[str, str]] = [
    ("sources", "image sources (index data versions)"),
    ("maps", "anomaly maps (KeAD map stores)"),
    ("thresholds", "category thresholds"),
    ("pseudo_boxes", "pseudo boxes"),
    ("backbone", "backbone checkpoints (AGBP)"),
    ("detector", "detector checkpoints (AGDP)"),
    ("evaluations", "finetune evaluations"),
]
STAGE_ASSETS = {
    "sources": "image_index",
    "maps": "anomaly_maps",
    "thresholds": "category_thresholds",
    "pseudo_boxes": "pseudo_boxes",
    "backbone": "backbone_checkpoint",
    "detector": "detector_checkpoint",
    "evaluations": "finetune_evaluation",
}
LAYOUT_FOLDERS = ("evaluations", "pseudo_boxes", "index", "maps.zarr", "checkpoints")
DAGSTER_RECORDS_SCANNED = 200
STALE, NEWER, MISSING = "STALE", "NEWER", "MISSING"


class LineageTargetError(ValueError):
    """The target is neither a known artifact path nor an asset with an artifact under storage_root."""


# ---------------------------------------------------------------------------------------------------------------
# the report


@dataclass
class Flag:
    level: str  # STALE, NEWER, MISSING
    message: str


@dataclass
class Entry:
    """One artifact of the chain, what it records, and how it compares with what is there now."""

    label: str
    path: str | None
    fields: dict[str, Any] = field(default_factory=dict)
    flags: list[Flag] = field(default_factory=list)
    dagster: list[dict[str, Any]] = field(default_factory=list)

    def flag(self, level: str, message: str) -> None:
        if not any(f.level == level and f.message == message for f in self.flags):
            self.flags.append(Flag(level, message))


@dataclass
class Stage:
    key: str
    title: str
    entries: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # missing links, stated in words


@dataclass
class LineageReport:
    target: str
    target_kind: str
    storage_root: str
    dagster_home: str | None
    stages: list[Stage]
    generated_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def stage(self, key: str) -> Stage:
        return next(s for s in self.stages if s.key == key)

    def flags(self, level: str | None = None) -> list[tuple[str, str, Flag]]:
        """(stage, entry label, flag) of every flag, optionally of one level."""
        return [(s.key, e.label, f) for s in self.stages for e in s.entries for f in e.flags
                if level is None or f.level == level]

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["summary"] = {level: len(self.flags(level)) for level in (STALE, NEWER, MISSING)}
        return payload

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def render(self) -> str:
        """Indented text tree, upstream first."""
        lines = [f"lineage of {self.target} ({self.target_kind})", f"storage root: {self.storage_root}",
                 f"dagster instance: {self.dagster_home or 'none found (artifact metadata only)'}"]
        for number, stage in enumerate(self.stages, 1):
            lines.append(f"{number}. {stage.title}")
            if not stage.entries and not stage.notes:
                lines.append("   (not part of this chain)")
            for note in stage.notes:
                lines.append(f"   - {note}")
            for entry in stage.entries:
                lines.append(f"   * {entry.label}" + (f"  [{entry.path}]" if entry.path else ""))
                for flag in entry.flags:
                    lines.append(f"       !! {flag.level}: {flag.message}")
                for name, value in entry.fields.items():
                    lines.extend(_render_field(name, value, "       "))
                for record in entry.dagster:
                    lines.append("       dagster: " + _render_record(record))
        counts = {level: len(self.flags(level)) for level in (STALE, NEWER, MISSING)}
        lines.append("flags: " + ", ".join(f"{n} {level}" for level, n in counts.items()))
        return "\n".join(lines)


def _render_field(name: str, value: Any, indent: str) -> list[str]:
    if isinstance(value, dict) and value and any(isinstance(v, dict | list) for v in value.values()):
        lines = [f"{indent}{name}:"]
        for key, inner in value.items():
            lines.extend(_render_field(str(key), inner, indent + "  "))
        return lines
    if isinstance(value, dict):
        text = ", ".join(f"{k}={_short(v)}" for k, v in value.items()) or "-"
    elif isinstance(value, list):
        text = ", ".join(_short(v) for v in value) or "-"
    else:
        text = _short(value)
    return [f"{indent}{name}: {text}"]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _render_record(record: dict[str, Any]) -> str:
    if record.get("run_id") is None:
        return f"{record['asset']}{_partition_text(record)}: {record.get('note', 'no materialisation recorded')}"
    return (f"{record['asset']}{_partition_text(record)} run {record['run_id']} at {record['timestamp']} "
            f"data version {record.get('data_version') or '-'} ({record.get('match', 'latest')})")


def _partition_text(record: dict[str, Any]) -> str:
    return f"[{record['partition']}]" if record.get("partition") else ""


# ---------------------------------------------------------------------------------------------------------------
# small readers (local paths or fsspec URLs)


def _fs(uri: str):
    return fsspec.core.url_to_fs(uri)


def _exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return bool(fs.exists(path))


def _read_json(uri: str) -> dict[str, Any]:
    fs, path = _fs(uri)
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def _modified(uri: str) -> float:
    fs, path = _fs(uri)
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, OSError, AttributeError):
        return 0.0


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def _same_path(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _parquet_metadata(uri: str, full: bool = False) -> dict[str, str]:
    """Key-value metadata of a Parquet file other than pandas' own schema blob (cut short unless ``full``)."""
    import pyarrow.parquet as pq

    fs, path = _fs(uri)
    with fs.open(path, "rb") as handle:
        raw = pq.ParquetFile(handle).schema_arrow.metadata or {}
    limit = None if full else 500
    return {k.decode(): v.decode(errors="replace")[:limit] for k, v in raw.items() if k != b"pandas"}


def _map_store_attrs(store_uri: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """(root attrs, {version: version attrs}) of a map store; None when there is none."""
    import zarr

    from agssp_pipeline.kead.store import _open_group

    try:
        root = _open_group(store_uri, "r", None)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    versions = {name: dict(root[name].attrs) for name in root.group_keys()}
    return dict(root.attrs), versions


def _weights_digest_for_detector(run_dir: str) -> str | None:
    """Digest of the YOLOv8 backbone tensors of a backbone checkpoint, as the detector/finetune record it."""
    from agssp_pipeline.training.checkpoint import backbone_state_for_detector, load_backbone_checkpoint
    from agssp_pipeline.training.detector import state_dict_digest

    try:
        state, _ = load_backbone_checkpoint(run_dir)
        return state_dict_digest(backbone_state_for_detector(state))
    except (FileNotFoundError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Dagster records


def find_dagster_home(config_path: str | Path | None = None) -> str | None:
    """DAGSTER_HOME when set, else ``<config dir>/dagster_home`` when it exists (what ``agssp materialize`` uses)."""
    home = os.environ.get("DAGSTER_HOME")
    if home and Path(home).is_dir():
        return home
    if config_path is not None:
        candidate = Path(config_path).resolve().parent / "dagster_home"
        if candidate.is_dir():
            return str(candidate)
    return None


class DagsterRecords:
    """Materialisation records of an instance, looked up per asset and partition."""

    def __init__(self, instance) -> None:
        self.instance = instance

    def records(self, asset: str, partition: str | None, match_run_id: str | None = None) -> list[dict[str, Any]]:
        """The latest record, and the one whose metadata ``run_id`` names ``match_run_id`` when asked."""
        import dagster as dg

        records_filter = dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None
        )
        found = self.instance.fetch_materializations(records_filter, limit=DAGSTER_RECORDS_SCANNED).records
        if not found:
            return [{"asset": asset, "partition": partition, "run_id": None,
                     "note": "no materialisation in the Dagster instance (made outside Dagster, or another instance)"}]
        out = [self._describe(found[0], asset, partition, "latest")]
        if match_run_id:
            matching = [r for r in found if _metadata_text(r, "run_id") == match_run_id]
            if not matching:
                out.append({"asset": asset, "partition": partition, "run_id": None,
                            "note": f"no materialisation of checkpoint run {match_run_id} in the instance"})
            elif matching[0].storage_id == found[0].storage_id:
                out[0]["match"] = f"latest, made checkpoint run {match_run_id}"
            else:
                out.append(self._describe(matching[0], asset, partition, f"made checkpoint run {match_run_id}"))
        return out

    @staticmethod
    def _describe(record, asset: str, partition: str | None, match: str) -> dict[str, Any]:
        materialization = record.asset_materialization
        tags = (materialization.tags or {}) if materialization else {}
        return {
            "asset": asset,
            "partition": partition,
            "run_id": record.run_id or "(runless event)",
            "timestamp": datetime.fromtimestamp(record.timestamp, UTC).isoformat(timespec="seconds"),
            "data_version": tags.get("dagster/data_version"),
            "match": match,
        }


def _metadata_text(record, key: str) -> str | None:
    materialization = record.asset_materialization
    value = (materialization.metadata or {}).get(key) if materialization else None
    return None if value is None else str(getattr(value, "value", value))


# ---------------------------------------------------------------------------------------------------------------
# building the chain


class ChainBuilder:
    """Adds artifacts stage by stage; each artifact appears once, with every consumer's recorded values."""

    def __init__(self, layout: StorageLayout, records: DagsterRecords | None = None) -> None:
        self.layout = layout
        self.records = records
        self.stages = {key: Stage(key, title) for key, title in STAGES}
        self._entries: dict[tuple[str, str], Entry] = {}

    # -- bookkeeping
    def _entry(self, stage: str, key: str, label: str, path: str | None,
               dagster: tuple[str | None, str | None] | None = None) -> tuple[Entry, bool]:
        """(entry, created) for ``key`` within ``stage``."""
        existing = self._entries.get((stage, key))
        if existing is not None:
            return existing, False
        entry = Entry(label, path)
        self._entries[(stage, key)] = entry
        self.stages[stage].entries.append(entry)
        if self.records is not None and dagster is not None:
            partition, run_id = dagster
            entry.dagster = self.records.records(STAGE_ASSETS[stage], partition, run_id)
        return entry, True

    def note(self, stage: str, text: str) -> None:
        if text not in self.stages[stage].notes:
            self.stages[stage].notes.append(text)

    def report(self, target: str, kind: str) -> LineageReport:
        home = getattr(getattr(self.records, "instance", None), "root_directory", None) if self.records else None
        return LineageReport(target, kind, self.layout.root, home, [self.stages[k] for k, _ in STAGES])

    # -- sources
    def add_source(self, source: str, consumer: str | None = None, recorded_hash: str | None = None,
                   images_used: int | None = None, index_path: str | None = None) -> Entry:
        uri = index_path or self.layout.index(source)
        entry, created = self._entry("sources", source, source, uri, (source, None))
        if created:
            current = file_hash(uri)
            entry.fields["index sha256[:16] now"] = current
            if current is None:
                entry.flag(MISSING, f"index file {uri} no longer exists")
            else:
                entry.fields.update(_index_summary(uri))
                annotations = self.layout.annotations(source) if index_path is None else uri.replace(
                    ".parquet", ".annotations.parquet")
                if _exists(annotations):
                    entry.fields["annotation boxes"] = len(pd.read_parquet(annotations, columns=["image_id"]))
        if consumer is not None:
            entry.fields.setdefault("recorded by", {})[consumer] = {
                "index sha256[:16]": recorded_hash or "not recorded", "images used": images_used}
            current = entry.fields["index sha256[:16] now"]
            if recorded_hash and current and recorded_hash != current:
                entry.flag(STALE, f"index changed since {consumer} consumed it (recorded {recorded_hash}, now {current})")
        return entry

    # -- maps
    def add_maps(self, source: str, consumer: str | None = None, recorded_versions: list[str] | None = None,
                 store_uri: str | None = None) -> Entry:
        uri = store_uri or self.layout.maps_store(source)
        entry, created = self._entry("maps", source, source, uri, (source, None))
        if created:
            stored = _map_store_attrs(uri)
            entry.fields["current version"] = stored[0].get("current_version") if stored else None
            if stored is None:
                entry.flag(MISSING, f"no map store at {uri}")
            else:
                entry.fields["versions in store"] = sorted(stored[1])
                entry.fields["_versions"] = stored[1]
        current = entry.fields.get("current version")
        shown = list(dict.fromkeys([*(recorded_versions or []), *([current] if current else [])]))
        versions = entry.fields.get("_versions", {})
        for version in shown:
            attrs = versions.get(version)
            key = f"version {version}"
            if key in entry.fields:
                continue
            if attrs is None:
                entry.fields[key] = "no longer in the store"
                continue
            entry.fields[key] = _map_version_summary(attrs)
        if consumer is not None:
            entry.fields.setdefault("recorded by", {})[consumer] = {
                "map store version": ", ".join(recorded_versions) if recorded_versions else "not recorded"}
            for version in recorded_versions or []:
                if current and version != current:
                    entry.flag(STALE, f"map store moved to version {current} since {consumer} used {version}")
                if versions and version not in versions:
                    entry.flag(MISSING, f"version {version} used by {consumer} is no longer in the store")
        return entry

    # -- thresholds
    def add_thresholds(self, consumer: str | None = None, recorded_hash: str | None = None) -> Entry:
        uri = self.layout.thresholds()
        entry, created = self._entry("thresholds", "thresholds", "thresholds table", uri, (None, None))
        if created:
            current = file_hash(uri)
            entry.fields["table sha256[:16] now"] = current
            if current is None:
                entry.flag(MISSING, f"no thresholds table at {uri}")
            else:
                table = pd.read_parquet(uri)
                entry.fields["per category"] = {
                    str(row["category"]): {"T_c": float(row["threshold"]), "image cutoff": float(row["image_cutoff"]),
                                           "images": int(row["n_images"]), "sources": row["sources"]}
                    for _, row in table.iterrows()}
                used: dict[str, str] = {}
                for text in table.get("map_store_versions", pd.Series(dtype=str)).dropna():
                    used.update({s: v for s, v in json.loads(text).items() if v})
                entry.fields["map store versions used"] = used
                for source, version in sorted(used.items()):
                    maps = self.add_maps(source, "thresholds table", [version])
                    now = maps.fields.get("current version")
                    if now and now != version:
                        entry.flag(STALE, f"computed from maps {source}@{version}; that store is now at {now}")
        if consumer is not None:
            entry.fields.setdefault("recorded by", {})[consumer] = recorded_hash or "not recorded"
            current = entry.fields["table sha256[:16] now"]
            if recorded_hash and current and recorded_hash != current:
                entry.flag(STALE, f"thresholds changed since {consumer} was made (recorded {recorded_hash}, now {current})")
        return entry

    # -- pseudo boxes
    def add_pseudo_boxes(self, source: str, consumer: str | None = None, recorded: dict[str, Any] | None = None,
                         path: str | None = None) -> Entry:
        uri = (recorded or {}).get("path") or path or self.layout.pseudo_boxes(source)
        entry, created = self._entry("pseudo_boxes", source, source, uri, (source, None))
        if created:
            current = file_hash(uri)
            entry.fields["table sha256[:16] now"] = current
            if current is None:
                entry.flag(MISSING, f"pseudo-box table {uri} no longer exists")
            else:
                self._describe_pseudo_boxes(entry, source, uri)
        if consumer is not None and recorded is not None:
            entry.fields.setdefault("recorded by", {})[consumer] = {
                "table sha256[:16]": recorded.get("sha256"), "map store version": recorded.get("map_store_version")}
            current = entry.fields["table sha256[:16] now"]
            if recorded.get("sha256") and current and recorded["sha256"] != current:
                entry.flag(STALE, f"table rewritten since {consumer} trained on it "
                                  f"(recorded {recorded['sha256']}, now {current})")
        return entry

    def _describe_pseudo_boxes(self, entry: Entry, source: str, uri: str) -> None:
        table = pd.read_parquet(uri)
        images = table.drop_duplicates("image_id")
        entry.fields["images"] = len(images)
        entry.fields["judged defective"] = int(images["judged_defective"].sum())
        entry.fields["boxes"] = int(table["box_index"].notna().sum())
        versions = sorted(set(table["map_store_version"].dropna().astype(str)))
        entry.fields["built from map store version"] = versions
        extra = _parquet_metadata(uri)
        if extra:
            entry.fields["parquet metadata"] = extra
        self.add_maps(source, f"pseudo boxes {source}", versions)
        used = images.dropna(subset=["threshold"]).groupby("category")["threshold"].first()
        entry.fields["T_c used"] = {str(k): float(v) for k, v in used.items()}
        self.note("pseudo_boxes", "pseudo-box tables record the T_c value per row, not the thresholds table "
                                  "version: staleness against the thresholds is judged by comparing those values")
        thresholds = self.add_thresholds()
        now = {c: v["T_c"] for c, v in (thresholds.fields.get("per category") or {}).items()}
        changed = [f"{c}: {v:.4g} -> {now[c]:.4g}" for c, v in used.items() if c in now and abs(now[c] - v) > 1e-6]
        if changed:
            entry.flag(STALE, "thresholds table changed since these boxes were built (" + "; ".join(changed) + ")")

    # -- backbone
    def add_backbone(self, checkpoint: str, consumer: str | None = None, recorded_digest: str | None = None,
                     recorded_lineage: dict[str, Any] | None = None, upstream: bool = True) -> Entry:
        from agssp_pipeline.training import checkpoint as ckpt

        run_dir = checkpoint.rstrip("/")
        lineage_uri = _join(run_dir, ckpt.LINEAGE_FILE)
        on_disk = _read_json(lineage_uri) if _exists(lineage_uri) else None
        lineage = on_disk or recorded_lineage or {}
        name, run_id = lineage.get("backbone", "?"), lineage.get("run_id", run_dir.rsplit("/", 1)[-1])
        label = f"{name} run {run_id}"
        entry, created = self._entry("backbone", run_dir, label, run_dir, (name, run_id))
        if created:
            if on_disk is None:
                entry.flag(MISSING, f"checkpoint files no longer at {run_dir}"
                           + ("; shown as recorded by its consumer" if recorded_lineage else ""))
            entry.fields.update(_backbone_summary(lineage))
            pointer = ckpt.read_latest_pointer(self.layout, name) if name != "?" else None
            if pointer and pointer.get("run_id") != run_id:
                entry.flag(NEWER, f"a later {name} run exists: {pointer.get('run_id')} (latest.json)")
            if upstream:
                self._backbone_upstream(label, lineage)
        if consumer is not None:
            entry.fields.setdefault("recorded by", {})[consumer] = {"weights digest": recorded_digest or "not recorded"}
            if recorded_digest and on_disk is not None:
                current = _weights_digest_for_detector(run_dir)
                entry.fields["weights digest now"] = current
                if current and current != recorded_digest:
                    entry.flag(STALE, f"weights changed since {consumer} loaded them "
                                      f"(recorded {recorded_digest}, now {current})")
        return entry

    def _backbone_upstream(self, label: str, lineage: dict[str, Any]) -> None:
        data = lineage.get("data")
        consumer = f"backbone {label}"
        if not isinstance(data, dict):
            self.note("sources", f"no data lineage recorded in backbone checkpoint {label}")
            return
        dagster_seen = lineage.get("dagster_upstream_data_versions") or {}
        for source, info in sorted((data.get("sources") or {}).items()):
            index = self.add_source(source, consumer, info.get("index_version"), info.get("images_used"),
                                    info.get("index_path"))
            version = info.get("map_store_version")
            maps = self.add_maps(source, consumer, [version] if version else None, info.get("map_store"))
            if not version:
                self.note("maps", f"no map store version recorded for {source} in backbone checkpoint {label}")
            for asset, entry in (("image_index", index), ("anomaly_maps", maps)):
                _compare_dagster_version(entry, asset, (dagster_seen.get(asset) or {}).get(source), consumer)
        if data.get("threshold_table_version"):
            self.add_thresholds(consumer, data["threshold_table_version"])
        else:
            self.note("thresholds", f"no threshold table recorded in backbone checkpoint {label}")

    # -- detector
    def add_detector(self, checkpoint: str, consumer: str | None = None, recorded_digest: str | None = None,
                     recorded_lineage: dict[str, Any] | None = None, upstream: bool = True) -> Entry:
        run_dir = checkpoint.rstrip("/")
        if run_dir.endswith(".safetensors") or run_dir.endswith("lineage.json"):
            run_dir = run_dir.rsplit("/", 1)[0]
        lineage_uri = _join(run_dir, "lineage.json")
        on_disk = _read_json(lineage_uri) if _exists(lineage_uri) else None
        lineage = on_disk or recorded_lineage or {}
        run_id = lineage.get("run_id", run_dir.rsplit("/", 1)[-1])
        label = f"{lineage.get('model', '?')} run {run_id}"
        entry, created = self._entry("detector", run_dir, label, run_dir, (None, run_id))
        if created:
            if on_disk is None:
                entry.flag(MISSING, f"checkpoint files no longer at {run_dir}"
                           + ("; shown as recorded by its consumer" if recorded_lineage else ""))
            entry.fields.update(_detector_summary(lineage))
            pointer_uri = self.layout.checkpoints("detector", str(lineage.get("model", "")), "latest.json")
            if lineage.get("model") and _exists(pointer_uri):
                latest = _read_json(pointer_uri)
                if latest.get("run_id") and latest["run_id"] != run_id:
                    entry.flag(NEWER, f"a later detector run exists: {latest['run_id']} (latest.json)")
            if upstream:
                self._detector_upstream(label, lineage)
        if consumer is not None:
            entry.fields.setdefault("recorded by", {})[consumer] = {"weights digest": recorded_digest or "not recorded"}
            current = (on_disk or {}).get("weights_digest")
            if recorded_digest and current and current != recorded_digest:
                entry.flag(STALE, f"weights changed since {consumer} loaded them (recorded {recorded_digest}, now {current})")
        return entry

    def _detector_upstream(self, label: str, lineage: dict[str, Any]) -> None:
        consumer = f"detector {label}"
        backbone = lineage.get("backbone")
        if isinstance(backbone, dict) and backbone.get("checkpoint"):
            self.add_backbone(str(backbone["checkpoint"]), consumer, backbone.get("weights_digest"),
                              backbone.get("lineage"))
        else:
            self.note("backbone", f"no backbone checkpoint recorded in detector checkpoint {label}")
        tables = lineage.get("pseudo_boxes")
        if not isinstance(tables, dict) or not tables:
            self.note("pseudo_boxes", f"no pseudo-box tables recorded in detector checkpoint {label}")
            return
        for source, info in sorted(tables.items()):
            self.add_pseudo_boxes(source, consumer, info)
            self.add_source(source, consumer, info.get("index_sha256"))
            self.add_maps(source, consumer, list(info.get("map_store_version") or []) or None)
        self.note("thresholds", f"no threshold table recorded in detector checkpoint {label} "
                                "(its pseudo-box tables carry the T_c values they used)")

    # -- evaluations
    def add_evaluation(self, uri: str, upstream: bool = True) -> Entry:
        table = pd.read_parquet(uri)
        dataset = str(table["dataset"].iloc[0]) if "dataset" in table and len(table) else Path(uri).stem
        entry, created = self._entry("evaluations", uri, f"dataset {dataset}", uri, (None, None))
        if not created:
            return entry
        columns = [c for c in ("regime", "variant", "map50", "map50_95", "delta_map50_95", "checkpoint_run_id")
                   if c in table]
        entry.fields["rows"] = {f"{r.get('regime', '-')}/{r.get('variant', '-')}": {
            k: _plain(r[k]) for k in columns[2:] if not pd.isna(r[k])} for r in table[columns].to_dict("records")}
        for key in ("model", "epochs", "imgsz", "seed"):
            if key in table and len(table):
                entry.fields[key] = _plain(table[key].iloc[0])
        entry.fields["written"] = datetime.fromtimestamp(_modified(uri), UTC).isoformat(timespec="seconds")
        consumer = f"evaluation {dataset}"
        self._describe_split(entry, dataset)
        if not upstream:
            return entry
        source = self.add_source(dataset, consumer)
        source.fields["role"] = "downstream (finetune + evaluation)"
        self.note("sources", f"evaluation tables do not record the index version of their dataset ({dataset}); "
                             "the stored split's fingerprint is compared instead (stage 7)")
        seen: set[str] = set()
        for row in table.to_dict("records"):
            checkpoint = row.get("checkpoint")
            if not checkpoint or pd.isna(checkpoint) or checkpoint in seen:
                continue
            seen.add(checkpoint)
            lineage = json.loads(row["checkpoint_lineage"]) if row.get("checkpoint_lineage") else {}
            digest = row.get("initial_digest") if isinstance(row.get("initial_digest"), str) else None
            adder = CHECKPOINT_KINDS.get(_checkpoint_kind(lineage, str(checkpoint)))
            if adder is None:
                self.note("evaluations", f"variant {row.get('variant')} started from {checkpoint}: "
                                         "not a pipeline checkpoint, no lineage beyond the file")
                continue
            adder(self, str(checkpoint), consumer, digest, lineage)
        variants = set(table.get("variant", pd.Series(dtype=str)))
        if "agssp" not in variants:
            self.note("detector", f"evaluation {dataset} has no agssp variant (no detector checkpoint used)")
        if "agbp" not in variants and "agssp" not in variants:
            self.note("backbone", f"evaluation {dataset} used no pipeline checkpoint")
        return entry

    def _describe_split(self, entry: Entry, dataset: str) -> None:
        """The stored train/val split: its fingerprint of the labelled set vs the index as it is now."""
        from agssp_pipeline.training.splits import SPLIT_METADATA_KEY, index_fingerprint, split_path

        uri = split_path(self.layout, dataset)
        if not _exists(uri):
            entry.fields["split"] = "no stored split found"
            return
        meta = json.loads(_parquet_metadata(uri, full=True).get(SPLIT_METADATA_KEY.decode(), "{}"))
        entry.fields["split"] = {"path": uri, "fingerprint": meta.get("fingerprint"), "params": meta.get("params")}
        index_uri, annotations_uri = self.layout.index(dataset), self.layout.annotations(dataset)
        if meta.get("fingerprint") and _exists(index_uri) and _exists(annotations_uri):
            now = index_fingerprint(pd.read_parquet(index_uri), pd.read_parquet(annotations_uri))
            entry.fields["labelled set fingerprint now"] = now
            if now != meta["fingerprint"]:
                entry.flag(STALE, f"the labelled set of {dataset} changed since it was split and evaluated "
                                  f"(split fingerprint {meta['fingerprint']}, now {now})")

    # -- downstream consumers of checkpoints
    def add_consumers(self, run_dir: str, kind: str) -> None:
        """Evaluations (and, for a backbone, detectors) that used the checkpoint at ``run_dir``."""
        detectors: list[str] = []
        if kind == "backbone":
            for lineage_uri in _glob(self.layout.checkpoints("detector", "*", "*", "lineage.json")):
                lineage = _read_json(lineage_uri)
                if _same_path((lineage.get("backbone") or {}).get("checkpoint"), run_dir):
                    detector_dir = lineage_uri.rsplit("/", 1)[0]
                    detectors.append(detector_dir)
                    self.add_detector(detector_dir, upstream=False)
        users = [run_dir, *detectors]
        found = False
        for uri in evaluation_tables(self.layout):
            table = pd.read_parquet(uri, columns=["checkpoint"]) if "checkpoint" in _columns(uri) else None
            if table is not None and any(_same_path(str(c), u) for c in table["checkpoint"].dropna() for u in users):
                self.add_evaluation(uri, upstream=False)
                found = True
        if not found:
            self.note("evaluations", "no evaluation table under the storage root used this checkpoint")


def _compare_dagster_version(entry: Entry, asset: str, recorded: str | None, consumer: str) -> None:
    """STALE when Dagster's latest materialisation has another data version than the one the consumer saw."""
    latest = entry.dagster[0] if entry.dagster else None  # records() lists the latest first
    if recorded is None or latest is None or not latest.get("data_version"):
        return
    if latest["data_version"] != recorded:
        entry.flag(STALE, f"Dagster has a newer materialisation of {asset}{_partition_text(latest)} (data version "
                          f"{latest['data_version']}, run {latest['run_id']}) than the {recorded} {consumer} consumed")


CheckpointAdder = Callable[..., Entry]
CHECKPOINT_KINDS: dict[str, CheckpointAdder] = {
    "backbone": ChainBuilder.add_backbone,
    "detector": ChainBuilder.add_detector,
}


def _checkpoint_kind(lineage: dict[str, Any], path: str) -> str | None:
    if lineage.get("kind") == "detector" or "/checkpoints/detector/" in path:
        return "detector"
    if isinstance(lineage.get("backbone"), str) and "data" in lineage or "/checkpoints/backbone/" in path:
        return "backbone"
    return None


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values (for JSON and printing)."""
    return value.item() if hasattr(value, "item") else value


def _columns(uri: str) -> list[str]:
    import pyarrow.parquet as pq

    fs, path = _fs(uri)
    with fs.open(path, "rb") as handle:
        return list(pq.ParquetFile(handle).schema_arrow.names)


def _glob(pattern: str) -> list[str]:
    fs, path = _fs(pattern)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    return sorted(prefix + p for p in fs.glob(path))


def evaluation_tables(layout: StorageLayout) -> list[str]:
    """Finetune evaluation tables (not the per-class or pseudo-box quality tables beside them)."""
    return [u for u in _glob(layout.path("evaluations", "*.parquet"))
            if not u.endswith(".per_class.parquet") and not u.rsplit("/", 1)[-1].startswith("pseudo_box_quality_")]


# ---------------------------------------------------------------------------------------------------------------
# summaries of each artifact


def _index_summary(uri: str) -> dict[str, Any]:
    index = pd.read_parquet(uri)
    summary: dict[str, Any] = {"images": len(index)}
    if "image_id" in index:
        summary["unique images"] = int(index["image_id"].nunique())
    if "category" in index:
        summary["categories"] = sorted(index["category"].dropna().astype(str).unique())
    if "is_normal" in index:
        normal = index["is_normal"]
        summary["normal / defective / unknown"] = (f"{int((normal == True).sum())} / "  # noqa: E712
                                                   f"{int((normal == False).sum())} / {int(normal.isna().sum())}")  # noqa: E712
    return summary


def _map_version_summary(attrs: dict[str, Any]) -> dict[str, Any]:
    identity = attrs.get("identity") if isinstance(attrs.get("identity"), dict) else {}
    references = attrs.get("references") or {}
    return {
        "encoder": identity.get("encoder", attrs.get("encoder")),
        "model": identity.get("model"),
        "mode": identity.get("mode"),
        "weights": identity.get("weights", attrs.get("weights")),
        "prompts hash": identity.get("prompt_hash", attrs.get("prompt_hash")) or "-",
        "grid": attrs.get("grid_size"),
        "maps": attrs.get("committed"),
        "created": attrs.get("created_at"),
        "code": attrs.get("code_version"),
        "reference images": {str(c): list(ids) for c, ids in references.items()} if references else "not recorded",
    }


def _backbone_summary(lineage: dict[str, Any]) -> dict[str, Any]:
    code = lineage.get("code") or {}
    final = lineage.get("final_losses") or {}
    data = lineage.get("data") or {}
    return {
        "status": lineage.get("status"),
        "created": lineage.get("created_at"),
        "epochs completed": lineage.get("epochs_completed"),
        "base loss": (lineage.get("resolved") or {}).get("base_loss"),
        "final losses": {k: v for k, v in final.items() if v is not None},
        "config hash": lineage.get("config_hash"),
        "data hash": lineage.get("data_hash"),
        "classes": data.get("classes"),
        "code": f"{code.get('git_commit') or code.get('package_version') or '-'}"
                + (" (dirty)" if code.get("git_dirty") else ""),
        "device": lineage.get("device"),
    }


def _detector_summary(lineage: dict[str, Any]) -> dict[str, Any]:
    settings = lineage.get("settings") or {}
    metrics = lineage.get("ultralytics_metrics") or {}
    return {
        "created": lineage.get("created_at"),
        "weights digest": lineage.get("weights_digest"),
        "training set": lineage.get("training_set"),
        "epochs": settings.get("epochs"),
        "image size": settings.get("image_size"),
        "frozen backbone layers": settings.get("freeze_layers"),
        "pseudo-box val mAP50": metrics.get("metrics/mAP50(B)"),
    }


# ---------------------------------------------------------------------------------------------------------------
# targets: artifact paths and asset names


@dataclass
class ResolvedTarget:
    kind: str  # evaluation, detector, backbone, pseudo_boxes, thresholds, maps, index
    uri: str
    name: str = ""  # source name where the artifact is per source


def infer_storage_root(uri: str) -> str | None:
    """The storage root above an artifact path laid out by ``StorageLayout``."""
    parts = uri.rstrip("/").split("/")
    for position in range(len(parts) - 1, 0, -1):
        if parts[position] in LAYOUT_FOLDERS:
            return "/".join(parts[:position])
    if parts[-1] == "thresholds.parquet":
        return "/".join(parts[:-1])
    return None


def _resolve_checkpoint(uri: str) -> ResolvedTarget:
    from agssp_pipeline.training import checkpoint as ckpt

    run_dir = uri.rsplit("/", 1)[0] if uri.endswith((ckpt.MODEL_FILE, ckpt.LINEAGE_FILE)) else uri
    pointer = _join(run_dir, ckpt.LATEST_FILE)
    if not _exists(_join(run_dir, ckpt.MODEL_FILE)) and not _exists(_join(run_dir, ckpt.LINEAGE_FILE)) \
            and _exists(pointer):
        latest = _read_json(pointer)
        run_dir = latest.get("run_dir") or _join(run_dir, latest["run_id"])
    lineage_uri = _join(run_dir, ckpt.LINEAGE_FILE)
    lineage = _read_json(lineage_uri) if _exists(lineage_uri) else {}
    kind = _checkpoint_kind(lineage, run_dir)
    if kind is None:
        raise LineageTargetError(f"{uri}: not a backbone or detector checkpoint (no lineage.json saying which)")
    return ResolvedTarget(kind, run_dir)


def _resolve_parquet(uri: str) -> ResolvedTarget:
    name = uri.rsplit("/", 1)[-1]
    folder = uri.rsplit("/", 2)[-2] if uri.count("/") else ""
    if name == "thresholds.parquet":
        return ResolvedTarget("thresholds", uri)
    if folder == "index":
        source = name.removesuffix(".parquet").removesuffix(".annotations").removesuffix(".quarantine")
        return ResolvedTarget("index", uri.rsplit("/", 1)[0] + f"/{source}.parquet", source)
    if folder == "pseudo_boxes":
        return ResolvedTarget("pseudo_boxes", uri, name.removesuffix(".parquet"))
    if folder == "evaluations":
        if name.endswith(".per_class.parquet"):
            uri = uri.removesuffix(".per_class.parquet") + ".parquet"
        return ResolvedTarget("evaluation", uri)
    columns = set(_columns(uri))
    by_columns = [("evaluation", {"variant", "checkpoint_lineage"}), ("pseudo_boxes", {"box_index", "map_store_version"}),
                  ("thresholds", {"threshold", "map_store_versions"}), ("index", {"image_id", "path", "source"})]
    for kind, needed in by_columns:
        if needed <= columns:
            return ResolvedTarget(kind, uri, name.removesuffix(".parquet"))
    raise LineageTargetError(f"{uri}: a Parquet file the pipeline did not write (columns {sorted(columns)[:8]})")


def resolve_path(target: str) -> ResolvedTarget:
    uri = target if "://" in target else str(Path(target).resolve())
    if not _exists(uri):
        raise LineageTargetError(f"{target}: no such file or folder")
    if uri.endswith(".parquet"):
        return _resolve_parquet(uri)
    if _exists(_join(uri, "zarr.json")) and "/maps.zarr/" in uri + "/":
        return ResolvedTarget("maps", uri.rstrip("/"), uri.rstrip("/").rsplit("/", 1)[-1])
    return _resolve_checkpoint(uri)


def _newest(uris: list[str]) -> str | None:
    return max(uris, key=_modified) if uris else None


def _latest_backbone(layout: StorageLayout, config, partition: str | None) -> str | None:
    from agssp_pipeline.training import checkpoint as ckpt

    names = [partition] if partition else []
    if not names and config is not None:
        names = [config.detector.backbone]
    for name in names:
        pointer = ckpt.read_latest_pointer(layout, name)
        if pointer:
            return ckpt.run_dir(layout, name, pointer["run_id"])
    pointers = _glob(layout.checkpoints("backbone", "*", ckpt.LATEST_FILE))
    newest = _newest(pointers)
    return _join(newest.rsplit("/", 1)[0], _read_json(newest)["run_id"]) if newest else None


def _latest_detector(layout: StorageLayout, config, partition: str | None) -> str | None:
    model = partition or (config.detector.model if config is not None else None)
    pointers = ([layout.checkpoints("detector", model, "latest.json")] if model else []) + \
        _glob(layout.checkpoints("detector", "*", "latest.json"))
    existing = [p for p in pointers if _exists(p)]
    if not existing:
        return None
    return _read_json(existing[0] if model and _exists(pointers[0]) else _newest(existing))["run_dir"]


def _latest_per_source(pattern: Callable[[str], str], partition: str | None) -> str | None:
    if partition:
        uri = pattern(partition)
        return uri if _exists(uri) else None
    return _newest(_glob(pattern("*")))


ASSET_TARGETS: dict[str, Callable[[StorageLayout, Any, str | None], ResolvedTarget | None]] = {
    "finetune_evaluation": lambda layout, config, part: _maybe(
        "evaluation", _latest_per_source(layout.evaluations, part) if part else _newest(evaluation_tables(layout))),
    "detector_checkpoint": lambda layout, config, part: _maybe("detector", _latest_detector(layout, config, part)),
    "backbone_checkpoint": lambda layout, config, part: _maybe("backbone", _latest_backbone(layout, config, part)),
    "pseudo_boxes": lambda layout, config, part: _maybe("pseudo_boxes", _latest_per_source(layout.pseudo_boxes, part)),
    "anomaly_maps": lambda layout, config, part: _maybe(
        "maps", _latest_per_source(lambda s: _join(layout.maps_store(s), "zarr.json"), part), strip="/zarr.json"),
    "category_thresholds": lambda layout, config, part: _maybe(
        "thresholds", layout.thresholds() if _exists(layout.thresholds()) else None),
    "image_index": lambda layout, config, part: _maybe("index", _latest_per_source(layout.index, part)),
}


def _maybe(kind: str, uri: str | None, strip: str = "") -> ResolvedTarget | None:
    if uri is None:
        return None
    uri = uri.removesuffix(strip)
    name = uri.rsplit("/", 1)[-1].removesuffix(".parquet")
    return ResolvedTarget(kind, uri, name)


def parse_asset_target(target: str) -> tuple[str, str | None]:
    """``pseudo_boxes``, ``pseudo_boxes[demo_x]`` or ``pseudo_boxes:demo_x`` -> (asset, partition)."""
    if target.endswith("]") and "[" in target:
        asset, partition = target[:-1].split("[", 1)
        return asset, partition
    asset, _, partition = target.partition(":")
    return asset, partition or None


def resolve_target(target: str, layout: StorageLayout | None, config=None) -> ResolvedTarget:
    asset, partition = parse_asset_target(target)
    if asset in ASSET_TARGETS and not Path(target).exists():
        if layout is None:
            raise LineageTargetError(f"'{asset}' is an asset name: pass --config (or set AGSSP_CONFIG) "
                                     "so its latest artifact can be found under storage_root")
        resolved = ASSET_TARGETS[asset](layout, config, partition)
        if resolved is None:
            where = f"[{partition}]" if partition else ""
            raise LineageTargetError(f"no artifact of {asset}{where} under {layout.root}: materialise it first")
        return resolved
    return resolve_path(target)


# ---------------------------------------------------------------------------------------------------------------
# entry point


def _start(builder: ChainBuilder, resolved: ResolvedTarget) -> None:
    starters: dict[str, Callable[[], Any]] = {
        "evaluation": lambda: builder.add_evaluation(resolved.uri),
        "detector": lambda: (builder.add_detector(resolved.uri), builder.add_consumers(resolved.uri, "detector")),
        "backbone": lambda: (builder.add_backbone(resolved.uri), builder.add_consumers(resolved.uri, "backbone")),
        "pseudo_boxes": lambda: (builder.add_pseudo_boxes(resolved.name, path=resolved.uri),
                                 builder.add_source(resolved.name)),
        "thresholds": lambda: builder.add_thresholds(),
        "maps": lambda: (builder.add_maps(resolved.name, store_uri=resolved.uri), builder.add_source(resolved.name)),
        "index": lambda: builder.add_source(resolved.name, index_path=resolved.uri),
    }
    starters[resolved.kind]()
    if resolved.kind in UPSTREAM_ONLY_TARGETS:
        later = [key for key, _ in STAGES][[key for key, _ in STAGES].index(UPSTREAM_ONLY_TARGETS[resolved.kind]) + 1:]
        for key in later:
            if not builder.stages[key].entries:
                builder.note(key, "downstream of the target: not followed (pass a checkpoint or an evaluation "
                                  "to see what consumed these artifacts)")


# targets whose report stops at their own stage -> that stage
UPSTREAM_ONLY_TARGETS = {"index": "sources", "maps": "maps", "thresholds": "thresholds", "pseudo_boxes": "pseudo_boxes"}


def build_lineage_report(
    target: str, config_path: str | Path | None = None, instance=None, use_dagster: bool = True
) -> LineageReport:
    """The lineage of ``target`` (artifact path or asset name), from the artifacts and, if any, Dagster.

    ``instance``: a Dagster instance to read records from; default: the one at DAGSTER_HOME or
    ``<config dir>/dagster_home`` when it exists; none when ``use_dagster`` is false.
    """
    config = None
    layout: StorageLayout | None = None
    if config_path is not None:
        from agssp_pipeline.config import load_config

        config = load_config(config_path)
        layout = config.layout()
    resolved = resolve_target(target, layout, config)
    if layout is None:
        root = infer_storage_root(resolved.uri)
        if root is None:
            raise LineageTargetError(f"{resolved.uri} is not under a pipeline storage root; pass --config")
        layout = StorageLayout(root)
    records = None
    if use_dagster:
        if instance is None:
            home = find_dagster_home(config_path)
            if home is not None:
                import dagster as dg

                instance = dg.DagsterInstance.from_config(home)
        records = DagsterRecords(instance) if instance is not None else None
    builder = ChainBuilder(layout, records)
    _start(builder, resolved)
    for stage in builder.stages.values():
        for entry in stage.entries:
            entry.fields.pop("_versions", None)
    return builder.report(target, resolved.kind)
