"""Labelled preview grids for asset pages: what a person needs to judge a stage at a glance.

One renderer serves every preview (ingestion contact sheets, KeAD's top anomalous maps, pseudo boxes):
tiles of one size laid out edge to edge on a dark ground (no white gaps), each image centred in its tile
with a caption band below (file name, class, score, ground truth), ground truth outlined in green and
predictions (pseudo boxes) in red. The result is a JPEG kept under ``max_bytes``, because Dagster keeps
metadata in its event log and shows it as a base64 data URI.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pandas as pd

from agssp_pipeline.sources.decode import read_bgr
from agssp_pipeline.sources.regions import read_mask

GROUND_TRUTH_BGR = (60, 200, 60)  # green: what the dataset says
PREDICTION_BGR = (40, 40, 230)  # red: what the pipeline found (pseudo boxes)
BACKGROUND_BGR = (28, 28, 28)
CAPTION_TEXT_BGR = (235, 235, 235)
LINE_HEIGHT = 15
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.4
MAX_PREVIEW_BYTES = 300_000
LEGEND = "green: ground truth (boxes, mask outlines); red: pseudo boxes"


@dataclass
class Tile:
    """One image of a preview, in its own pixels (boxes x1, y1, x2, y2; masks at image size)."""

    image: np.ndarray  # HxWx3 BGR uint8
    caption: list[str] = field(default_factory=list)
    gt_boxes: np.ndarray | None = None  # (N, 4)
    gt_mask: np.ndarray | None = None  # HxW bool
    pred_boxes: np.ndarray | None = None  # (N, 4)
    heat: np.ndarray | None = None  # HxW float in [0, 1], blended as a JET overlay


def _fit(text: str, width: int) -> str:
    """``text`` cut (with '..') until it fits ``width`` pixels: cv2 draws no ellipsis glyph."""
    if cv2.getTextSize(text, FONT, FONT_SCALE, 1)[0][0] <= width:
        return text
    while text and cv2.getTextSize(text + "..", FONT, FONT_SCALE, 1)[0][0] > width:
        text = text[:-1]
    return text + ".." if text else ""


def _thickness(side: int) -> int:
    return 2 if side >= 128 else 1


def _draw_boxes(canvas: np.ndarray, boxes: np.ndarray | None, scale: float, offset: tuple[int, int],
                colour: tuple[int, int, int]) -> None:
    if boxes is None or len(boxes) == 0:
        return
    dx, dy = offset
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64) * scale:
        p1 = (int(x1) + dx, int(y1) + dy)
        p2 = (max(int(x1), int(x2) - 1) + dx, max(int(y1), int(y2) - 1) + dy)
        cv2.rectangle(canvas, p1, p2, colour, _thickness(canvas.shape[1]))


def render_tile(tile: Tile, side: int, caption_lines: int) -> np.ndarray:
    """``tile`` drawn into a (side + caption band) x side canvas: image centred, outlines, caption."""
    height, width = tile.image.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = cv2.resize(tile.image, size, interpolation=cv2.INTER_AREA)
    if tile.heat is not None:
        heat = cv2.resize(np.clip(tile.heat, 0.0, 1.0).astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
        colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
        image = cv2.addWeighted(image, 0.55, colour, 0.45, 0)
    canvas = np.full((side + caption_lines * LINE_HEIGHT, side, 3), BACKGROUND_BGR, np.uint8)
    dx, dy = (side - size[0]) // 2, (side - size[1]) // 2
    canvas[dy : dy + size[1], dx : dx + size[0]] = image
    if tile.gt_mask is not None and tile.gt_mask.any():
        small = cv2.resize(tile.gt_mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, GROUND_TRUTH_BGR, _thickness(side), offset=(dx, dy))
    _draw_boxes(canvas, tile.gt_boxes, scale, (dx, dy), GROUND_TRUTH_BGR)
    _draw_boxes(canvas, tile.pred_boxes, scale, (dx, dy), PREDICTION_BGR)
    for i, line in enumerate(tile.caption[:caption_lines]):
        cv2.putText(canvas, _fit(line, side - 6), (3, side + (i + 1) * LINE_HEIGHT - 4), FONT, FONT_SCALE,
                    CAPTION_TEXT_BGR, 1, cv2.LINE_AA)
    return canvas


def grid(canvases: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Equal-size canvases edge to edge, ``columns`` per row; a short last row is filled with background."""
    columns = max(1, min(columns, len(canvases)))
    blank = np.full_like(canvases[0], BACKGROUND_BGR)
    cells = list(canvases) + [blank] * (-len(canvases) % columns)
    return np.vstack([np.hstack(cells[i : i + columns]) for i in range(0, len(cells), columns)])


