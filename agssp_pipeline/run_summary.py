"""What a run did and produced, in words a person can act on: printed at the end of ``agssp materialize``
and ``agssp demo``.

The steps (status and time per asset), the sources indexed, and the result tables of the evaluations the
run produced (KeAD AUROC, pseudo-box quality, the finetune comparison), each with its path. Everything is
read through ``artifact_io``, so it works on an ``s3://`` storage root too. Dagster-free: the report is
any object with ``steps`` of ``StepOutcome``-like items (``agssp_pipeline.orchestration``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from agssp_pipeline import artifact_io
from agssp_pipeline.config import PipelineConfig
from agssp_pipeline.storage import StorageLayout

KEAD_ASSET, BOX_QUALITY_ASSET, FINETUNE_ASSET, INDEX_ASSET = (
    "kead_evaluation", "pseudo_box_quality", "finetune_evaluation", "image_index")


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Left-aligned text columns wide enough for every cell (no terminal-width tricks: logs stay readable)."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return [indent + line for line in lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:]]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.3f}"
    return "—" if value is None else str(value)


def _where(step) -> str:
    return f"[{step.partition}]" if step.partition else ""


def step_lines(report) -> list[str]:
    """One row per asset: partitions ok / run, wall time (a single run over many partitions counted once)."""
    by_asset: dict[str, list] = {}
    for step in report.steps:
        by_asset.setdefault(step.asset, []).append(step)
    rows = []
    for asset, steps in by_asset.items():
        runs = {step.run_id or id(step): step.seconds for step in steps}
        not_ok = [f"{step.status} {step.partition}" if step.partition else step.status
                  for step in steps if step.status != "ok"]
        ok = sum(step.status == "ok" for step in steps)
        rows.append((asset, f"{ok}/{len(steps)} ok", f"{sum(runs.values()):.1f} s", ", ".join(not_ok)))
    total = sum({step.run_id or id(step): step.seconds for step in report.steps}.values())
    return [f"steps ({len(report.steps)}, {total:.1f} s):", *format_table(("asset", "status", "time", "not ok"), rows)]


def _produced(report, asset: str, candidates: Sequence[str]) -> list[str]:
    """Partitions of ``asset`` this run materialised (every candidate when there is no report)."""
    if report is None:
        return list(candidates)
    done = {step.partition for step in report.steps if step.asset == asset and step.success}
    return [name for name in candidates if name in done]


def _ran(report, asset: str) -> bool:
    return report is None or any(step.asset == asset and step.success for step in report.steps)


def source_lines(config: PipelineConfig, names: Sequence[str]) -> list[str]:
    """Images, boxes and quarantined files per indexed source."""
    layout = config.layout()
    rows = []
    for source in [s for s in config.sources if s.name in names]:
        index_path = layout.index(source.name)
        if not artifact_io.exists(index_path):
            rows.append((source.name, source.role, source.format, "(not indexed)", "", ""))
            continue
        n_images = len(artifact_io.read_parquet(index_path, columns=["image_id"]))
        ann = layout.annotations(source.name)
        n_boxes = len(artifact_io.read_parquet(ann, columns=["image_id"])) if artifact_io.exists(ann) else 0
        quarantine = layout.quarantine(source.name)
        actions = (artifact_io.read_parquet(quarantine, columns=["action"])["action"]
                   if artifact_io.exists(quarantine) else pd.Series([], dtype=str))
        # clipped boxes and converted images are kept; only "quarantined" rows are rejected files
        rows.append((source.name, source.role, source.format, n_images, n_boxes,
                     int((actions == "quarantined").sum())))
    if not rows:
        return []
    return ["sources:", *format_table(("source", "role", "format", "images", "boxes", "quarantined"), rows),
            f"  quarantine reasons: {layout.path('index')}/<source>.quarantine.parquet"]


def kead_lines(layout: StorageLayout, sources: Sequence[str]) -> list[str]:
    """Overall image/pixel AUROC of the latest evaluated map-store version per source."""
    rows, paths = [], []
    for source in sources:
        uri = layout.evaluations("kead", source)
        if not artifact_io.exists(uri):
            continue
        table = artifact_io.read_parquet(uri)
        overall = table[table["level"] == "overall"] if "level" in table else table
        if overall.empty:
            continue
        if "evaluated_at" in overall:
            overall = overall.sort_values("evaluated_at", kind="stable")
        last = overall.iloc[-1]
        rows.append((source, last.get("encoder"), last.get("n_images"), _float(last.get("image_auroc")),
                     _float(last.get("pixel_auroc"))))
        paths.append(uri)
    if not rows:
        return []
    return ["KeAD anomaly maps vs ground truth:",
            *format_table(("source", "encoder", "images", "image AUROC", "pixel AUROC"), rows),
            *[f"  table: {p}" for p in paths]]


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _pick(table: pd.DataFrame, column: str, **where: Any) -> float:
    """``column`` of the first row matching ``where`` (NaN when none or the column is absent)."""
    if column not in table:
        return float("nan")
    rows = table
    for key, value in where.items():
        if key not in rows:
            return float("nan")
        rows = rows[rows[key] == value]
    return _float(rows[column].iloc[0]) if len(rows) else float("nan")


def box_quality_lines(layout: StorageLayout, sources: Sequence[str]) -> list[str]:
    """Pseudo-box recall/precision at IoU 0.5 (and a random-box baseline), mask IoU at the configured delta."""
    rows, paths = [], []
    for source in sources:
        uri = layout.evaluations("box_quality", source)
        if not artifact_io.exists(uri):
            continue
        table = artifact_io.read_parquet(uri)
        boxes = table[table["view"] == "boxes"] if "view" in table else table.iloc[0:0]
        masks = table[(table["view"] == "mask")] if "view" in table else table.iloc[0:0]
        if "configured" in masks:
            masks = masks[masks["configured"].eq(True)]
        rows.append((source,
                     _pick(boxes, "recall", method="pseudo", iou_threshold=0.5),
                     _pick(boxes, "precision", method="pseudo", iou_threshold=0.5),
                     _pick(boxes, "recall", method="random", iou_threshold=0.5),
                     _float(masks["mask_iou"].iloc[0]) if len(masks) and "mask_iou" in masks else float("nan")))
        paths.append(uri)
    if not rows:
        return []
    return ["pseudo boxes vs ground truth (IoU 0.5):",
            *format_table(("source", "recall", "precision", "random recall", "mask IoU"), rows),
            *[f"  table: {p}" for p in paths]]


def finetune_lines(layout: StorageLayout, datasets: Sequence[str]) -> list[str]:
    """The variant comparison (``evaluations/finetune/<dataset>.md``) of each downstream dataset."""
    lines = []
    for dataset in datasets:
        uri = layout.evaluations("finetune", dataset, ".md")
        if artifact_io.exists(uri):
            lines += [f"finetune comparison, {dataset} ({uri}):", artifact_io.read_text(uri).rstrip()]
            chart = layout.evaluations("finetune", dataset, ".png")
            if artifact_io.exists(chart):
                lines.append(f"  chart (mean ± std, Δ vs scratch with 95% CI): {chart}")
    return lines


def artifact_lines(layout: StorageLayout) -> list[str]:
    artifacts = [("index", layout.path("index")), ("anomaly maps", layout.maps_root()),
                 ("thresholds", layout.thresholds()), ("pseudo boxes", layout.path("pseudo_boxes")),
                 ("checkpoints", layout.path("checkpoints")), ("evaluations", layout.path("evaluations"))]
    produced = [(label, path) for label, path in artifacts if artifact_io.exists(path)]
    return ["artifacts:", *[f"  {label:<14}{path}" for label, path in produced]] if produced else []


def render_summary(config: PipelineConfig, report=None, title: str = "AGSSP run summary") -> str:
    """The whole summary; ``report=None`` shows every result present (what the demo wants)."""
    layout = config.layout()
    names = config.source_names
    pretrain = [s.name for s in config.pretrain_sources()]
    sections = [step_lines(report)] if report is not None and report.steps else []
    sections += [
        source_lines(config, _produced(report, INDEX_ASSET, names)),
        kead_lines(layout, _produced(report, KEAD_ASSET, pretrain)),
        box_quality_lines(layout, _produced(report, BOX_QUALITY_ASSET, pretrain)),
        finetune_lines(layout, [s.name for s in config.downstream_sources()] if _ran(report, FINETUNE_ASSET) else []),
        artifact_lines(layout),
    ]
    body = "\n\n".join("\n".join(section) for section in sections if section)
    return f"\n=== {title} ===\nstorage_root: {layout.root}\n\n{body}\n"
