"""Defect shapes that are not mask files of the image's own (polygons, COCO RLE, instance masks) -> one mask.

Labelme, YOLO-seg and COCO store defects as polygons or run-lengths, and instance-mask folders as one file
per defect. The rest of the pipeline knows one pixel ground truth per image: ``mask_path`` in the index,
a binary PNG read by KeAD's evaluation and by box quality. Ingestion therefore rasterises the shapes of an
image into one union mask (after the probe, when the image size is known) and writes it under the storage
root (``index/masks/<source>/<relative image path>.png``, see ``StorageLayout.derived_masks``): the user's
folders are never written to. Boxes of polygons and RLE come from the annotation itself (its bbox); an
instance-mask file gives one box, the bounds of its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from agssp_pipeline import artifact_io


@dataclass(frozen=True)
class MaskShape:
    """One defect's region as the annotation file gives it; exactly one of polygon, rle, mask_file is set."""

    class_name: str
    origin: str  # annotation (or mask) file, for quarantine rows
    polygon: tuple[float, ...] | None = None  # x0 y0 x1 y1 ... (pixels, or [0, 1] units when normalized)
    rle: dict | None = None  # COCO RLE {"size": [h, w], "counts": list | str}
    mask_file: Path | None = None  # a binary mask of one instance, same size as the image
    normalized: bool = False


class ShapeError(ValueError):
    """A shape that cannot be rasterised on its image (reason in the message)."""


def polygon_mask(polygon: tuple[float, ...], height: int, width: int, normalized: bool = False) -> np.ndarray:
    """Filled polygon (uint8 0/1); COCO's pixel convention (pycocotools), so RLE and polygons agree."""
    coords = np.asarray(polygon, dtype=np.float64)
    if coords.size < 6 or coords.size % 2:
        raise ShapeError(f"a polygon needs at least 3 x,y points, got {coords.size} values")
    if not np.isfinite(coords).all():
        raise ShapeError("non-finite polygon coordinate")
    if normalized:
        coords = coords * np.tile([width, height], coords.size // 2)
    rle = coco_mask.frPyObjects([coords.tolist()], height, width)
    return coco_mask.decode(coco_mask.merge(rle)).astype(np.uint8)


def rle_mask(rle: dict, height: int, width: int) -> np.ndarray:
    """COCO RLE (uncompressed counts list or compressed string) decoded by pycocotools."""
    try:
        size = [int(v) for v in rle["size"]]
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ShapeError("RLE needs 'size' [h, w] and 'counts'") from None
    if size != [height, width]:
        raise ShapeError(f"RLE size {size[1]}x{size[0]} but the image is {width}x{height}")
    try:
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != height * width:
                raise ShapeError(f"RLE counts sum to {sum(counts)}, not {height * width} pixels")
            encoded = coco_mask.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, height, width)
        else:
            encoded = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
        return coco_mask.decode(encoded).astype(np.uint8)
    except ShapeError:
        raise
    except Exception as error:  # pycocotools raises bare exceptions on malformed strings
        raise ShapeError(f"undecodable RLE ({type(error).__name__})") from None


def shape_mask(shape: MaskShape, height: int, width: int, threshold: int = 127) -> np.ndarray:
    """The shape as a binary uint8 mask of the image's size; ShapeError when it cannot be."""
    if shape.polygon is not None:
        return polygon_mask(shape.polygon, height, width, shape.normalized)
    if shape.rle is not None:
        return rle_mask(shape.rle, height, width)
    if shape.mask_file is not None:
        from agssp_pipeline.sources.regions import read_mask

        try:
            mask = read_mask(str(shape.mask_file), threshold)
        except (ValueError, OSError) as error:
            raise ShapeError(f"unusable instance mask: {error}") from None
        if mask.shape != (height, width):
            raise ShapeError(f"instance mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}")
        return mask
    raise ShapeError("shape has no polygon, RLE or mask file")


def mask_bounds(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Pixel-edge bounds (x2 = x + w) of all foreground pixels; None for an empty mask."""
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask, dtype=np.uint8))
    return None if w == 0 or h == 0 else (float(x), float(y), float(x + w), float(y + h))


def write_mask_png(uri: str, mask: np.ndarray) -> str:
    """A 0/255 single-channel PNG (the >127 convention every mask reader here uses), via artifact_io."""
    ok, encoded = cv2.imencode(".png", (mask > 0).astype(np.uint8) * 255)
    if not ok:
        raise OSError(f"cannot encode derived mask {uri}")
    data = encoded.tobytes()
    if artifact_io.is_file(uri) and artifact_io.read_bytes(uri) == data:
        return uri  # re-ingestion of an unchanged folder rewrites nothing
    return artifact_io.write_bytes(uri, data)
