"""Pseudo-defect boxes from patch-resolution anomaly maps.

Per image judged defective: bilinear upsampling to image pixels, binarisation against the category
threshold T_c by a named rule (``BINARISATIONS``), connected components (cv2), components below a size
floor dropped, box = the component's bounding rectangle, score = the map's maximum over the component's
pixels; then NMS and the top-k by score. Binarisations:
- ``single``: pixels >= T_c (the paper);
- ``hysteresis``: components of pixels >= a lower level ``level + f * (T_c - level)`` that hold at least
  one pixel >= T_c (seeded at T_c, grown at the lower level; no component without a seed);
- ``rethreshold``: components at T_c, each then keeps only its pixels >= ``level + f * (peak - level)``
  and is relabelled: a blob that crossed T_c shrinks to the region around its peak.
``level`` is the image's normal level: the median of its patch map (most patches of an image are normal).

Vectorised per chunk of same-size images: per image only C calls (cv2 resize, threshold, cv2 labelling
without statistics, foreground pixel list); component statistics for the whole chunk from the sparse
foreground with unbuffered ufuncs; one ``torchvision.ops.nms`` call for every box. Images whose map
maximum is below T_c are skipped outright: bilinear interpolation is a convex combination of map values,
so such an image cannot have a single pixel at or above T_c (every binarisation needs one).

Box convention: pixel edges, ``x2 = left + width`` (exclusive), so ``(x2 - x1) * (y2 - y1)`` is the
bounding rectangle's area in pixels and a box covering the whole image is ``(0, 0, W, H)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
import torch
from torchvision.ops import nms

from agssp_pipeline.boxes.settings import BoxesSettings

BOX_COLUMNS = ["row", "x1", "y1", "x2", "y2", "score", "area"]
# pixels per chunk: bounds the sparse foreground arrays (~28 bytes per foreground pixel) to ~220 MiB
CHUNK_PIXEL_BUDGET = 8_000_000


@dataclass(frozen=True)
class BoxParams:
    """The knobs of box extraction (a view of ``BoxesSettings`` without the threshold logic)."""

    top_k: int = 10
    nms_iou: float = 0.5
    min_area_fraction: float = 0.0005
    min_area_pixels: int = 16
    connectivity: int = 8
    chunk_size: int = 256
    binarisation: str = "single"
    hysteresis_fraction: float = 0.5
    rethreshold_fraction: float = 0.5

    @classmethod
    def from_settings(cls, settings: BoxesSettings) -> BoxParams:
        return cls(
            binarisation=settings.rules().binarisation,
            hysteresis_fraction=settings.hysteresis_fraction,
            rethreshold_fraction=settings.rethreshold_fraction,
            top_k=settings.top_k,
            nms_iou=settings.nms_iou,
            min_area_fraction=settings.min_area_fraction,
            min_area_pixels=settings.min_area_pixels,
            connectivity=settings.connectivity,
            chunk_size=settings.chunk_size,
        )


def min_component_area(height: int, width: int, params: BoxParams) -> int:
    """Smallest kept component in pixels: a fraction of the image area, never below a fixed floor."""
    return max(int(params.min_area_pixels), math.ceil(params.min_area_fraction * height * width))


def _empty_boxes() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "row": np.zeros(0, np.int64),
            **{c: np.zeros(0, np.float32) for c in ("x1", "y1", "x2", "y2", "score")},
            "area": np.zeros(0, np.int64),
        }
    )


def _components(binary: np.ndarray, params: BoxParams) -> tuple[int, np.ndarray]:
    """cv2 labelling without statistics (those come from the sparse foreground, see ``_label_chunk``)."""
    return cv2.connectedComponentsWithAlgorithm(binary, params.connectivity, cv2.CV_32S, cv2.CCL_DEFAULT)


def _single(upsampled: np.ndarray, threshold: float, level: float, params: BoxParams, binary: np.ndarray):
    np.greater_equal(upsampled, threshold, out=binary.view(bool))
    return _components(binary, params)


def _hysteresis(upsampled: np.ndarray, threshold: float, level: float, params: BoxParams, binary: np.ndarray):
    low = min(threshold, level + params.hysteresis_fraction * (threshold - level))
    np.greater_equal(upsampled, low, out=binary.view(bool))
    n, labels = _components(binary, params)
    if n <= 1:
        return n, labels
    seeded = np.zeros(n, bool)
    seeded[labels[upsampled >= threshold]] = True
    seeded[0] = False
    if seeded[1:].all():
        return n, labels
    relabel = np.zeros(n, np.int32)
    relabel[seeded] = np.arange(1, int(seeded.sum()) + 1, dtype=np.int32)
    labels = relabel[labels]
    binary.view(bool)[...] = labels > 0
    return int(seeded.sum()) + 1, labels


def _rethreshold(upsampled: np.ndarray, threshold: float, level: float, params: BoxParams, binary: np.ndarray):
    n, labels = _single(upsampled, threshold, level, params, binary)
    if n <= 1:
        return n, labels
    foreground = np.flatnonzero(binary.view(bool))
    owner = labels.ravel()[foreground]
    values = upsampled.ravel()[foreground]
    peak = np.full(n, -np.inf, np.float32)
    np.maximum.at(peak, owner, values)
    cut = level + params.rethreshold_fraction * (peak - level)
    kept = values >= cut[owner]
    if kept.all():  # no component shrinks (T_c already above every cut): the labels stand
        return n, labels
    binary.fill(0)
    binary.ravel()[foreground[kept]] = 1
    return _components(binary, params)


# (upsampled map, T_c, image level, params, uint8 buffer) -> (labels incl. background, labels); on return
# ``binary`` holds the foreground of the labelled components
Binarisation = Callable[[np.ndarray, float, float, BoxParams, np.ndarray], tuple[int, np.ndarray]]
BINARISATIONS: dict[str, Binarisation] = {
    "single": _single,
    "hysteresis": _hysteresis,
    "rethreshold": _rethreshold,
}


def _label_chunk(
    maps: np.ndarray, rows: np.ndarray, thresholds: np.ndarray, levels: np.ndarray, height: int, width: int,
    params: BoxParams,
) -> pd.DataFrame:
    """Components of one chunk of same-size images; ``rows`` index into ``maps``/``thresholds``.

    Per image (buffers reused, so each step stays in cache): cv2 resize, the binarisation (threshold and
    cv2 labelling without statistics); only the foreground pixels are kept. Component statistics (area, bounding rectangle,
    score) for the whole chunk then come from those sparse pixels with unbuffered ufuncs, which is much
    cheaper than cv2's own statistics pass over every pixel of every image.
    """
    upsampled = np.empty((height, width), np.float32)
    binary = np.empty((height, width), np.uint8)
    label_parts, value_parts, position_parts, owner_parts = [], [], [], []
    offset = 0
    binarise = BINARISATIONS[params.binarisation]
    for row in rows:
        cv2.resize(maps[row], (width, height), dst=upsampled, interpolation=cv2.INTER_LINEAR)
        n, labels = binarise(upsampled, float(thresholds[row]), float(levels[row]), params, binary)
        if n <= 1:
            continue
        foreground = np.flatnonzero(binary.view(bool))
        label_parts.append(labels.ravel()[foreground] + (offset - 1))
        value_parts.append(upsampled.ravel()[foreground])
        position_parts.append(foreground)
        owner_parts.append(np.full(n - 1, row, np.int64))
        offset += n - 1
    if not offset:
        return _empty_boxes()
    label = np.concatenate(label_parts)
    y, x = np.divmod(np.concatenate(position_parts), width)
    area = np.bincount(label, minlength=offset)
    x1 = np.full(offset, width, np.int64)
    y1 = np.full(offset, height, np.int64)
    x2 = np.full(offset, -1, np.int64)
    y2 = np.full(offset, -1, np.int64)
    score = np.full(offset, -np.inf, np.float32)
    np.minimum.at(x1, label, x)
    np.minimum.at(y1, label, y)
    np.maximum.at(x2, label, x)
    np.maximum.at(y2, label, y)
    np.maximum.at(score, label, np.concatenate(value_parts))
    keep = np.flatnonzero(area >= min_component_area(height, width, params))
    if keep.size == 0:
        return _empty_boxes()
    return pd.DataFrame(
        {
            "row": np.concatenate(owner_parts)[keep],
            "x1": x1[keep].astype(np.float32),
            "y1": y1[keep].astype(np.float32),
            "x2": (x2[keep] + 1).astype(np.float32),
            "y2": (y2[keep] + 1).astype(np.float32),
            "score": score[keep],
            "area": area[keep],
        }
    )


def nms_top_k(boxes: pd.DataFrame, nms_iou: float, top_k: int) -> pd.DataFrame:
    """Per-image NMS (one ``torchvision.ops.nms`` call) then the ``top_k`` highest-scoring boxes per image.

    Only images with two or more boxes need NMS; their boxes are shifted per image by more than the
    largest coordinate so that boxes of different images never overlap (torchvision's own batched-NMS
    trick, without its per-image loop that kicks in above 4,000 boxes on CPU). NMS runs before top-k so
    that an image keeps up to ``top_k`` distinct boxes. Output sorted by row, then score descending.
    """
    if boxes.empty:
        return boxes.reset_index(drop=True)
    rows = boxes["row"].to_numpy()
    crowded = np.isin(rows, np.flatnonzero(np.bincount(rows) > 1))
    keep = ~crowded
    if crowded.any():
        coords = boxes.loc[crowded, ["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
        shift = (coords.max() + 1.0) * np.unique(rows[crowded], return_inverse=True)[1].astype(np.float64)
        kept = nms(
            torch.from_numpy(coords + shift[:, None]),
            torch.from_numpy(boxes.loc[crowded, "score"].to_numpy(np.float64)),
            nms_iou,
        ).numpy()
        keep[np.flatnonzero(crowded)[kept]] = True
    result = boxes[keep]
    order = np.lexsort((result["x1"].to_numpy(), -result["score"].to_numpy(), result["row"].to_numpy()))
    result = result.iloc[order].reset_index(drop=True)
    rank = result.groupby("row", sort=False).cumcount().to_numpy()
    return result[rank < top_k].reset_index(drop=True)


def extract_boxes(
    maps: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    thresholds: np.ndarray,
    params: BoxParams,
    candidates: np.ndarray | None = None,
) -> pd.DataFrame:
    """Boxes for maps (N, G, G) against per-image thresholds (N,) at image sizes (N,) x (N,).

    ``candidates``: boolean (N,) of images to process (those judged defective); default all.
    Returns ``BOX_COLUMNS`` with ``row`` indexing into the inputs, at most ``top_k`` per row.
    """
    maps = np.asarray(maps)
    n = maps.shape[0]
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    thresholds = np.asarray(thresholds, dtype=np.float32)
    if maps.ndim != 3 or len(heights) != n or len(widths) != n or len(thresholds) != n:
        raise ValueError(
            f"expected maps (N, G, G) with N heights, widths and thresholds; got {maps.shape}, "
            f"{len(heights)}, {len(widths)}, {len(thresholds)}"
        )
    if n and (heights.min() < 1 or widths.min() < 1):
        raise ValueError("image sizes must be positive")
    if params.binarisation not in BINARISATIONS:
        raise ValueError(f"unknown binarisation '{params.binarisation}' (known: {', '.join(BINARISATIONS)})")
    maps32 = maps.astype(np.float32, copy=False)
    selected = np.ones(n, bool) if candidates is None else np.asarray(candidates, bool).copy()
    if n:
        selected &= maps32.reshape(n, -1).max(axis=1) >= thresholds
    rows = np.flatnonzero(selected)
    if rows.size == 0:
        return _empty_boxes()
    levels = np.zeros(n, np.float32)
    if params.binarisation != "single":
        levels[rows] = np.median(maps32[rows].reshape(rows.size, -1), axis=1)
    parts = []
    sizes = pd.DataFrame({"row": rows, "h": heights[rows], "w": widths[rows]})
    for (height, width), group in sizes.groupby(["h", "w"], sort=True):
        group_rows = group["row"].to_numpy()
        chunk_size = max(1, min(params.chunk_size, CHUNK_PIXEL_BUDGET // int(height * width)))
        for start in range(0, len(group_rows), chunk_size):
            chunk = group_rows[start : start + chunk_size]
            parts.append(_label_chunk(maps32, chunk, thresholds, levels, int(height), int(width), params))
    boxes = pd.concat(parts, ignore_index=True) if parts else _empty_boxes()
    return nms_top_k(boxes, params.nms_iou, params.top_k)[BOX_COLUMNS]
