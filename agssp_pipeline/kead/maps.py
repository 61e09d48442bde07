"""Small utilities on patch-resolution anomaly maps and the image batches they come from."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def upsample_map(patch_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a (G, G) map to image pixels (H, W), float32.

    Maps are stored at patch resolution (float16) to keep the store small; consumers that need
    pixels (boxes, pixel AUROC, training) call this.
    """
    src = np.asarray(patch_map, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {src.shape}")
    return cv2.resize(src, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


def batch_images(tensors: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One (B, C, H, W) tensor when every image has the same shape, else the list itself.

    Aspect-preserving preprocessing (``kead.input: aspect``) gives images of several shapes; encoders that
    take lists forward each shape group as its own batch, so no image is padded or squashed to share one.
    """
    if tensors and all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    return list(tensors)
