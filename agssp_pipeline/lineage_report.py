"""``agssp lineage``: the chain behind an artifact, as a walk over what each writer recorded it was made from.

Why artifacts rather than Dagster: a checkpoint copied to another machine, or a storage root whose Dagster
instance was lost, must still answer "which maps, thresholds and boxes made this?". Each writer records its
inputs in what it writes, and this module only reads those records:

- backbone and detector checkpoints: ``lineage.json``, read by ``training.checkpoint.recorded_inputs``;
- finetune evaluations: per row the initial checkpoint, its weights digest and lineage; the stored split's
  fingerprint of the labelled set (``training.splits.labelled_set_fingerprint``, the one finetune uses);
- KeAD evaluations: the map-store version of each block of rows; box-quality tables: their source;
- pseudo-box tables: ``map_store_version`` and the ``threshold`` (T_c) of every row;
- the thresholds table: ``map_store_versions`` per category; map stores: each version's attrs.

From the target the walk follows recorded inputs upstream, depth first, and compares each record with the
input as it is now: ``STALE`` (it changed after it was consumed), ``NEWER`` (a later run exists),
``MISSING`` (it is gone). Links nobody recorded are stated as such, never filled in. With a Dagster instance
each artifact also gets its materialisation records (Dagster is imported only then).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from agssp_pipeline import artifact_io as aio
from agssp_pipeline.storage import StorageLayout
from agssp_pipeline.training import checkpoint as ckpt
from agssp_pipeline.training.lineage import file_hash

STAGES: list[tuple[str, str]] = [
    ("sources", "image sources (index data versions)"),
    ("maps", "anomaly maps (KeAD map stores)"),
    ("thresholds", "category thresholds"),
    ("pseudo_boxes", "pseudo boxes"),
    ("backbone", "backbone checkpoints (AGBP)"),
    ("detector", "detector checkpoints (AGDP)"),
    ("evaluations", "finetune evaluations (and KeAD / box-quality evaluations)"),
]
LAYOUT_FOLDERS = ("evaluations", "pseudo_boxes", "index", "maps.zarr", "checkpoints")
NOT_ARTIFACTS = (".annotations.parquet", ".quarantine.parquet", ".per_class.parquet", ".lock")  # beside them
EVALUATION_FOLDERS = {"finetune": "evaluation", "kead": "kead_evaluation", "box_quality": "box_quality"}
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
            lines.extend(f"   - {note}" for note in stage.notes)
            for entry in stage.entries:
                lines.append(f"   * {entry.label}" + (f"  [{entry.path}]" if entry.path else ""))
                lines.extend(f"       !! {flag.level}: {flag.message}" for flag in entry.flags)
                for name, value in entry.fields.items():
                    lines.extend(_render_field(name, value, "       "))
                lines.extend("       dagster: " + _render_record(record) for record in entry.dagster)
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
# Dagster records (optional; dagster is imported only when an instance is used)


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
        out = [_describe_record(found[0], asset, partition, "latest")]
        if match_run_id:
            matching = [r for r in found if _metadata_text(r, "run_id") == match_run_id]
            if not matching:
                out.append({"asset": asset, "partition": partition, "run_id": None,
                            "note": f"no materialisation of checkpoint run {match_run_id} in the instance"})
            elif matching[0].storage_id == found[0].storage_id:
                out[0]["match"] = f"latest, made checkpoint run {match_run_id}"
            else:
                out.append(_describe_record(matching[0], asset, partition, f"made checkpoint run {match_run_id}"))
        return out


def _describe_record(record, asset: str, partition: str | None, match: str) -> dict[str, Any]:
    materialization = record.asset_materialization
    tags = (materialization.tags or {}) if materialization else {}
    return {"asset": asset, "partition": partition, "run_id": record.run_id or "(runless event)",
            "timestamp": datetime.fromtimestamp(record.timestamp, UTC).isoformat(timespec="seconds"),
            "data_version": tags.get("dagster/data_version"), "match": match}


def _metadata_text(record, key: str) -> str | None:
    materialization = record.asset_materialization
    value = (materialization.metadata or {}).get(key) if materialization else None
    return None if value is None else str(getattr(value, "value", value))


# ---------------------------------------------------------------------------------------------------------------
# the walk


@dataclass
class Input:
    """One recorded input of an artifact: which artifact, and what it was when it was consumed."""

    kind: str  # a key of KINDS
    key: str  # source name, "thresholds", or the (canonical) address of a checkpoint or table
    uri: str | None = None  # where the consumer found it (None: where the layout puts it)
    recorded: Any = None  # the version the consumer recorded; None: not recorded
    measure: str = "version"  # the input's current value that ``recorded`` is compared with ("version", "T_c")
    lineage: dict[str, Any] | None = None  # the consumer's copy of the input's own record (shown if it is gone)
    dagster: str | None = None  # the Dagster data version the consumer saw


@dataclass
class Node:
    """An artifact met on the walk: its report entry and its current values (computed when first asked)."""

    kind: str
    key: str
    uri: str
    entry: Entry
    name: str = ""  # how it is named as a consumer ("backbone yolov8n run ...")
    dagster: tuple[str | None, str | None] | None = None  # (partition, run id) of its Dagster records
    measures: dict[str, Any] = field(default_factory=dict)  # values or zero-argument callables
    versions: dict[str, dict[str, Any]] | None = None  # map stores: attrs of every version

    def measure(self, name: str) -> Any:
        value = self.measures.get(name)
        if callable(value):
            value = self.measures[name] = value()
        return value


class Walk:
    """Visits each artifact once, follows its recorded inputs, and compares every consumer's record."""

    def __init__(self, layout: StorageLayout, records: DagsterRecords | None = None) -> None:
        self.layout = layout
        self.records = records
        self.stages = {key: Stage(key, title) for key, title in STAGES}
        self.nodes: dict[tuple[str, str], Node] = {}

    def note(self, stage: str, text: str) -> None:
        if text not in self.stages[stage].notes:
            self.stages[stage].notes.append(text)

    def visit(self, item: Input, consumer: Node | None = None, follow: bool = True) -> Node:
        kind = KINDS[item.kind]
        node = self.nodes.get((item.kind, item.key))
        if node is None:
            uri = aio.canonical(item.uri or kind.locate(self.layout, item.key))
            node = self.nodes[(item.kind, item.key)] = Node(item.kind, item.key, uri, Entry(item.key, uri))
            self.stages[kind.stage].entries.append(node.entry)
            inputs = kind.read(self, node, item)
            if self.records is not None and node.dagster is not None:
                node.entry.dagster = self.records.records(kind.asset, *node.dagster)
            for upstream in inputs if follow else []:
                self.visit(upstream, node)
        if consumer is not None:
            self._compare(node, item, consumer)
        return node

    def _compare(self, node: Node, item: Input, consumer: Node) -> None:
        """Record what ``consumer`` saw of ``node`` and flag the differences with ``node`` as it is now."""
        kind = KINDS[node.kind]
        seen = node.entry.fields.setdefault("recorded by", {}).setdefault(consumer.name, {})
        what = "T_c used" if item.measure == "T_c" else kind.version
        shown, value = seen.get(what), _short(item.recorded)
        if item.recorded is None:
            seen.setdefault(what, "not recorded")
        elif isinstance(item.recorded, dict):
            seen[what] = item.recorded
        else:
            seen[what] = value if shown in (None, "not recorded", value) else f"{shown}, {value}"
        if kind.on_record is not None:
            kind.on_record(node, item, consumer.name)
        now = node.measure(item.measure) if item.recorded is not None else None
        diff = _difference(item.recorded, now)
        if diff:
            node.entry.flag(STALE, kind.stale.format(consumer=consumer.name, diff=diff, now=now,
                                                     recorded=item.recorded))
            consumer.entry.flag(STALE, f"{node.name} changed since this was made ({diff})")
        latest = node.entry.dagster[0] if node.entry.dagster else None
        if item.dagster and latest and latest.get("data_version") and latest["data_version"] != item.dagster:
            node.entry.flag(STALE, f"Dagster has a newer materialisation of {kind.asset}{_partition_text(latest)} "
                                   f"(data version {latest['data_version']}, run {latest['run_id']}) than the "
                                   f"{item.dagster} {consumer.name} consumed")

    def report(self, target: str, kind: str) -> LineageReport:
        home = getattr(getattr(self.records, "instance", None), "root_directory", None)
        return LineageReport(target, kind, self.layout.root, home, [self.stages[k] for k, _ in STAGES])