def encode_jpeg(image: np.ndarray, max_bytes: int = MAX_PREVIEW_BYTES, quality: int = 85) -> bytes:
    """JPEG bytes under ``max_bytes``: lower quality first, then halve the size (textures compress badly)."""
    while True:
        for q in range(quality, 29, -10):
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, q])
            if ok and encoded.nbytes <= max_bytes:
                return encoded.tobytes()
        if min(image.shape[:2]) < 32:
            return encoded.tobytes()
        image = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)


def labelled_grid(tiles: Sequence[Tile], side: int = 256, columns: int = 4,
                  max_bytes: int = MAX_PREVIEW_BYTES) -> bytes | None:
    """A JPEG grid of labelled tiles (None when there is nothing to show)."""
    if not tiles:
        return None
    lines = max(len(t.caption) for t in tiles)
    return encode_jpeg(grid([render_tile(t, side, lines) for t in tiles], columns), max_bytes)


def jpeg_markdown(data: bytes, alt: str, legend: str = LEGEND) -> str:
    """Markdown of an inline JPEG (data URI; Dagster's markdown allows ``data:`` image sources) and a legend."""
    return f"![{alt}](data:image/jpeg;base64,{base64.b64encode(data).decode('ascii')})\n\n{legend}"


def readable_rows(rows: pd.DataFrame) -> Iterator[tuple[Any, np.ndarray]]:
    """(row, BGR image) of the index rows whose file decodes; a preview skips the others."""
    for row in rows.itertuples(index=False):
        try:
            yield row, read_bgr(row.path)
        except OSError:
            continue


def ground_truth_mask(mask_path: object) -> np.ndarray | None:
    """The image's GT mask as bool, or None when it has none or it cannot be read (a preview never fails)."""
    if not isinstance(mask_path, str) or not mask_path:
        return None
    try:
        return read_mask(mask_path).astype(bool)
    except (ValueError, OSError):
        return None


def normal_state(value: object) -> str:
    """'normal' / 'defect' / 'unlabelled' of an ``is_normal`` cell (null, numpy or Python bool)."""
    if value is None or pd.isna(value):
        return "unlabelled"
    return "normal" if bool(value) else "defect"


def contact_sheet(images: pd.DataFrame, annotations: pd.DataFrame, count: int = 8, tile: int = 256,
                  columns: int = 4, max_bytes: int = MAX_PREVIEW_BYTES) -> bytes | None:
    """Labelled JPEG grid of up to ``count`` images spread evenly over the sorted index, images with boxes
    preferred, their ground-truth boxes and mask outlines in green; None when no image can be read.
    Images are read with OpenCV, which also reduces 16-bit files to 8-bit."""
    unique = images[images["duplicate_of"].isna()].sort_values("path", kind="stable")
    if unique.empty:
        return None
    boxed = unique[unique["path"].isin(set(annotations["path"]))]
    pool = boxed if len(boxed) >= count else unique
    picks = pool.iloc[np.unique(np.linspace(0, len(pool) - 1, num=min(count, len(pool))).round().astype(int))]
    tiles = []
    for row, image in readable_rows(picks):
        boxes = annotations[annotations["path"] == row.path]
        classes = ", ".join(sorted(set(boxes["class_name"].astype(str)))) or "no boxes"
        caption = [os.path.basename(row.path), f"{row.category} | {normal_state(getattr(row, 'is_normal', None))}",
                   f"GT: {len(boxes)} box(es) {classes}" if len(boxes) else "GT: no boxes"]
        tiles.append(Tile(image, caption, gt_boxes=boxes[["x1", "y1", "x2", "y2"]].to_numpy(np.float64),
                          gt_mask=ground_truth_mask(getattr(row, "mask_path", None))))
    return labelled_grid(tiles, side=tile, columns=columns, max_bytes=max_bytes)
