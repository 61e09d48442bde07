"""KeAD section of the pipeline config (``kead:`` in agssp.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class KeadSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # encoder: a name from the encoder registry (agssp_pipeline.kead.encoders), e.g. "clip" or "cnn_fewshot"
    encoder: str = "cnn_fewshot"
    # CLIP architecture (open_clip model name) when encoder is clip-based
    clip_model: str = "agssp-tiny-clip"
    # weights: open_clip pretrained tag, a local file, or a local directory; None = random init (tests only)
    weights: str | None = None
    mode: Literal["kead", "winclip", "fewshot"] = "kead"
    k_shot: int = Field(4, ge=0)
    # reference selection: "normal" (rows marked normal), "lowest_zero_shot", or "explicit"
    reference_strategy: Literal["normal", "lowest_zero_shot", "explicit", "auto"] = "auto"
    reference_images: dict[str, list[str]] = Field(default_factory=dict)  # category -> paths or image ids
    vv_start_block: int | None = None
    image_size: int | None = None
    batch_size: int = Field(16, ge=1)
    num_workers: int = Field(2, ge=0)
    device: str = "auto"
    prompts_file: str | None = None