def _difference(recorded: Any, now: Any) -> str | None:
    """How ``now`` differs from ``recorded`` in words (per key for dicts), None when it does not."""
    if recorded is None or now is None:
        return None
    if isinstance(recorded, dict) and isinstance(now, dict):
        changed = [f"{k}: {_short(v)} -> {_short(now[k])}" for k, v in recorded.items()
                   if k in now and not _same(v, now[k])]
        return "; ".join(changed) or None
    return None if _same(recorded, now) else f"recorded {recorded}, now {now}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int):
        return abs(float(a) - float(b)) <= 1e-6
    return a == b


# ---------------------------------------------------------------------------------------------------------------
# what each kind of artifact records (its inputs) and what it is now


def _hashed(node: Node, field_name: str, missing: str) -> bool:
    """A file artifact's version is its content hash (what consumers record); False when it is gone."""
    node.measures["version"] = node.entry.fields[field_name] = file_hash(node.uri)
    if node.measures["version"] is None:
        node.entry.flag(MISSING, missing)
    return node.measures["version"] is not None


def _read_index(walk: Walk, node: Node, _item: Input) -> list[Input]:
    node.name, node.dagster = f"index {node.key}", (node.key, None)
    if not _hashed(node, "index sha256[:16] now", f"index file {node.uri} no longer exists"):
        return []
    index, fields = aio.read_parquet(node.uri), node.entry.fields
    normal = index["is_normal"] if "is_normal" in index else pd.Series(dtype=object)
    fields.update({"images": len(index), "unique images": int(index["image_id"].nunique()),
                   "categories": sorted(index.get("category", pd.Series(dtype=str)).dropna().astype(str).unique()),
                   "normal / defective / unknown": f"{int((normal == True).sum())} / "  # noqa: E712
                   f"{int((normal == False).sum())} / {int(normal.isna().sum())}"})  # noqa: E712
    annotations = walk.layout.annotations(node.key)
    if aio.is_file(annotations):
        fields["annotation boxes"] = len(aio.read_parquet(annotations, columns=["image_id"]))
    return []  # an index is read from the source folder itself: nothing upstream is an artifact


