"""``agssp lineage``: the chain behind an artifact, as a walk over what each writer recorded it was made from.

Why artifacts rather than Dagster: a checkpoint copied to another machine, or a storage root whose Dagster
instance was lost, must still answer "which maps, thresholds and boxes made this?". The module beside each
writer reads its records back into one shape (``agssp_pipeline.records``; the readers are named in
``KINDS``); this walk follows them upstream from the target and compares each with the input as it is now:
``STALE`` (changed after it was consumed), ``NEWER`` (a later run exists), ``MISSING`` (gone). Links nobody
recorded are stated, never filled in. Dagster's records are added when an instance exists (imported then).
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agssp_pipeline import artifact_io as aio
from agssp_pipeline import records
from agssp_pipeline.records import MISSING, NEWER, STALE, Input, Record, difference, short
from agssp_pipeline.storage import StorageLayout
from agssp_pipeline.training import checkpoint as ckpt

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
NOT_ARTIFACTS = (".annotations.parquet", ".quarantine.parquet", ".per_class.parquet", ".summary.parquet", ".lock")  # beside them
MEASURES = {"T_c": "T_c used", "map_rows": "map rows (count:digest of image ids)"}  # besides "version"
DAGSTER_RECORDS_SCANNED = 200


class LineageTargetError(ValueError):
    """The target is neither a known artifact path nor an asset with an artifact under storage_root."""


# ---- the report


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

    def summary(self) -> dict[str, int]:
        return {level: len(self.flags(level)) for level in (STALE, NEWER, MISSING)}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}

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
        lines.append("flags: " + ", ".join(f"{n} {level}" for level, n in self.summary().items()))
        return "\n".join(lines)


def _render_field(name: str, value: Any, indent: str) -> list[str]:
    if isinstance(value, dict) and value and any(isinstance(v, dict | list) for v in value.values()):
        lines = [f"{indent}{name}:"]
        for key, inner in value.items():
            lines.extend(_render_field(str(key), inner, indent + "  "))
        return lines
    if isinstance(value, dict):
        text = ", ".join(f"{k}={short(v)}" for k, v in value.items()) or "-"
    elif isinstance(value, list):
        text = ", ".join(short(v) for v in value) or "-"
    else:
        text = short(value)
    return [f"{indent}{name}: {text}"]


def _render_record(record: dict[str, Any]) -> str:
    if record.get("run_id") is None:
        return f"{_asset_text(record)}: {record.get('note', 'no materialisation recorded')}"
    return (f"{_asset_text(record)} run {record['run_id']} at {record['timestamp']} "
            f"data version {record.get('data_version') or '-'} ({record.get('match', 'latest')})")


def _asset_text(record: dict[str, Any]) -> str:
    return record["asset"] + (f"[{record['partition']}]" if record.get("partition") else "")


# ---- Dagster records (optional; dagster is imported only when an instance is used)


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


def dagster_records(instance, asset: str, partition: str | None, run_id: str | None = None) -> list[dict[str, Any]]:
    """The latest materialisation of an asset partition, and the one whose metadata names checkpoint ``run_id``."""
    import dagster as dg

    wanted = dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None)
    found = instance.fetch_materializations(wanted, limit=DAGSTER_RECORDS_SCANNED).records
    if not found:
        return [{"asset": asset, "partition": partition, "run_id": None,
                 "note": "no materialisation in the Dagster instance (made outside Dagster, or another instance)"}]
    out = [_describe_record(found[0], asset, partition, "latest")]
    # backbone_checkpoint names its AGBP run (run_id) and the mode 2 baseline it trained beside it (domain_run_id)
    matching = [r for r in found if run_id and run_id in (_metadata_text(r, "run_id"), _metadata_text(r, "domain_run_id"))]
    if run_id and not matching:
        out.append({"asset": asset, "partition": partition, "run_id": None,
                    "note": f"no materialisation of checkpoint run {run_id} in the instance"})
    elif matching and matching[0].storage_id == found[0].storage_id:
        out[0]["match"] = f"latest, made checkpoint run {run_id}"
    elif matching:
        out.append(_describe_record(matching[0], asset, partition, f"made checkpoint run {run_id}"))
    return out


def _describe_record(record, asset: str, partition: str | None, match: str) -> dict[str, Any]:
    tags = (record.asset_materialization.tags or {}) if record.asset_materialization else {}
    return {"asset": asset, "partition": partition, "run_id": record.run_id or "(runless event)",
            "timestamp": datetime.fromtimestamp(record.timestamp, UTC).isoformat(timespec="seconds"),
            "data_version": tags.get("dagster/data_version"), "match": match}


def _metadata_text(record, key: str) -> str | None:
    materialization = record.asset_materialization
    value = (materialization.metadata or {}).get(key) if materialization else None
    return None if value is None else str(getattr(value, "value", value))


# ---- the kinds: stage, where the layout puts each, and the reader beside its writer


@dataclass(frozen=True)
class Kind:
    stage: str
    locate: Callable[[StorageLayout, str], str]  # name (source, dataset, model) -> where the layout puts it
    reader: str  # "module:function" beside the kind's writer, imported when first used (finetune is heavy)
    version: str = "version"  # what its consumers record of it, in words
    stale: str = "{consumer} used another version of it ({diff})"
    args: Callable[[StorageLayout, str, Input], tuple] | None = None  # the reader's arguments; default (uri,)

    def read(self, layout: StorageLayout, uri: str, item: Input) -> Record:
        module, function = self.reader.split(":")
        args = self.args(layout, uri, item) if self.args else (uri,)
        return getattr(importlib.import_module(f"agssp_pipeline.{module}"), function)(*args)


def _checkpoint_kind(kind: str) -> Kind:
    return Kind(kind, lambda layout, name: layout.checkpoints(kind, name), "training.checkpoint:checkpoint_record",
                "weights digest", "weights changed since {consumer} loaded them ({diff})",
                lambda layout, uri, item: (uri, kind, layout, item.lineage))


def _evaluation_kind(folder: str, reader: str, **extra: Any) -> Kind:
    return Kind("evaluations", lambda layout, name: layout.evaluations(folder, name), reader, **extra)


KINDS: dict[str, Kind] = {
    "index": Kind("sources", StorageLayout.index, "sources.ingest:index_record", "index sha256[:16]",
                  "index changed since {consumer} consumed it ({diff})"),
    "maps": Kind("maps", StorageLayout.maps_store, "kead.store:store_record", "map store version",
                 "map store moved to version {now} since {consumer} used {recorded}",
                 lambda layout, uri, item: (uri, layout.index(item.key))),
    "thresholds": Kind("thresholds", lambda layout, _: layout.thresholds(), "boxes.stage:thresholds_record",
                       "table sha256[:16]", "thresholds changed since {consumer} was made ({diff})"),
    "pseudo_boxes": Kind("pseudo_boxes", StorageLayout.pseudo_boxes, "boxes.stage:pseudo_boxes_record",
                         "table sha256[:16]", "table rewritten since {consumer} trained on it ({diff})"),
    "backbone": _checkpoint_kind("backbone"),
    "detector": _checkpoint_kind("detector"),
    "evaluation": _evaluation_kind("finetune", "training.finetune:evaluation_record",
                                   args=lambda layout, uri, _: (uri, layout)),
    "kead_evaluation": _evaluation_kind("kead", "kead.evaluation:evaluation_record"),
    "box_quality": _evaluation_kind("box_quality", "boxes.stage:quality_record"),
    "attention": _evaluation_kind("attention", "eval.attention_probe:attention_record"),
}
PER_SOURCE = ("index", "maps", "pseudo_boxes")  # kinds keyed by source name (checkpoints, evaluations: address)


# ---- the walk


@dataclass
class Node:
    kind: str
    entry: Entry
    record: Record


class Walk:
    """Visits each artifact once, follows its recorded inputs, and compares every consumer's record."""

    def __init__(self, layout: StorageLayout, instance=None) -> None:
        self.layout, self.instance = layout, instance
        self.stages = {key: Stage(key, title) for key, title in STAGES}
        self.nodes: dict[tuple[str, str], Node] = {}

    def note(self, stage: str, text: str) -> None:
        if text not in self.stages[stage].notes:
            self.stages[stage].notes.append(text)

    def visit(self, item: Input, consumer: Node | None = None, follow: bool = True) -> Node:
        node = self.nodes.get((item.kind, item.key))
        if node is None:
            kind = KINDS[item.kind]
            uri = aio.canonical(item.uri or kind.locate(self.layout, item.key))
            record = kind.read(self.layout, uri, item)
            entry = Entry(record.label or item.key, uri, record.fields)
            node = self.nodes[(item.kind, item.key)] = Node(item.kind, entry, record)
            self.stages[kind.stage].entries.append(entry)
            for level, message in record.flags:
                entry.flag(level, message)
            for about, text in record.notes:
                self.note(KINDS[about].stage, text)
            if self.instance is not None:
                asset = records.ASSETS[item.kind]
                entry.dagster = dagster_records(self.instance, asset, record.partition, record.run_id)
            for upstream in record.inputs if follow else []:
                self.visit(upstream, node)
        if consumer is not None:
            self._compare(node, item, consumer)
        return node

    def _compare(self, node: Node, item: Input, consumer: Node) -> None:
        """Record what ``consumer`` saw of ``node`` and flag the differences with ``node`` as it is now."""
        kind, record, name = KINDS[node.kind], node.record, consumer.record.name
        seen = node.entry.fields.setdefault("recorded by", {}).setdefault(name, {})
        what = MEASURES.get(item.measure, kind.version)
        shown, value = seen.get(what), short(item.version)
        if item.version is None or isinstance(item.version, dict):
            seen[what] = seen.get(what, "not recorded") if item.version is None else item.version
        else:
            seen[what] = value if shown in (None, "not recorded", value) else f"{shown}, {value}"
        if item.measure == "version" and record.history is not None and isinstance(item.version, str):
            history = record.history.get(item.version, "no longer in the store")
            node.entry.fields.setdefault(f"version {item.version}", history)
            if item.version not in record.history:
                node.entry.flag(MISSING, f"version {item.version} used by {name} is no longer in the store")
        now = record.measure(item.measure) if item.version is not None else None
        diff = difference(item.version, now)
        if diff:
            stale = kind.stale if item.measure != "map_rows" else "its rows changed since {consumer} used them ({diff})"
            node.entry.flag(STALE, stale.format(consumer=name, diff=diff, now=now, recorded=item.version))
            consumer.entry.flag(STALE, f"{record.name} changed since this was made ({diff})")
        latest = node.entry.dagster[0] if node.entry.dagster else None
        if item.dagster and latest and latest.get("data_version") and latest["data_version"] != item.dagster:
            node.entry.flag(STALE, f"Dagster has a newer materialisation of {_asset_text(latest)} (data version "
                                   f"{latest['data_version']}, run {latest['run_id']}) than the {item.dagster} "
                                   f"{name} consumed")

    def consumers(self, run_dir: str, kind: str) -> None:
        """Add the evaluations (and, for a backbone, detectors) whose records name the checkpoint at ``run_dir``."""
        from agssp_pipeline.training.finetune import evaluations_using

        detectors = ckpt.detectors_using(self.layout, run_dir) if kind == "backbone" else []
        for uri in detectors:
            self.visit(Input("detector", uri, uri), follow=False)
        evaluations = evaluations_using(self.layout, [run_dir, *detectors])
        for uri in evaluations:
            self.visit(Input("evaluation", uri, uri), follow=False)
        if not evaluations:
            self.note("evaluations", "no evaluation table under the storage root used this checkpoint")


