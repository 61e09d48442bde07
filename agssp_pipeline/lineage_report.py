"""``agssp lineage``: the chain behind an artifact, as a walk over what each writer recorded it was made from.

Why artifacts rather than Dagster: a checkpoint copied to another machine, or a storage root whose Dagster
instance was lost, must still answer "which maps, thresholds and boxes made this?". Each writer records its
inputs in what it writes, and the module beside each writer reads them back into one shape
(``agssp_pipeline.records``; the readers are named in ``KINDS``). This module only walks those records:
from the target it follows recorded inputs upstream, depth first, and compares each record with the input
as it is now: ``STALE`` (it changed after it was consumed), ``NEWER`` (a later run exists), ``MISSING``
(it is gone). Links nobody recorded are stated as such, never filled in. With a Dagster instance each
artifact also gets its materialisation records (Dagster is imported only then).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agssp_pipeline import artifact_io as aio
from agssp_pipeline.records import ASSETS, KIND_OF_ASSET, MISSING, NEWER, STALE, Input, Record
from agssp_pipeline.storage import StorageLayout
from agssp_pipeline.training import checkpoint as ckpt

__all__ = ["MISSING", "NEWER", "STALE", "LineageReport", "LineageTargetError", "build_lineage_report",
           "infer_storage_root", "parse_asset_target"]

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
MEASURES = {"T_c": "T_c used", "map_rows": "map rows (count:digest of image ids)"}  # besides "version"
DAGSTER_RECORDS_SCANNED = 200


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
# what each kind is: its stage, where the layout puts it, and the reader beside its writer


def _uri(_layout: StorageLayout, uri: str, _item: Input) -> tuple:
    return (uri,)


@dataclass(frozen=True)
class Kind:
    stage: str
    locate: Callable[[StorageLayout, str], str]  # name (source, dataset, model) -> where the layout puts it
    reader: str  # "module:function" beside the kind's writer, imported when first used (finetune is heavy)
    version: str = "version"  # what its consumers record of it, in words
    stale: str = "{consumer} used another version of it ({diff})"
    args: Callable[[StorageLayout, str, Input], tuple] = _uri  # the reader's arguments

    def read(self, layout: StorageLayout, uri: str, item: Input) -> Record:
        module, function = self.reader.split(":")
        return getattr(importlib.import_module(f"agssp_pipeline.{module}"), function)(*self.args(layout, uri, item))


def _checkpoint_args(kind: str) -> Callable[[StorageLayout, str, Input], tuple]:
    return lambda layout, uri, item: (uri, kind, layout, item.lineage)


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
    "backbone": Kind("backbone", lambda layout, name: layout.checkpoints("backbone", name),
                     "training.checkpoint:checkpoint_record", "weights digest",
                     "weights changed since {consumer} loaded them ({diff})", _checkpoint_args("backbone")),
    "detector": Kind("detector", lambda layout, name: layout.checkpoints("detector", name),
                     "training.checkpoint:checkpoint_record", "weights digest",
                     "weights changed since {consumer} loaded them ({diff})", _checkpoint_args("detector")),
    "evaluation": Kind("evaluations", lambda layout, name: layout.evaluations("finetune", name),
                       "training.finetune:evaluation_record", args=lambda layout, uri, _: (uri, layout)),
    "kead_evaluation": Kind("evaluations", lambda layout, name: layout.evaluations("kead", name),
                            "kead.evaluation:evaluation_record"),
    "box_quality": Kind("evaluations", lambda layout, name: layout.evaluations("box_quality", name),
                        "boxes.stage:quality_record", "table sha256[:16]"),
}


# ---------------------------------------------------------------------------------------------------------------
# the walk


@dataclass
class Node:
    """An artifact met on the walk: its report entry and its record."""

    kind: str
    entry: Entry
    record: Record


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
        node = self.nodes.get((item.kind, item.key))
        if node is None:
            kind = KINDS[item.kind]
            uri = aio.canonical(item.uri or kind.locate(self.layout, item.key))
            record = kind.read(self.layout, uri, item)
            node = self.nodes[(item.kind, item.key)] = Node(item.kind, Entry(record.label or item.key, uri,
                                                                             record.fields), record)
            self.stages[kind.stage].entries.append(node.entry)
            for level, message in record.flags:
                node.entry.flag(level, message)
            for about, text in record.notes:
                self.note(KINDS[about].stage, text)
            if self.records is not None:
                node.entry.dagster = self.records.records(ASSETS[item.kind], record.partition, record.run_id)
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
        shown, value = seen.get(what), _short(item.version)
        if item.version is None:
            seen.setdefault(what, "not recorded")
        elif isinstance(item.version, dict):
            seen[what] = item.version
        else:
            seen[what] = value if shown in (None, "not recorded", value) else f"{shown}, {value}"
        if item.measure == "version" and record.history is not None and isinstance(item.version, str):
            node.entry.fields.setdefault(f"version {item.version}",
                                         record.history.get(item.version, "no longer in the store"))
            if item.version not in record.history:
                node.entry.flag(MISSING, f"version {item.version} used by {name} is no longer in the store")
        now = record.measure(item.measure) if item.version is not None else None
        diff = _difference(item.version, now)
        if diff:
            template = kind.stale if item.measure != "map_rows" else \
                "the rows in the index changed since {consumer} used them ({diff})"
            node.entry.flag(STALE, template.format(consumer=name, diff=diff, now=now, recorded=item.version))
            consumer.entry.flag(STALE, f"{record.name} changed since this was made ({diff})")
        latest = node.entry.dagster[0] if node.entry.dagster else None
        if item.dagster and latest and latest.get("data_version") and latest["data_version"] != item.dagster:
            node.entry.flag(STALE, f"Dagster has a newer materialisation of {ASSETS[node.kind]}"
                                   f"{_partition_text(latest)} (data version {latest['data_version']}, run "
                                   f"{latest['run_id']}) than the {item.dagster} {name} consumed")

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
    for uri in [u for u in aio.glob(walk.layout.evaluations("finetune", "*")) if not u.endswith(NOT_ARTIFACTS)]:
        table = aio.read_parquet(uri, columns=None)
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


def _resolve_table(uri: str) -> ResolvedTarget:
    name, folder = aio.name(uri), aio.name(aio.parent(uri))
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


def resolve_path(target: str) -> ResolvedTarget:
    """The artifact at a path, by where the layout puts each kind (checkpoints: by their lineage's kind)."""
    uri = aio.canonical(target)
    if not aio.exists(uri):
        raise LineageTargetError(f"{target}: no such file or folder")
    if uri.endswith(".parquet"):
        return _resolve_table(uri)
    if aio.name(aio.parent(uri)) == "maps.zarr" and aio.exists(aio.join(uri, "zarr.json")):
        return ResolvedTarget("maps", uri, aio.name(uri))
    try:
        run = aio.canonical(ckpt.resolve_checkpoint_dir(uri))
    except FileNotFoundError:
        run = uri
    kind = ckpt.checkpoint_kind(ckpt.read_lineage(run))
    if kind not in ckpt.SUMMARIES:
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
    if kind in ckpt.SUMMARIES:
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
    kind = KIND_OF_ASSET.get(asset)
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
