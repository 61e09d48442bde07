"""The finetune comparison as a picture: one PNG per dataset, one row of panels per regime.

Left panel: mAP@0.5 (%) per variant, bar = mean over seeds, whisker = standard deviation (none with one
seed). Right panel: the paired difference against ``scratch`` with its 95 % bootstrap interval (over seeds
and validation images, ``eval/intervals.py``); a bar whose interval does not cross 0 is a difference beyond
noise. Not-applicable variants keep their place on the axis, labelled, so that no mode silently disappears.
Small (a few tens of kB at 72 dpi) because Dagster stores metadata in its event log; matplotlib runs headless.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

OK = "ok"
COLOURS = {"scratch": "#9e9e9e", "imagenet": "#5b7fa6", "domain": "#7fa35b", "agbp": "#d08c36", "agssp": "#b03a48"}
OTHER_COLOUR = "#6d5b9e"


def _regime_panels(axes, rows: pd.DataFrame, regime: str) -> None:
    names = rows["variant"].astype(str).tolist()
    positions = np.arange(len(names))
    usable = (rows["status"] == OK).to_numpy()
    colours = [COLOURS.get(n, OTHER_COLOUR) for n in names]
    means = rows["map50_pct_mean"].to_numpy(float)
    stds = np.nan_to_num(rows["map50_pct_std"].to_numpy(float))
    left, right = axes
    left.bar(positions[usable], means[usable], yerr=stds[usable], color=np.array(colours)[usable], capsize=3)
    left.set_ylabel("mAP@0.5 %", fontsize=8)
    left.set_title(f"{regime}: mean ± std over seeds", fontsize=9)
    delta = rows.get("map50_pct_vs_scratch", pd.Series(np.nan, index=rows.index)).to_numpy(float)
    low = rows.get("map50_pct_vs_scratch_low", pd.Series(np.nan, index=rows.index)).to_numpy(float)
    high = rows.get("map50_pct_vs_scratch_high", pd.Series(np.nan, index=rows.index)).to_numpy(float)
    shown = usable & np.isfinite(delta)
    errors = np.vstack([delta - low, high - delta])[:, shown]
    right.bar(positions[shown], delta[shown], yerr=np.nan_to_num(errors), color=np.array(colours)[shown], capsize=3)
    right.axhline(0.0, color="#333333", linewidth=0.8)
    right.set_ylabel("Δ mAP@0.5 vs scratch (points)", fontsize=8)
    right.set_title(f"{regime}: paired Δ, 95 % bootstrap CI", fontsize=9)
    for axis in axes:
        axis.set_xticks(positions, [n if ok else f"{n}\n(n/a)" for n, ok in zip(names, usable, strict=True)],
                        fontsize=7, rotation=30)
        axis.tick_params(axis="y", labelsize=7)


def variant_chart(summary: pd.DataFrame, dataset: str) -> bytes:
    """PNG of one dataset's summary rows (``finetune_table.summarise``): every regime, every variant."""
    rows = summary[summary["dataset"] == dataset]
    if rows.empty:
        raise ValueError(f"no summary rows for dataset '{dataset}'")
    regimes = list(dict.fromkeys(rows["regime"]))
    figure, axes = plt.subplots(len(regimes), 2, figsize=(7.0, 2.6 * len(regimes)), squeeze=False)
    for axis_row, regime in zip(axes, regimes, strict=True):
        _regime_panels(axis_row, rows[rows["regime"] == regime].reset_index(drop=True), regime)
    figure.suptitle(f"{dataset}: finetune from each pretraining mode", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72)
    plt.close(figure)
    return buffer.getvalue()