# ---- targets: artifact paths and asset names


@dataclass
class ResolvedTarget:
    kind: str  # a key of KINDS
    uri: str

    @property
    def key(self) -> str:
        """How the walk knows it: source name, "thresholds", or its address."""
        if self.kind in PER_SOURCE:
            return aio.name(self.uri).removesuffix(".parquet")
        return "thresholds" if self.kind == "thresholds" else self.uri


def infer_storage_root(uri: str) -> str | None:
    """The storage root above an artifact path laid out by ``StorageLayout``."""
    parts = uri.rstrip("/").split("/")
    for position in range(len(parts) - 1, 0, -1):
        if parts[position] in LAYOUT_FOLDERS:
            return "/".join(parts[:position])
    return "/".join(parts[:-1]) if parts[-1] == "thresholds.parquet" else None


def resolve_path(target: str) -> ResolvedTarget:
    """The artifact at a path: where ``KINDS`` locate each table and store, checkpoints by their lineage's kind."""
    uri = aio.canonical(target)
    if not aio.exists(uri):
        raise LineageTargetError(f"{target}: no such file or folder")
    root = infer_storage_root(uri)
    if root is not None and (uri.endswith(".parquet") or aio.name(aio.parent(uri)) == "maps.zarr"):
        base = re.sub(r"\.(annotations|quarantine|per_class|summary)(?=\.parquet$)", "", uri)  # the table they sit beside
        for kind, spec in KINDS.items():
            if kind not in ckpt.SUMMARIES and fnmatch.fnmatchcase(base, spec.locate(StorageLayout(root), "*")) \
                    and (kind != "maps" or aio.exists(aio.join(uri, "zarr.json"))):
                return ResolvedTarget(kind, base)
    if uri.endswith(".parquet"):
        raise LineageTargetError(f"{uri}: a Parquet file the pipeline did not write (not an index, pseudo-box, "
                                 "thresholds or evaluations/<kind>/ table)")
    try:
        run = aio.canonical(ckpt.resolve_checkpoint_dir(uri))
    except FileNotFoundError:
        run = uri
    kind = ckpt.checkpoint_kind(ckpt.read_lineage(run))
    if kind not in ckpt.SUMMARIES:
        raise LineageTargetError(f"{uri}: not a backbone or detector checkpoint (no lineage.json saying which)")
    return ResolvedTarget(kind, run)