def _read_maps(walk: Walk, node: Node, _item: Input) -> list[Input]:
    from agssp_pipeline.kead.store import store_versions

    node.name, node.dagster = f"map store {node.key}", (node.key, None)
    stored = store_versions(node.uri)
    current = stored[0].get("current_version") if stored else None
    node.measures["version"] = node.entry.fields["current version"] = current
    if stored is None:
        node.entry.flag(MISSING, f"no map store at {node.uri}")
        return []
    node.versions = stored[1]
    node.entry.fields["versions in store"] = sorted(node.versions)
    _show_map_version(node, current)
    return []  # versions record encoder, weights, prompts and references, not the index version they mapped


# what a map-store version records of what made it: label -> key path in its attrs
MAP_VERSION_FIELDS = {"encoder": "encoder", "model": "identity.model", "mode": "identity.mode",
                      "weights": "weights", "prompts hash": "prompt_hash", "grid": "grid_size",
                      "maps": "committed", "created": "created_at", "code": "code_version",
                      "reference images": "references"}


def _show_map_version(node: Node, version: str | None) -> None:
    if not version or f"version {version}" in node.entry.fields or node.versions is None:
        return
    attrs = node.versions.get(version)
    node.entry.fields[f"version {version}"] = "no longer in the store" if attrs is None else {
        label: _pick(attrs, path) for label, path in MAP_VERSION_FIELDS.items()}


def _on_map_record(node: Node, item: Input, consumer: str) -> None:
    _show_map_version(node, item.recorded)
    if item.recorded and node.versions is not None and item.recorded not in node.versions:
        node.entry.flag(MISSING, f"version {item.recorded} used by {consumer} is no longer in the store")


def _map_inputs(source: str, versions: Any) -> list[Input]:
    listed = versions if isinstance(versions, list) else [versions] if versions else [None]
    return [Input("maps", source, recorded=v) for v in listed]


def _read_thresholds(walk: Walk, node: Node, _item: Input) -> list[Input]:
    node.name = node.entry.label = "thresholds table"
    node.dagster = (None, None)
    if not _hashed(node, "table sha256[:16] now", f"no thresholds table at {node.uri}"):
        return []
    table = aio.read_parquet(node.uri)
    node.entry.fields["per category"] = {
        str(row["category"]): {"T_c": float(row["threshold"]), "image cutoff": float(row["image_cutoff"]),
                               "images": int(row["n_images"]), "sources": row["sources"]}
        for _, row in table.iterrows()}
    node.measures["T_c"] = {str(c): float(t) for c, t in zip(table["category"], table["threshold"], strict=True)}
    used: dict[str, str] = {}
    for text in table.get("map_store_versions", pd.Series(dtype=str)).dropna():
        used.update({s: v for s, v in json.loads(text).items() if v})
    node.entry.fields["map store versions used"] = used
    return [i for source, version in sorted(used.items()) for i in _map_inputs(source, version)]


