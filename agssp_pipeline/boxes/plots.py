"""Small PNG figures for asset metadata: map-maximum distributions with T_c, box counts, box previews.

Figures are tiny (a few kB) because Dagster stores metadata in its event log; matplotlib runs headless.
"""

from __future__ import annotations

import base64
import io

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from agssp_pipeline.sources.decode import read_bgr  # noqa: E402


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


def box_preview(paths: list[str], boxes: list[pd.DataFrame], thumb: int = 128, columns: int = 4) -> bytes | None:
    """A JPEG grid of thumbnails with their pseudo boxes drawn; unreadable images are skipped.

    JPEG because surface textures barely compress as PNG (200 kB vs ~25 kB for eight thumbnails).
    """
    tiles = []
    for path, image_boxes in zip(paths, boxes, strict=True):
        try:
            image = read_bgr(path)
        except OSError:
            continue
        height, width = image.shape[:2]
        scale = thumb / max(height, width)
        tile = np.full((thumb, thumb, 3), 255, np.uint8)
        small = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))))
        tile[: small.shape[0], : small.shape[1]] = small
        for x1, y1, x2, y2 in image_boxes[["x1", "y1", "x2", "y2"]].to_numpy(np.float64) * scale:
            cv2.rectangle(tile, (int(x1), int(y1)), (max(int(x1), int(x2) - 1), max(int(y1), int(y2) - 1)),
                          (43, 57, 192), 1)
        tiles.append(tile)
    if not tiles:
        return None
    rows = -(-len(tiles) // columns)
    grid = np.full((rows * (thumb + 2), min(len(tiles), columns) * (thumb + 2), 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (thumb + 2) : r * (thumb + 2) + thumb, c * (thumb + 2) : c * (thumb + 2) + thumb] = tile
    ok, encoded = cv2.imencode(".jpg", grid, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return encoded.tobytes() if ok else None