def _latest_artifact(layout: StorageLayout, kind: str, partition: str | None, config) -> str | None:
    """The artifact of an asset: of the partition when given, else (checkpoints: of the configured model,
    else) the newest one the layout holds."""
    if kind in ckpt.SUMMARIES:
        configured = getattr(config.detector, "backbone" if kind == "backbone" else "model") if config else None
        for name in [partition] if partition else [configured] if configured else []:
            if ckpt.read_latest_pointer(layout, name, kind=kind):
                return ckpt.latest_checkpoint_dir(layout, name, kind=kind)
        return None if partition else ckpt.latest_run_of_any(layout, kind)
    locate = KINDS[kind].locate
    if partition or kind == "thresholds":
        uri = locate(layout, partition or "")
        return uri if aio.exists(uri) else None
    found = [u for u in aio.glob(locate(layout, "*")) if not u.endswith(NOT_ARTIFACTS)
             and (kind != "maps" or aio.exists(aio.join(u, "zarr.json")))]
    return max(found, key=lambda u: aio.modified_time(u) or 0.0) if found else None


def parse_asset_target(target: str) -> tuple[str, str | None]:
    """``pseudo_boxes``, ``pseudo_boxes[demo_x]`` or ``pseudo_boxes:demo_x`` -> (asset, partition)."""
    if target.endswith("]") and "[" in target:
        asset, partition = target[:-1].split("[", 1)
        return asset, partition
    asset, _, partition = target.partition(":")
    return asset, partition or None


