"""Looking at the demo corpus: defect contrast figures and contact sheets with ground-truth outlines.

Both read the written files (not the in-memory renders), so they show what the pipeline will see,
JPEG artefacts included.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from agssp_pipeline.demo.corpus import ground_truth, ground_truth_images, read_instance_mask


def read_grey(path: str | Path) -> np.ndarray:
    """8-bit grey pixels of any demo image (16-bit PNGs keep their top byte, CMYK JPEGs are converted)."""
    with Image.open(path) as image:
        if image.mode.startswith("I"):
            return (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
        return np.asarray(image.convert("L"))


def local_contrast(grey: np.ndarray, mask: np.ndarray, ring: int = 5, gap: int = 2) -> float:
    """|mean inside the mask - mean of a ring around it| in units of the ring's standard deviation.

    A scale-free "how visible is this defect against its own neighbourhood" figure: about 1 is subtle,
    above about 5 is a defect nobody needs a model for.
    """
    mask_u8 = mask.astype(np.uint8)
    near = cv2.dilate(mask_u8, np.ones((2 * (gap + ring) + 1,) * 2, np.uint8)).astype(bool)
    inner = cv2.dilate(mask_u8, np.ones((2 * gap + 1,) * 2, np.uint8)).astype(bool)
    background = grey[near & ~inner].astype(np.float32)
    inside = grey[mask].astype(np.float32)
    return abs(float(inside.mean() - background.mean())) / (float(background.std()) + 1e-6)


def defect_contrast(root: Path, source: str) -> pd.DataFrame:
    """The ground-truth boxes of ``source`` with ``contrast`` (``local_contrast``) and ``saturated``
    (fraction of the defect's pixels at 0 or 255) added."""
    boxes = ground_truth(root, source)
    contrast, saturated = [], []
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for row in boxes.itertuples():
        if row.path not in cache:
            cache = {
                row.path: (read_grey(row.path), read_instance_mask(row.mask_path))
            }  # rows come per image
        grey, labels = cache[row.path]
        mask = labels == row.instance
        contrast.append(local_contrast(grey, mask))
        saturated.append(float(((grey[mask] == 0) | (grey[mask] == 255)).mean()))
    return boxes.assign(contrast=contrast, saturated=saturated)


def contact_sheet(root: Path, source: str, limit: int = 16, columns: int = 8, tile: int = 160) -> np.ndarray:
    """BGR mosaic of the first ``limit`` images of ``source``, defect outlines in red, boxes in yellow."""
    images = ground_truth_images(root, source)
    images = images[images["duplicate_of_file"].isna()].head(limit)
    boxes = ground_truth(root, source)
    tiles = []
    for row in images.itertuples():
        grey = read_grey(row.path)
        labels = read_instance_mask(row.mask_path)
        sx, sy = tile / row.width, tile / row.height
        canvas = cv2.cvtColor(
            cv2.resize(grey, (tile, tile), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR
        )
        outline = cv2.resize((labels > 0).astype(np.uint8), (tile, tile), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(outline, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, (0, 0, 255), 1)
        for box in boxes[boxes["file"] == row.file].itertuples():
            top_left = (int(box.x1 * sx), int(box.y1 * sy))
            bottom_right = (int(np.ceil(box.x2 * sx)) - 1, int(np.ceil(box.y2 * sy)) - 1)
            cv2.rectangle(canvas, top_left, bottom_right, (0, 220, 255), 1)
        tiles.append(canvas)
    if not tiles:
        raise ValueError(f"demo source '{source}' has no images to show")
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)]
    return np.vstack(rows)
