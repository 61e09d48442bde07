"""The finetune result tables: one row per run, one summary row per variant, and the comparison a user reads.

* runs (``<dataset>.parquet``): regime x variant x seed; mAP in percent (``map50_pct``, ``map50_95_pct``,
  ``ultralytics_*_pct``) and ``delta_*_pct`` against ``scratch`` of the same regime and seed. A variant that
  cannot exist for the backbone has one row per regime with ``status = "not applicable"`` and its reason.
* summary (``<dataset>.summary.parquet``): per regime and variant the mean and standard deviation over seeds
  and the paired difference against ``scratch`` and ``imagenet`` with its 95 % bootstrap interval over seeds
  and validation images (``eval/intervals.py``): ``map50_pct_vs_scratch`` and ``..._low`` / ``..._high``.
* the markdown comparison states its own settings (model, backbone, epochs, image size, seeds, image counts,
  what each variant starts from), so a number is never quoted without them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from agssp_pipeline.eval.intervals import RunMatches, paired_difference

BASELINES = ("scratch", "imagenet")
OK, NOT_APPLICABLE = "ok", "not applicable"
METRICS = {"map50_pct": 0, "map50_95_pct": slice(None)}  # column -> IoU thresholds of the interval


def add_deltas(table: pd.DataFrame, baseline: str = "scratch") -> pd.DataFrame:
    """``delta_<metric>``: each run minus the baseline run of the same dataset, regime and seed (NaN without)."""
    table = table.copy()
    keys = [k for k in ("dataset", "regime", "seed") if k in table]
    for metric in METRICS:
        base = table[table["variant"] == baseline].drop_duplicates(keys).set_index(keys)[metric]
        index = pd.MultiIndex.from_frame(table[keys]) if len(keys) > 1 else pd.Index(table[keys[0]])
        table[f"delta_{metric}"] = table[metric].to_numpy() - base.reindex(index).to_numpy()
    return table


def not_applicable_row(dataset: str, regime: str, variant: str, mode: str, reason: str,
                       settings: Mapping[str, Any]) -> dict[str, Any]:
    """The row of a variant that cannot exist for this backbone: kept, with its reason, never dropped."""
    return {"dataset": dataset, "regime": regime, "variant": variant, "mode": mode, "status": NOT_APPLICABLE,
            "note": reason, "map50_pct": np.nan, "map50_95_pct": np.nan, "initial_weights": "not applicable",
            **settings}


def _interval_columns(runs: Mapping[int, RunMatches], base: Mapping[int, RunMatches] | None, baseline: str,
                      replicates: int) -> dict[str, float]:
    row: dict[str, float] = {}
    for metric, thresholds in METRICS.items():
        name = f"{metric}_vs_{baseline}"
        if base is None or not set(runs) & set(base):
            row.update({name: np.nan, f"{name}_low": np.nan, f"{name}_high": np.nan})
            continue
        interval = paired_difference(runs, base, thresholds, replicates=replicates)
        row.update({name: interval.mean, f"{name}_low": interval.low, f"{name}_high": interval.high})
    return row


def summarise(table: pd.DataFrame, matches: Mapping[tuple[str, str, int], RunMatches],
              replicates: int = 500) -> pd.DataFrame:
    """One row per dataset, regime and variant: mean/std over seeds and paired intervals against the baselines.

    ``matches``: (regime, variant, seed) -> matched detections of that run (``intervals.match_run``).
    """
    rows = []
    for (dataset, regime), group in table.groupby(["dataset", "regime"], sort=False):
        for variant, runs in group.groupby("variant", sort=False):
            ok = runs[runs["status"] == OK]
            row: dict[str, Any] = {"dataset": dataset, "regime": regime, "variant": variant,
                                   "mode": runs["mode"].iloc[0], "status": OK if len(ok) else NOT_APPLICABLE,
                                   "note": "" if len(ok) else str(runs["note"].iloc[0]), "seeds": len(ok),
                                   "starts_from": str(runs.get("starts_from", runs["initial_weights"]).iloc[0])}
            for metric in (*METRICS, "ultralytics_map50_pct"):
                values = ok[metric].to_numpy(float) if metric in ok else np.array([])
                row[f"{metric}_mean"] = float(values.mean()) if len(values) else np.nan
                row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else np.nan
            mine = {int(s): matches[(regime, variant, int(s))] for s in ok.get("seed", [])}
            for baseline in BASELINES:
                base = {s: m for (r, v, s), m in matches.items() if r == regime and v == baseline}
                usable = base if mine and variant != baseline and base else None
                row.update(_interval_columns(mine, usable, baseline, replicates))
            rows.append(row)
    return pd.DataFrame(rows)


def _points(value: float) -> str:
    return "—" if pd.isna(value) else f"{value:.1f}"


def _mean_std(row: Mapping[str, Any], metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return _points(mean) + ("" if pd.isna(std) else f" ± {std:.1f}")


def _delta(row: Mapping[str, Any], name: str) -> str:
    value, low, high = row.get(name, np.nan), row.get(f"{name}_low", np.nan), row.get(f"{name}_high", np.nan)
    if pd.isna(value):
        return "—"
    return f"{value:+.1f} [{low:+.1f}, {high:+.1f}]"


def settings_lines(table: pd.DataFrame, regime: str, replicates: int | None = None) -> list[str]:
    """The settings a table's numbers depend on, in words."""
    runs = table[(table["regime"] == regime) & (table["status"] == OK)]
    if runs.empty:
        return [f"regime {regime}: no run"]
    first = runs.iloc[0]
    seeds = sorted({int(s) for s in runs["seed"]})
    text = (f"regime {regime}: {first['model']} on backbone {first.get('backbone') or first['model']}, "
            f"{int(first['epochs'])} epochs, image size {int(first['imgsz'])}, batch {int(first['batch'])}, "
            f"seeds {seeds}, {int(first['train_images'])} train / {int(first['val_images'])} val images; "
            "mAP in percent (COCO, last-epoch weights)")
    if replicates:
        text += f"; Δ [95% CI]: paired bootstrap over seeds and val images ({replicates} replicates)"
    return [text]


