"""Backbone (AGBP), detector (AGDP) and finetune sections of the pipeline config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class BackboneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbones: list[str] = Field(default_factory=lambda: ["yolov8n"])
    base_loss: Literal["cls", "moco", "simmim", "none"] = "cls"
    distill_loss: Literal["default", "l2norm", "cosine"] = "default"
    distill_weight: float | Literal["auto"] = "auto"
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    image_size: int = Field(128, ge=32)
    num_workers: int = Field(2, ge=0)
    device: str = "auto"
    checkpoint_every: int = Field(1, ge=1)
    grad_clip: float | None = 10.0
    seed: int = 0


class DetectorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "yolov8n"
    backbone: str = "yolov8n"
    epochs: int = Field(1, ge=1)
    image_size: int = Field(160, ge=32)
    batch_size: int = Field(16, ge=1)
    freeze_backbone: bool = True
    device: str = "auto"
    seed: int = 0
    workers: int = Field(2, ge=0)


class FinetuneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1)
    image_size: int = Field(160, ge=32)
    batch_size: int = Field(16, ge=1)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    few_shot_train_images: int | None = None
    extra_weights: dict[str, str] = Field(default_factory=dict)  # variant name -> local weights file
    device: str = "auto"
    seed: int = 0
    workers: int = Field(2, ge=0)
