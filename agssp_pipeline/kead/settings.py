"""KeAD section of the pipeline config (``kead:`` in agssp.yaml)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class AdaptorTrainingSettings(BaseModel):
    """How ``feature_adaptor`` trains the ADPretrain projector (agssp_pipeline/kead/adaptor.py)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(300, ge=1)
    batch_size: int = Field(512, ge=2)  # residual patches per step, half normal, half abnormal
    lr: float = Field(1e-3, gt=0)
    hidden: int = Field(256, ge=1)
    out_dim: int = Field(128, ge=1)  # ignored with skip (the output keeps the feature's size)
    skip: bool = True  # residual + MLP(residual), starting as the plain score (adaptor.ResidualProjector)
    temperature: float = Field(0.15, gt=0)  # InfoNCE temperature of the angle-oriented loss
    radius: float = Field(1.0, gt=0)  # normal residual norms kept inside it
    margin: float = Field(1.0, ge=0)  # abnormal ones pushed beyond radius + margin
    norm_weight: float = Field(1.0, ge=0)
    max_images_per_category: int = Field(32, ge=1)  # normal images (and as many real-mask images) per category
    synthetic_per_image: int = Field(2, ge=0)  # synthetic anomalous copies of each normal image
    normal_cells_per_image: int = Field(64, ge=1)  # normal patches sampled per image (all abnormal ones kept)
    seed: int = 0


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
    # CNN few-shot encoder (cnn_encoder.py; image_size None = 320 there): timm EfficientNet-Lite0 stages
    # (2 = stride 8, 3 = 16, 4 = 32); None = (2, 3). (2, 3, 4) adds context for large diffuse defects
    # (magnetic tile Uneven) and loses on small ones (NEU-DET, demo): measurements in cnn_encoder.py.
    cnn_layers: list[int] | None = None
    # cnn_fewshot input geometry: "aspect" (default) keeps the aspect ratio (short side image_size, long side
    # rounded to the coarsest stage stride, 16 for (2, 3), and at most max_aspect times the short side), scores
    # on that undistorted grid and averages the map down to the store's square grid; "squash" resizes every
    # image to image_size x image_size (stretches defects of non-square images, 2.4x faster on magnetic tile
    # on CPU: benchmarks/bench_kead.py --cnn). Both enter the map-store version.
    input: Literal["squash", "aspect"] = "aspect"
    max_aspect: float = Field(4.0, ge=1.0)
    # ADPretrain feature adaptor (cnn_fewshot): None = plain features; "latest" = the last feature_adaptor
    # run for this encoder; or a checkpoint path. Its run and digest enter the map-store version.
    adaptor: str | None = None
    adaptor_training: AdaptorTrainingSettings = Field(default_factory=AdaptorTrainingSettings)
