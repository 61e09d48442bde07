"""Registry of named anomaly-map encoders: ``build_encoder(settings, device)``.

Builders import their module lazily so that, e.g., the CNN encoder works where open_clip is broken or
missing, and a new variant is one dict entry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from agssp_pipeline.kead.base import AnomalyEncoder
from agssp_pipeline.kead.settings import KeadSettings

EncoderBuilder = Callable[[KeadSettings, torch.device], AnomalyEncoder]


def _clip(settings: KeadSettings, device: torch.device) -> AnomalyEncoder:
    from agssp_pipeline.kead.clip_encoder import ClipKeadEncoder

    return ClipKeadEncoder.from_settings(settings, device)


def _winclip(settings: KeadSettings, device: torch.device) -> AnomalyEncoder:
    from agssp_pipeline.kead.winclip import WinClipEncoder

    return WinClipEncoder.from_settings(settings, device)


def _cnn_fewshot(settings: KeadSettings, device: torch.device) -> AnomalyEncoder:
    from agssp_pipeline.kead.cnn_encoder import CnnFewShotEncoder

    return CnnFewShotEncoder.from_settings(settings, device)


ENCODERS: dict[str, EncoderBuilder] = {
    "clip": _clip,  # KeAD: CLIP zero-shot text path + few-shot memory
    "winclip": _winclip,  # WinCLIP-style window scoring
    "cnn_fewshot": _cnn_fewshot,  # offline ImageNet EfficientNet-Lite0 PatchCore-style memory
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None) -> cuda when available, else cpu; anything else is passed to torch."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' requested but CUDA is not available on this machine")
    return resolved


def build_encoder(settings: KeadSettings, device: str | torch.device | None = None) -> AnomalyEncoder:
    """The encoder named by ``settings.encoder`` on ``device`` (default: ``settings.device``)."""
    builder = ENCODERS.get(settings.encoder)
    if builder is None:
        raise ValueError(f"unknown kead.encoder '{settings.encoder}' (available: {', '.join(sorted(ENCODERS))})")
    return builder(settings, resolve_device(device if device is not None else settings.device))
