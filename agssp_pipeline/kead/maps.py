"""Small utilities on patch-resolution anomaly maps."""

from __future__ import annotations

import cv2
import numpy as np


def upsample_map(patch_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a (G, G) map to image pixels (H, W), float32.

    Maps are stored at patch resolution (float16) to keep the store small; consumers that need
    pixels (boxes, pixel AUROC, training) call this.
    """
    src = np.asarray(patch_map, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {src.shape}")
    return cv2.resize(src, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