def _read_pseudo_boxes(walk: Walk, node: Node, _item: Input) -> list[Input]:
    node.name, node.dagster = f"pseudo boxes {node.key}", (node.key, None)
    if not _hashed(node, "table sha256[:16] now", f"pseudo-box table {node.uri} no longer exists"):
        return []
    table = aio.read_parquet(node.uri)
    images = table.drop_duplicates("image_id")
    versions = sorted(set(table["map_store_version"].dropna().astype(str)))
    used = images.dropna(subset=["threshold"]).groupby("category")["threshold"].first()
    node.entry.fields.update({
        "images": len(images), "judged defective": int(images["judged_defective"].sum()),
        "boxes": int(table["box_index"].notna().sum()), "built from map store version": versions,
        "T_c used": {str(k): float(v) for k, v in used.items()}})
    extra = {k: v[:500] for k, v in aio.parquet_metadata(node.uri).items()}
    if extra:
        node.entry.fields["parquet metadata"] = extra
    walk.note("pseudo_boxes", "pseudo-box tables record the T_c value per row, not the thresholds table "
                              "version: staleness against the thresholds is judged by comparing those values")
    return [Input("index", node.key), *_map_inputs(node.key, versions),
            Input("thresholds", "thresholds", recorded=node.entry.fields["T_c used"], measure="T_c")]


def _checkpoint_inputs(lineage: dict[str, Any]) -> list[Input]:
    """The recorded inputs of a checkpoint (``checkpoint.recorded_inputs``) as walk inputs."""
    seen = lineage.get("dagster_upstream_data_versions") or {}
    inputs = []
    for record in ckpt.recorded_inputs(lineage):
        kind = _kind_of_asset(record.get("asset"))
        if kind in SUMMARIES and record.get("uri"):
            own = (lineage.get("backbone") or {}).get("lineage") if kind == "backbone" else None
            inputs.append(Input(kind, aio.canonical(record["uri"]), record["uri"], record.get("version"), lineage=own))
        if kind is None or kind in SUMMARIES:
            continue
        key = record.get("partition") or "thresholds"
        dagster = (seen.get(record["asset"]) or {}).get(key)
        inputs.append(Input(kind, key, record.get("uri"), record.get("version"), dagster=dagster))
        if kind == "pseudo_boxes" and record.get("map_store_version"):
            inputs.extend(_map_inputs(key, list(record["map_store_version"])))
    return inputs


def _read_checkpoint(walk: Walk, node: Node, item: Input) -> list[Input]:
    on_disk = ckpt.read_lineage(node.uri) or None
    lineage = on_disk or item.lineage or {}
    name_key = "backbone" if node.kind == "backbone" else "model"
    name = str(lineage.get("name") or lineage.get(name_key) or "?")
    run_id = str(lineage.get("run_id") or aio.name(node.uri))
    node.entry.label = label = f"{name} run {run_id}"
    node.name = f"{node.kind} {label}"
    node.dagster = (name if node.kind == "backbone" else None, run_id)
    if on_disk is None:
        node.entry.flag(MISSING, f"checkpoint files no longer at {node.uri}"
                        + ("; shown as recorded by its consumer" if item.lineage else ""))
    node.entry.fields.update({label: _pick(lineage, path) for label, path in SUMMARIES[node.kind].items()})
    pointer = ckpt.read_latest_pointer(walk.layout, name, kind=node.kind) if name != "?" else None
    if pointer and pointer.get("run_id") not in (None, run_id):
        node.entry.flag(NEWER, f"a later {node.kind} {name} run exists: {pointer['run_id']} (latest.json)")
    if node.kind == "backbone":
        node.measures["version"] = lambda: _backbone_digest(node.uri) if on_disk else None
    else:
        node.measures["version"] = (on_disk or {}).get("weights_digest")
    inputs = _checkpoint_inputs(lineage)
    _note_unrecorded(walk, node.kind, label, {i.kind for i in inputs})
    return inputs


