"""KeAD section of the pipeline config (``kead:`` in agssp.yaml)."""

from __future__ import annotations

from typing import Annotated, Literal

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
    vv_start_block: int | None = None  # 0-based first block with the V-V path; None = encoder preset
    image_size: int | None = None
    batch_size: int = Field(16, ge=1)
    # DataLoader decoding workers; "auto": up to 8 on CUDA (a GPU outruns one decoding core), up to 2 on CPU
    # (the model needs the cores), always leaving one core to the main process
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    device: str = "auto"
    prompts_file: str | None = None
    # CLIP engine (clip_encoder.py / winclip.py)
    allow_random_weights: bool = False  # weights null -> seeded random init; tests, benchmarks, demo only
    tap_layers: list[int] | None = None  # 1-based blocks tapped for patch tokens; None = depth*i/4
    temperature: float = Field(0.07, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    text_cache_dir: str | None = None  # text-embedding cache; None = $AGSSP_CACHE_DIR/kead_text
    fewshot_tokens: Literal["original", "vv"] = "original"  # which tapped tokens the few-shot memory holds
    winclip_windows: list[int] = Field(default_factory=lambda: [2, 3])  # window sides in patches
    # CNN few-shot encoder (cnn_encoder.py): timm EfficientNet-Lite0 stages (2 = stride 8, 3 = 16, 4 = 32);
    # None = (2, 3, 4); (2, 3) favours small defects on low-resolution inputs
    cnn_layers: list[int] | None = None
