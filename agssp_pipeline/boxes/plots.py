"""Figures for asset metadata: map-maximum distributions with T_c, box counts, labelled pseudo-box previews.

Plots are small PNGs (a few kB) and previews JPEGs under a few hundred kB, because Dagster stores metadata
in its event log; matplotlib runs headless.
"""

from __future__ import annotations

import base64
import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from agssp_pipeline.sources import preview  # noqa: E402


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def png_markdown(data: bytes, alt: str, mime: str = "image/png") -> str:
    """Inline markdown image (Dagster renders data URLs in markdown metadata)."""
    return f"![{alt}](data:{mime};base64,{base64.b64encode(data).decode('ascii')})"


def threshold_plot(map_max: np.ndarray, category: str, threshold: float, mean_max: float) -> bytes:
    """Histogram of a category's map maxima with the mean and T_c marked."""
    figure, axis = plt.subplots(figsize=(3.2, 2.0))
    axis.hist(np.asarray(map_max, np.float64), bins=30, color="#7a8ca3")
    axis.axvline(mean_max, color="#444444", linestyle="--", linewidth=1, label=f"mean max {mean_max:.3f}")
    axis.axvline(threshold, color="#c0392b", linewidth=1.5, label=f"T_c {threshold:.3f}")
    axis.set_title(category, fontsize=9)
    axis.set_xlabel("max of anomaly map", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.legend(fontsize=6, frameon=False)
    return _png(figure)


def boxes_per_image_plot(n_boxes: np.ndarray, top_k: int) -> bytes:
    """Histogram of boxes per image judged defective (0 = judged defective but nothing crossed T_c)."""
    figure, axis = plt.subplots(figsize=(3.2, 2.0))
    counts = np.bincount(np.asarray(n_boxes, np.int64), minlength=top_k + 1)
    axis.bar(np.arange(len(counts)), counts, color="#7a8ca3")
    axis.set_xlabel("boxes per defective image", fontsize=8)
    axis.set_ylabel("images", fontsize=8)
    axis.tick_params(labelsize=7)
    return _png(figure)


def box_preview(rows: pd.DataFrame, boxes: pd.DataFrame, ground_truth: pd.DataFrame | None = None,
                side: int = 256, columns: int = 4) -> bytes | None:
    """Labelled JPEG grid of ``rows`` (index rows: path, category, mask_path) with their pseudo boxes in red
    and, where the source has them, ground-truth boxes and mask outlines in green; unreadable images are
    skipped. Captions: file name, category, best box score and count, ground truth."""
    tiles = []
    for row, image in preview.readable_rows(rows):
        mine = boxes[boxes["image_id"] == row.image_id]
        gt = ground_truth[ground_truth["path"] == row.path] if ground_truth is not None else None
        mask = preview.ground_truth_mask(getattr(row, "mask_path", None))
        if gt is not None and len(gt):
            truth = f"GT: {len(gt)} box(es) " + ", ".join(sorted(set(gt["class_name"].astype(str))))
        else:
            truth = "GT: mask" if mask is not None else "GT: none"
        caption = [os.path.basename(row.path), str(row.category),
                   f"{len(mine)} pseudo box(es), max score {mine['score'].max():.3f}" if len(mine) else "no pseudo box",
                   truth]
        tiles.append(preview.Tile(image, caption, pred_boxes=mine[["x1", "y1", "x2", "y2"]].to_numpy(np.float64),
                                  gt_boxes=None if gt is None else gt[["x1", "y1", "x2", "y2"]].to_numpy(np.float64),
                                  gt_mask=mask))
    return preview.labelled_grid(tiles, side=side, columns=columns)