def comparison_markdown(summary: pd.DataFrame, table: pd.DataFrame | None = None,
                        replicates: int | None = None) -> str:
    """The paper's Table 2 per dataset and regime: every mode, mean ± std, Δ vs scratch and imagenet [95% CI]."""
    lines: list[str] = []
    for (dataset, regime), group in summary.groupby(["dataset", "regime"], sort=False):
        lines.append(f"**{dataset}**, " + (settings_lines(table[table["dataset"] == dataset], regime, replicates)[0]
                                           if table is not None else f"regime {regime}"))
        lines += ["", "| variant | mode | starts from | seeds | mAP@0.5 % | Δ vs scratch | Δ vs imagenet | "
                  "mAP@0.5:0.95 % | Δ vs scratch | Δ vs imagenet | ultralytics mAP@0.5 % |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in group.to_dict("records"):
            if row["status"] != OK:
                lines.append(f"| {row['variant']} | {row['mode']} | not applicable: {row['note']} | 0 |"
                             + " — |" * 7)
                continue
            lines.append(
                f"| {row['variant']} | {row['mode']} | {row['starts_from']} | {row['seeds']} | "
                f"{_mean_std(row, 'map50_pct')} | {_delta(row, 'map50_pct_vs_scratch')} | "
                f"{_delta(row, 'map50_pct_vs_imagenet')} | {_mean_std(row, 'map50_95_pct')} | "
                f"{_delta(row, 'map50_95_pct_vs_scratch')} | {_delta(row, 'map50_95_pct_vs_imagenet')} | "
                f"{_mean_std(row, 'ultralytics_map50_pct')} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def worse_than_scratch(summary: pd.DataFrame, variants: Sequence[str] = ("agssp",)) -> pd.DataFrame:
    """Summary rows of ``variants`` below scratch beyond noise: the whole 95 % interval of the paired
    difference (mAP@0.5 or mAP@0.5:0.95) is under zero. One lucky or unlucky seed does not trip it."""
    mine = summary[summary["variant"].isin(variants) & (summary["status"] == OK)]
    below = np.zeros(len(mine), dtype=bool)
    for metric in METRICS:
        column = f"{metric}_vs_scratch_high"
        if column in mine:
            below |= (mine[column] < 0).to_numpy()
    return mine[below]