def resolve_target(target: str, layout: StorageLayout | None, config=None) -> ResolvedTarget:
    asset, partition = parse_asset_target(target)
    kind = records.KIND_OF_ASSET.get(asset)
    if kind is None or aio.exists(target):
        return resolve_path(target)
    if layout is None:
        raise LineageTargetError(f"'{asset}' is an asset name: pass --config (or set AGSSP_CONFIG) "
                                 "so its latest artifact can be found under storage_root")
    uri = _latest_artifact(layout, kind, partition, config)
    if uri is None:
        where = f"[{partition}]" if partition else ""
        raise LineageTargetError(f"no artifact of {asset}{where} under {layout.root}: materialise it first")
    return ResolvedTarget(kind, aio.canonical(uri))


# ---- entry point


def _start(walk: Walk, resolved: ResolvedTarget) -> None:
    """Walk upstream from the target; a checkpoint also lists its consumers, a per-source artifact says it stops."""
    walk.visit(Input(resolved.kind, resolved.key, resolved.uri))
    if resolved.kind in ckpt.SUMMARIES:
        walk.consumers(resolved.uri, resolved.kind)
    if resolved.kind in (*PER_SOURCE, "thresholds"):
        keys = [key for key, _ in STAGES]
        for later in keys[keys.index(KINDS[resolved.kind].stage) + 1:]:
            if not walk.stages[later].entries:
                walk.note(later, "downstream of the target: not followed (pass a checkpoint or an evaluation "
                                 "to see what consumed these artifacts)")


def build_lineage_report(
    target: str, config_path: str | Path | None = None, instance=None, use_dagster: bool = True
) -> LineageReport:
    """The lineage of ``target`` (artifact path or asset name), from the artifacts and, if any, Dagster.

    ``instance``: a Dagster instance to read records from; default: the one at DAGSTER_HOME or
    ``<config dir>/dagster_home`` when it exists; none when ``use_dagster`` is false.
    """
    config, layout = None, None
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
    home = find_dagster_home(config_path) if use_dagster and instance is None else None
    if home is not None:
        import dagster as dg

        instance = dg.DagsterInstance.from_config(home)
    walk = Walk(layout, instance if use_dagster else None)
    _start(walk, resolved)
    home = getattr(walk.instance, "root_directory", None)
    return LineageReport(target, resolved.kind, layout.root, home, [walk.stages[k] for k, _ in STAGES])