# links a checkpoint of each kind is expected to record: input kind -> (stage, what is missing in words)
EXPECTED_INPUTS = {
    "backbone": {"index": ("sources", "no data lineage"), "thresholds": ("thresholds", "no threshold table")},
    "detector": {"backbone": ("backbone", "no backbone checkpoint"),
                 "pseudo_boxes": ("pseudo_boxes", "no pseudo-box tables"),
                 "thresholds": ("thresholds", "no threshold table")},
}


def _note_unrecorded(walk: Walk, kind: str, label: str, found: set[str]) -> None:
    """Say which links a checkpoint's lineage does not record (a detector's T_c live in its pseudo-box tables)."""
    for input_kind, (stage, missing) in EXPECTED_INPUTS[kind].items():
        if input_kind not in found:
            extra = " (its pseudo-box tables carry the T_c values they used)" if kind == "detector" \
                and input_kind == "thresholds" else ""
            walk.note(stage, f"{missing} recorded in {kind} checkpoint {label}{extra}")


def _backbone_digest(run_dir: str) -> str | None:
    """Digest of the YOLOv8 backbone tensors of a backbone checkpoint, as detector and finetune record it."""
    try:
        state, _ = ckpt.load_checkpoint(run_dir)
        return ckpt.state_dict_digest(ckpt.backbone_state_for_detector(state))
    except (FileNotFoundError, ValueError):
        return None


# what a checkpoint's lineage shows of itself: label -> dotted key path
SUMMARIES: dict[str, dict[str, str]] = {
    "backbone": {"status": "status", "created": "created_at", "epochs completed": "epochs_completed",
                 "base loss": "resolved.base_loss", "final losses": "final_losses", "config hash": "config_hash",
                 "data hash": "data_hash", "classes": "data.classes", "code": "code", "device": "device"},
    "detector": {"created": "created_at", "weights digest": "weights_digest", "training set": "training_set",
                 "epochs": "settings.epochs", "image size": "settings.image_size",
                 "frozen backbone layers": "settings.freeze_layers",
                 "pseudo-box val mAP50": "ultralytics_metrics.metrics/mAP50(B)"},
}


def _pick(record: Any, path: str) -> Any:
    for part in path.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def _read_evaluation(walk: Walk, node: Node, _item: Input) -> list[Input]:
    table = aio.read_parquet(node.uri)
    dataset = str(table["dataset"].iloc[0]) if "dataset" in table and len(table) else aio.name(node.uri)
    node.entry.label, node.name, node.dagster = f"dataset {dataset}", f"evaluation {dataset}", (None, None)
    columns = [c for c in ("regime", "variant", "map50", "map50_95", "delta_map50_95", "checkpoint_run_id")
               if c in table]
    node.entry.fields["rows"] = {f"{r.get('regime', '-')}/{r.get('variant', '-')}": {
        k: _plain(r[k]) for k in columns[2:] if not pd.isna(r[k])} for r in table[columns].to_dict("records")}
    node.entry.fields.update({k: _plain(table[k].iloc[0]) for k in ("model", "epochs", "imgsz", "seed")
                              if k in table and len(table)})
    written = aio.modified_time(node.uri)
    node.entry.fields["written"] = datetime.fromtimestamp(written or 0, UTC).isoformat(timespec="seconds")
    _check_split(walk, node, dataset)
    walk.note("sources", f"evaluation tables do not record the index version of their dataset ({dataset}); "
                         "the stored split's fingerprint is compared instead (stage 7)")
    inputs = [Input("index", dataset)]
    for row in table.drop_duplicates("checkpoint").to_dict("records") if "checkpoint" in table else []:
        checkpoint = row.get("checkpoint")
        if not isinstance(checkpoint, str) or not checkpoint:
            continue
        lineage = json.loads(row["checkpoint_lineage"]) if row.get("checkpoint_lineage") else {}
        kind = ckpt.checkpoint_kind(lineage)
        if kind not in SUMMARIES:
            walk.note("evaluations", f"variant {row.get('variant')} started from {checkpoint}: "
                                     "not a pipeline checkpoint, no lineage beyond the file")
            continue
        digest = row.get("initial_digest") if isinstance(row.get("initial_digest"), str) else None
        inputs.append(Input(kind, aio.canonical(checkpoint), checkpoint, digest, lineage=lineage))
    variants = set(table.get("variant", pd.Series(dtype=str)))
    if "agssp" not in variants:
        walk.note("detector", f"evaluation {dataset} has no agssp variant (no detector checkpoint used)")
    if not variants & {"agbp", "agssp"}:
        walk.note("backbone", f"evaluation {dataset} used no pipeline checkpoint")
    return inputs


