"""A small contact sheet of indexed images with their boxes, for the asset's metadata page."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from agssp_pipeline.sources.decode import read_bgr


def contact_sheet(images: pd.DataFrame, annotations: pd.DataFrame, count: int = 8, tile: int = 96,
                  columns: int = 4, quality: int = 80) -> bytes | None:
    """JPEG bytes (small enough for Dagster metadata) of up to ``count`` images spread evenly over the
    sorted index, images with boxes preferred, boxes drawn in red; None when no image can be read.
    Images are read with OpenCV, which also reduces 16-bit files to 8-bit."""
    unique = images[images["duplicate_of"].isna()].sort_values("path", kind="stable")
    if unique.empty:
        return None
    boxed = unique[unique["path"].isin(set(annotations["path"]))]
    pool = boxed if len(boxed) >= count else unique
    picks = pool.iloc[np.unique(np.linspace(0, len(pool) - 1, num=min(count, len(pool))).round().astype(int))]
    tiles = []
    for row in picks.itertuples(index=False):
        try:
            image = read_bgr(row.path)
        except OSError:
            continue
        scale = tile / max(image.shape[:2])
        image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
        for box in annotations[annotations["path"] == row.path].itertuples(index=False):
            p1 = (int(box.x1 * scale), int(box.y1 * scale))
            p2 = (int(box.x2 * scale) - 1, int(box.y2 * scale) - 1)
            cv2.rectangle(image, p1, p2, (0, 0, 255), 1)
        canvas = np.full((tile, tile, 3), 255, dtype=np.uint8)
        canvas[: image.shape[0], : image.shape[1]] = image
        tiles.append(canvas)
    if not tiles:
        return None
    while len(tiles) % columns and len(tiles) > columns:
        tiles.append(np.full((tile, tile, 3), 255, dtype=np.uint8))
    rows = [np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)]
    ok, encoded = cv2.imencode(".jpg", np.vstack(rows), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return encoded.tobytes() if ok else None
