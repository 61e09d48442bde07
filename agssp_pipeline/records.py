"""The one shape of "what an artifact is and what it was made from", shared by every writer module.

Why one shape: each writer module reads back its own record next to the function that writes it
(``sources.ingest.index_record``, ``kead.store.store_record``, ``boxes.stage.thresholds_record`` /
``pseudo_boxes_record`` / ``quality_record``, ``kead.evaluation.evaluation_record``,
``training.finetune.evaluation_record``, ``training.checkpoint.checkpoint_record``), so a writer that
records a new input updates its reader in the same place, and ``agssp lineage`` walks any artifact
without knowing how it is stored. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STALE, NEWER, MISSING = "STALE", "NEWER", "MISSING"

# Dagster asset of each artifact kind (checkpoint lineages and Dagster records speak of assets)
ASSETS: dict[str, str] = {
    "index": "image_index", "maps": "anomaly_maps", "thresholds": "category_thresholds",
    "pseudo_boxes": "pseudo_boxes", "backbone": "backbone_checkpoint", "detector": "detector_checkpoint",
    "evaluation": "finetune_evaluation", "kead_evaluation": "kead_evaluation", "box_quality": "pseudo_box_quality",
    "attention": "backbone_attention_evaluation",
}
KIND_OF_ASSET: dict[str, str] = {asset: kind for kind, asset in ASSETS.items()}


@dataclass
class Input:
    """One recorded input: which artifact, and what it was when the consumer used it."""

    kind: str  # a key of ASSETS
    key: str  # source name, "thresholds", or the (canonical) address of a checkpoint
    uri: str | None = None  # where the consumer found it (None: where the layout puts it)
    version: Any = None  # what the consumer recorded of it; None: not recorded
    measure: str = "version"  # which current value ``version`` is compared with ("version", "T_c", "map_rows")
    lineage: dict[str, Any] | None = None  # the consumer's copy of the input's own record (shown if it is gone)
    dagster: str | None = None  # the Dagster data version the consumer saw


@dataclass
class Record:
    """What an artifact says of itself: its name, its current values, what to show, and its inputs."""

    name: str  # how it is named as a consumer ("pseudo boxes demo_x")
    label: str | None = None  # its own label in a report (None: its source name or address)
    now: dict[str, Any] = field(default_factory=dict)  # measure -> current value, or a zero-argument callable
    fields: dict[str, Any] = field(default_factory=dict)
    inputs: list[Input] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (kind the note is about, links not recorded)
    flags: list[tuple[str, str]] = field(default_factory=list)  # (level, message) found reading it
    partition: str | None = None  # its Dagster partition
    run_id: str | None = None  # the run that made it, where its Dagster metadata names one
    history: dict[str, Any] | None = None  # versions it still holds (map stores): id -> what made each

    def measure(self, name: str) -> Any:
        value = self.now.get(name)
        if callable(value):
            value = self.now[name] = value()
        return value

    def missing(self, message: str) -> Record:
        self.flags.append((MISSING, message))
        return self


def plain(value: Any) -> Any:
    """numpy scalars -> Python values (for JSON and printing)."""
    return value.item() if hasattr(value, "item") else value


def pick(record: Any, path: str) -> Any:
    """The value at a dotted key path of nested dicts, None where a key is absent."""
    for part in path.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def short(value: Any) -> str:
    """A value as shown in a report and in a difference (floats to 4 significant digits)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def difference(recorded: Any, now: Any) -> str | None:
    """How a current value differs from the recorded one, in words (per key for dicts); None when it does not.

    Numbers within 1e-6 are the same (T_c round-trips through Parquet); None on either side is no evidence.
    """
    if recorded is None or now is None:
        return None
    if isinstance(recorded, dict) and isinstance(now, dict):
        changed = [f"{k}: {short(v)} -> {short(now[k])}" for k, v in recorded.items()
                   if k in now and not _same(v, now[k])]
        return "; ".join(changed) or None
    return None if _same(recorded, now) else f"recorded {recorded}, now {now}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int):
        return abs(float(a) - float(b)) <= 1e-6
    return a == b


def map_inputs(source: str, versions: Any, rows: str | None = None) -> list[Input]:
    """Inputs for the map-store version(s) of ``source`` a consumer used, and the exact rows when recorded."""
    listed = versions if isinstance(versions, list) else [versions] if versions else [None]
    inputs = [Input("maps", source, version=v) for v in listed]
    return inputs + ([Input("maps", source, version=rows, measure="map_rows")] if rows else [])