def _check_split(walk: Walk, node: Node, dataset: str) -> None:
    """The stored split's fingerprint of the labelled set vs the same fingerprint of the index as it is now."""
    from agssp_pipeline.training.splits import labelled_set_fingerprint, read_split, split_path

    uri = split_path(walk.layout, dataset)
    stored = read_split(uri)
    if stored is None:
        node.entry.fields["split"] = "no stored split found"
        return
    meta = stored[1]
    node.entry.fields["split"] = {"path": uri, "fingerprint": meta.get("fingerprint"), "params": meta.get("params")}
    index_uri, annotations_uri = walk.layout.index(dataset), walk.layout.annotations(dataset)
    if meta.get("fingerprint") and aio.is_file(index_uri) and aio.is_file(annotations_uri):
        now = labelled_set_fingerprint(aio.read_parquet(index_uri), aio.read_parquet(annotations_uri))
        node.entry.fields["labelled set fingerprint now"] = now
        if now != meta["fingerprint"]:
            node.entry.flag(STALE, f"the labelled set of {dataset} changed since it was split and evaluated "
                                   f"(split fingerprint {meta['fingerprint']}, now {now})")


def _read_kead_evaluation(walk: Walk, node: Node, _item: Input) -> list[Input]:
    source = aio.name(node.uri).removesuffix(".parquet")
    node.entry.label = node.name = f"KeAD evaluation {source}"
    node.dagster = (source, None)
    table = aio.read_parquet(node.uri)
    overall = table[table["level"] == "overall"] if "level" in table else table
    if "evaluated_at" in overall:
        overall = overall.sort_values("evaluated_at", kind="stable")
    node.entry.fields["evaluated map store versions"] = {
        str(r.get("store_version")): {k: _plain(r[k]) for k in ("image_auroc", "pixel_auroc", "evaluated_at")
                                      if k in r and not pd.isna(r[k])} for r in overall.to_dict("records")}
    latest = str(overall["store_version"].iloc[-1]) if "store_version" in overall and len(overall) else None
    return _map_inputs(source, latest)


