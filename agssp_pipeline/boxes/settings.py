"""Thresholds and pseudo-box section of the pipeline config (``boxes:`` in agssp.yaml).

Each field says what it controls and why its default is what it is; the README of the boxes stage
(``agssp_pipeline/boxes/__init__.py``) has the measurements behind the image-split default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BoxesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # T_c = mean over the category's images of max(anomaly map) - delta (the paper's adaptive threshold)
    delta: float = 0.1
    # how images are split normal/defective by image score: a name from IMAGE_SPLIT_RULES
    # ("fixed": score > image_score_threshold; "quantile": score > per-category quantile)
    image_split: Literal["fixed", "quantile"] = "quantile"
    image_score_threshold: float = 0.5
    image_score_quantile: float = Field(0.5, ge=0.0, le=1.0)
    # boxes kept per image after NMS, highest score first
    top_k: int = Field(10, ge=1)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    # components smaller than max(min_area_pixels, min_area_fraction * H * W) are dropped: the fraction keeps
    # the rule meaningful across image sizes, the floor removes bilinear-interpolation specks on small images
    min_area_fraction: float = Field(0.0005, ge=0.0, lt=1.0)
    min_area_pixels: int = Field(16, ge=1)
    connectivity: Literal[4, 8] = 8
    # the asset check WARNs when the fraction of images with boxes leaves this band (degenerate maps)
    flagged_fraction_band: tuple[float, float] = (0.02, 0.98)
    # images processed per vectorised chunk (memory ~ chunk * H * W * 8 bytes)
    chunk_size: int = Field(256, ge=1)
    # exports: include images judged normal as negatives (empty label files / COCO images without boxes)
    export_negatives: bool = True
    # quality evaluation: delta sweep and the grid of global fixed thresholds compared with T_c
    quality_deltas: list[float] = Field(default_factory=lambda: [round(0.025 * i, 3) for i in range(13)])
    quality_fixed_grid: int = Field(41, ge=2)

    @model_validator(mode="after")
    def _band_is_ordered(self) -> BoxesSettings:
        low, high = self.flagged_fraction_band
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError("flagged_fraction_band must be (low, high) with 0 <= low <= high <= 1")
        return self
