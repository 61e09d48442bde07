"""The contract every anomaly-map encoder fulfils (CLIP KeAD, WinCLIP mode, CNN few-shot).

The batch runner, the Zarr store and the Dagster asset only talk to this interface, so that
encoders can be swapped by name (see ``agssp_pipeline.kead.encoders.build_encoder``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class MapBatch:
    """Anomaly output for a batch of B images at patch resolution G x G."""

    maps: torch.Tensor  # (B, G, G) float32, fused map (zero-shot + few-shot where both exist)
    image_score: torch.Tensor  # (B,) float32
    zero_shot_score: torch.Tensor  # (B,) float32; NaN where the encoder has no text path


@dataclass
class EncoderIdentity:
    """What makes two map stores comparable: a change in any field starts a new store version."""

    encoder: str
    model: str
    weights: str  # tag, file sha256 prefix, or "random-init"
    mode: str
    prompt_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder,
            "model": self.model,
            "weights": self.weights,
            "mode": self.mode,
            "prompt_hash": self.prompt_hash,
            **self.extra,
        }


def forget_category(category: str | None, *memories: dict) -> None:
    """Drop ``category`` (None: every category) from each per-category memory dict of an encoder."""
    for memory in memories:
        if category is None:
            memory.clear()
        else:
            memory.pop(category, None)


@runtime_checkable
class AnomalyEncoder(Protocol):
    """Scores images; holds a per-category few-shot memory of normal reference patches."""

    identity: EncoderIdentity
    image_size: int  # square input side in pixels
    grid_size: int  # side of the patch-resolution map
    device: torch.device

    def preprocess(self, image_rgb_uint8: Any) -> torch.Tensor:
        """HWC uint8 RGB numpy image -> CHW float tensor ready for ``score`` (resize + normalise)."""
        ...

    def set_references(self, category: str, images: torch.Tensor) -> None:
        """Build the few-shot memory for ``category`` from preprocessed normal images (K, C, H, W)."""
        ...

    def clear_references(self, category: str | None = None) -> None:
        """Forget the memory of ``category`` (None: of every category), e.g. before another source's run."""
        ...

    def score(self, images: torch.Tensor, category: str) -> MapBatch:
        """One forward pass for a preprocessed batch (B, C, H, W) of one category."""
        ...