def _read_box_quality(walk: Walk, node: Node, _item: Input) -> list[Input]:
    table = aio.read_parquet(node.uri)
    source = str(table["source"].iloc[0]) if "source" in table and len(table) else aio.name(node.uri)
    node.entry.label = node.name = f"box quality {source}"
    node.dagster = (source, None)
    measured = {"view", "method", "iou_threshold"} <= set(table.columns)
    boxes = table[(table["view"] == "boxes") & (table["method"] == "pseudo")] if measured else table.iloc[:0]
    node.entry.fields["pseudo boxes vs ground truth"] = {
        f"IoU {r['iou_threshold']:g}": {"recall": _plain(r["recall"]), "precision": _plain(r["precision"])}
        for r in boxes.to_dict("records")}
    walk.note("evaluations", f"box-quality table of {source} does not record the pseudo-box table version it "
                             "measured (shown: the table there now)")
    return [Input("pseudo_boxes", source)]


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values (for JSON and printing)."""
    return value.item() if hasattr(value, "item") else value


@dataclass(frozen=True)
class Kind:
    """A kind of artifact: its stage, Dagster asset, where the layout puts it, and how its record is read."""

    stage: str
    asset: str
    locate: Callable[[StorageLayout, str], str]  # name (source, dataset, model) -> where the layout puts it
    read: Callable[[Walk, Node, Input], list[Input]]
    version: str = "version"  # what its consumers record of it, in words
    stale: str = "{consumer} used another version of it ({diff})"
    on_record: Callable[[Node, Input, str], None] | None = None


def _kind_of_asset(asset: str | None) -> str | None:
    return next((kind for kind, spec in KINDS.items() if spec.asset == asset), None)


KINDS: dict[str, Kind] = {
    "index": Kind("sources", "image_index", StorageLayout.index, _read_index, "index sha256[:16]",
                  "index changed since {consumer} consumed it ({diff})"),
    "maps": Kind("maps", "anomaly_maps", StorageLayout.maps_store, _read_maps, "map store version",
                 "map store moved to version {now} since {consumer} used {recorded}", _on_map_record),
    "thresholds": Kind("thresholds", "category_thresholds", lambda layout, _: layout.thresholds(),
                       _read_thresholds, "table sha256[:16]", "thresholds changed since {consumer} was made ({diff})"),
    "pseudo_boxes": Kind("pseudo_boxes", "pseudo_boxes", StorageLayout.pseudo_boxes, _read_pseudo_boxes,
                         "table sha256[:16]", "table rewritten since {consumer} trained on it ({diff})"),
    "backbone": Kind("backbone", "backbone_checkpoint", lambda layout, name: layout.checkpoints("backbone", name),
                     _read_checkpoint, "weights digest", "weights changed since {consumer} loaded them ({diff})"),
    "detector": Kind("detector", "detector_checkpoint", lambda layout, name: layout.checkpoints("detector", name),
                     _read_checkpoint, "weights digest", "weights changed since {consumer} loaded them ({diff})"),
    "evaluation": Kind("evaluations", "finetune_evaluation", lambda layout, name: layout.evaluations("finetune", name),
                       _read_evaluation),
    "kead_evaluation": Kind("evaluations", "kead_evaluation", lambda layout, name: layout.evaluations("kead", name),
                            _read_kead_evaluation),
    "box_quality": Kind("evaluations", "pseudo_box_quality",
                        lambda layout, name: layout.evaluations("box_quality", name), _read_box_quality),
}


def _add_consumers(walk: Walk, run_dir: str, kind: str) -> None:
    """Evaluations (and, for a backbone, detectors) whose records name the checkpoint at ``run_dir``."""
    users = [run_dir]
    if kind == "backbone":
        for lineage_uri in aio.glob(walk.layout.checkpoints("detector", "*", "*", ckpt.LINEAGE_FILE)):
            backbone = (aio.read_json(lineage_uri).get("backbone") or {})
            if isinstance(backbone, dict) and backbone.get("checkpoint") \
                    and aio.same_location(backbone["checkpoint"], run_dir):
                detector = aio.canonical(aio.parent(lineage_uri))
                users.append(detector)
                walk.visit(Input("detector", detector, detector), follow=False)
    found = False
    finetune = aio.glob(walk.layout.evaluations("finetune", "*"))
    for uri in [u for u in finetune if not u.endswith(NOT_ARTIFACTS)]:
        table = aio.read_parquet(uri)
        named = table["checkpoint"].dropna().astype(str) if "checkpoint" in table else []
        if any(aio.same_location(c, u) for c in named for u in users):
            walk.visit(Input("evaluation", aio.canonical(uri), uri), follow=False)
            found = True
    if not found:
        walk.note("evaluations", "no evaluation table under the storage root used this checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# targets: artifact paths and asset names


@dataclass
class ResolvedTarget:
    kind: str  # a key of KINDS
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


def resolve_path(target: str) -> ResolvedTarget:
    """The artifact at a path, by where the layout puts each kind (checkpoints: by their lineage's kind)."""
    uri = aio.canonical(target)
    if not aio.exists(uri):
        raise LineageTargetError(f"{target}: no such file or folder")
    name, folder = aio.name(uri), aio.name(aio.parent(uri))
    if uri.endswith(".parquet"):
        stem = name.removesuffix(".parquet")
        if name == "thresholds.parquet":
            return ResolvedTarget("thresholds", uri)
        if folder == "index":
            source = stem.removesuffix(".annotations").removesuffix(".quarantine")
            return ResolvedTarget("index", aio.join(aio.parent(uri), f"{source}.parquet"), source)
        if folder == "pseudo_boxes":
            return ResolvedTarget("pseudo_boxes", uri, stem)
        if folder in EVALUATION_FOLDERS and aio.name(aio.parent(aio.parent(uri))) == "evaluations":
            table = aio.join(aio.parent(uri), stem.removesuffix(".per_class") + ".parquet")
            return ResolvedTarget(EVALUATION_FOLDERS[folder], table, stem.removesuffix(".per_class"))
        raise LineageTargetError(f"{uri}: a Parquet file the pipeline did not write (not an index, pseudo-box, "
                                 "thresholds or evaluations/<kind>/ table)")
    if folder == "maps.zarr" and aio.exists(aio.join(uri, "zarr.json")):
        return ResolvedTarget("maps", uri, name)
    try:
        run = aio.canonical(ckpt.resolve_checkpoint_dir(uri))
    except FileNotFoundError:
        run = uri
    kind = ckpt.checkpoint_kind(ckpt.read_lineage(run))
    if kind not in SUMMARIES:
        raise LineageTargetError(f"{uri}: not a backbone or detector checkpoint (no lineage.json saying which)")
    return ResolvedTarget(kind, run)


def _newest(uris: list[str]) -> str | None:
    return max(uris, key=lambda u: aio.modified_time(u) or 0.0) if uris else None


def _latest_checkpoint(layout: StorageLayout, kind: str, partition: str | None, config) -> str | None:
    """The latest run of the named model, else of the configured one, else the newest of any name."""
    configured = getattr(config.detector, "backbone" if kind == "backbone" else "model") if config else None
    for name in [partition] if partition else [configured] if configured else []:
        if ckpt.read_latest_pointer(layout, name, kind=kind):
            return ckpt.latest_checkpoint_dir(layout, name, kind=kind)
    newest = _newest(aio.glob(layout.checkpoints(kind, "*", ckpt.LATEST_FILE)))
    return ckpt.resolve_checkpoint_dir(aio.parent(newest)) if newest and not partition else None


def _latest_artifact(layout: StorageLayout, kind: str, partition: str | None, config) -> str | None:
    """The artifact of an asset: of the partition when given, else the newest one the layout holds."""
    if kind in SUMMARIES:
        return _latest_checkpoint(layout, kind, partition, config)
    locate = KINDS[kind].locate
    if partition or kind == "thresholds":
        uri = locate(layout, partition or "")
        return uri if aio.exists(uri) else None
    found = [u for u in aio.glob(locate(layout, "*")) if not u.endswith(NOT_ARTIFACTS)
             and (kind != "maps" or aio.exists(aio.join(u, "zarr.json")))]
    return _newest(found)


def parse_asset_target(target: str) -> tuple[str, str | None]:
    """``pseudo_boxes``, ``pseudo_boxes[demo_x]`` or ``pseudo_boxes:demo_x`` -> (asset, partition)."""
    if target.endswith("]") and "[" in target:
        asset, partition = target[:-1].split("[", 1)
        return asset, partition
    asset, _, partition = target.partition(":")
    return asset, partition or None


def resolve_target(target: str, layout: StorageLayout | None, config=None) -> ResolvedTarget:
    asset, partition = parse_asset_target(target)
    kind = _kind_of_asset(asset)
    if kind is None or aio.exists(target):
        return resolve_path(target)
    if layout is None:
        raise LineageTargetError(f"'{asset}' is an asset name: pass --config (or set AGSSP_CONFIG) "
                                 "so its latest artifact can be found under storage_root")
    uri = _latest_artifact(layout, kind, partition, config)
    if uri is None:
        where = f"[{partition}]" if partition else ""
        raise LineageTargetError(f"no artifact of {asset}{where} under {layout.root}: materialise it first")
    return ResolvedTarget(kind, aio.canonical(uri), aio.name(uri).removesuffix(".parquet"))


# ---------------------------------------------------------------------------------------------------------------
# entry point

# targets whose report stops at their own stage -> that stage
UPSTREAM_ONLY_TARGETS = {"index": "sources", "maps": "maps", "thresholds": "thresholds", "pseudo_boxes": "pseudo_boxes"}


def _start(walk: Walk, resolved: ResolvedTarget) -> None:
    per_source = resolved.kind in ("index", "maps", "pseudo_boxes")
    key = resolved.name if per_source else "thresholds" if resolved.kind == "thresholds" else resolved.uri
    walk.visit(Input(resolved.kind, key, resolved.uri))
    if resolved.kind in ("backbone", "detector"):
        _add_consumers(walk, resolved.uri, resolved.kind)
    if resolved.kind in UPSTREAM_ONLY_TARGETS:
        keys = [key for key, _ in STAGES]
        for later in keys[keys.index(UPSTREAM_ONLY_TARGETS[resolved.kind]) + 1:]:
            if not walk.stages[later].entries:
                walk.note(later, "downstream of the target: not followed (pass a checkpoint or an evaluation "
                                 "to see what consumed these artifacts)")


def _dagster_records(instance, config_path: str | Path | None, use_dagster: bool) -> DagsterRecords | None:
    """Records of the given instance, else of the one at DAGSTER_HOME / ``<config dir>/dagster_home``."""
    if not use_dagster:
        return None
    if instance is None:
        home = find_dagster_home(config_path)
        if home is None:
            return None
        import dagster as dg

        instance = dg.DagsterInstance.from_config(home)
    return DagsterRecords(instance)


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
    walk = Walk(layout, _dagster_records(instance, config_path, use_dagster))
    _start(walk, resolved)
    return walk.report(target, resolved.kind)
