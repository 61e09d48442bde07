"""Thresholds and pseudo-box section of the pipeline config (``boxes:`` in agssp.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class BoxesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delta: float = 0.1
    image_split: Literal["fixed", "quantile"] = "quantile"
    image_score_threshold: float = 0.5
    image_score_quantile: float = Field(0.5, ge=0.0, le=1.0)
    top_k: int = Field(10, ge=1)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    min_area_fraction: float = Field(0.0005, ge=0.0, lt=1.0)
    flagged_fraction_band: tuple[float, float] = (0.02, 0.98)
