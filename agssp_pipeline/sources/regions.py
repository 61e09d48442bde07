"""Boxes from pixel masks and run-length encodings, and the box sanity rules shared by all formats."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from agssp_pipeline import artifact_io
from agssp_pipeline.sources.decode import decode_image


@dataclass(frozen=True)
class BoxVerdict:
    """The outcome of checking one box against its image: kept as is, clipped, or rejected."""

    box: tuple[float, float, float, float] | None
    clipped: bool = False
    reason: str | None = None


def check_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> BoxVerdict:
    """Inverted or degenerate boxes are rejected (the annotator's intent is unknown); boxes partly
    outside are clipped (a common off-by-one in VOC exports); boxes wholly outside are rejected."""
    coords = (x1, y1, x2, y2)
    if not all(math.isfinite(v) for v in coords):
        return BoxVerdict(None, reason=f"non-finite box {coords}")
    if x2 <= x1 or y2 <= y1:
        return BoxVerdict(None, reason=f"inverted or empty box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g})")
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if cx2 <= cx1 or cy2 <= cy1:
        return BoxVerdict(None, reason=f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width}x{height} image")
    clipped = (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
    return BoxVerdict((cx1, cy1, cx2, cy2), clipped=clipped)


def boxes_from_mask(binary: np.ndarray, min_area: int = 1) -> list[tuple[float, float, float, float]]:
    """One box per 8-connected component, in pixel-edge coordinates (x2 = x + w).

    Labelling runs only on the bounding rectangle of the foreground: most masks are empty (defect-free
    images) or hold small defects, and that crop is what makes mask sources cheap to ingest.
    """
    binary = np.ascontiguousarray(binary, dtype=np.uint8)
    left, top, width, height = cv2.boundingRect(binary)  # of all non-zero pixels; zeros when empty
    if width == 0 or height == 0:
        return []
    crop = binary[top : top + height, left : left + width]
    count, _, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    boxes = []
    for label in range(1, count):  # label 0 is the background
        x, y, w, h, area = (int(v) for v in stats[label])
        if area >= min_area:
            boxes.append((float(left + x), float(top + y), float(left + x + w), float(top + y + h)))
    return boxes


def read_mask(path: str, threshold: int = 127) -> np.ndarray:
    """Binary mask (uint8 0/1) of pixels brighter than ``threshold``; raises ValueError if unreadable.

    The header is checked against the image size guard before any pixel is decoded (a 30000x30000 PNG
    would take gigabytes); decoding goes through the one image decoder (16-bit masks by their range).
    """
    data = np.frombuffer(artifact_io.read_bytes(path), dtype=np.uint8)  # derived masks may be on object storage
    if data.size == 0:
        raise ValueError("empty mask file (0 bytes)")
    try:  # the probe's guard for images: PIL refuses headers above 2 x MAX_IMAGE_PIXELS
        Image.open(io.BytesIO(data.tobytes())).close()
    except Image.DecompressionBombError as error:
        raise ValueError(f"mask is above the image size guard ({error})") from None
    except Exception as error:  # PIL raises many types for malformed headers
        raise ValueError(f"mask file cannot be decoded ({type(error).__name__})") from None
    try:
        mask = decode_image(data, path, grey=True)
    except OSError:
        raise ValueError("mask file cannot be decoded") from None
    return (mask > threshold).astype(np.uint8)


def decode_rle(encoded: str, height: int, width: int) -> np.ndarray:
    """Kaggle/Severstal run-length encoding: 'start length ...', 1-indexed, column-major (down first)."""
    values = encoded.split()
    if len(values) % 2:
        raise ValueError("odd number of run-length values")
    try:
        runs = np.asarray(values, dtype=np.int64).reshape(-1, 2)
    except ValueError:
        raise ValueError("non-integer run-length values") from None
    except OverflowError:
        raise ValueError("a run-length value is too large for any image") from None
    total = height * width
    starts, lengths = runs[:, 0] - 1, runs[:, 1]
    if (starts < 0).any() or (lengths <= 0).any() or (starts + lengths > total).any():
        raise ValueError(f"runs fall outside a {width}x{height} image")
    flat = np.zeros(total, dtype=np.uint8)
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        flat[start : start + length] = 1
    return flat.reshape(width, height).T
