"""Backbone (AGBP), detector (AGDP) and finetune sections of the pipeline config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class BackboneSettings(BaseModel):
    """AGBP (backbone pretraining) settings; ``None``/``auto`` fields take the backbone family's defaults.

    Family defaults (paper): CNNs SGD lr 0.01 momentum 0.9 cosine, cosine-distance distillation, MoCo v3
    as the self-supervised base; Swin AdamW lr 1e-4, L2-of-normalised-maps distillation, SimMIM.
    """

    model_config = ConfigDict(extra="forbid")

    backbones: list[str] = Field(default_factory=lambda: ["yolov8n"])
    # cls: supervised over pretraining categories; ssl: the family's self-supervised loss (moco/simmim)
    base_loss: Literal["cls", "moco", "simmim", "ssl", "none"] = "cls"
    distill_loss: Literal["default", "l2norm", "cosine"] = "default"
    # auto: the paper's rule (both terms equal on the first step). Measured (benchmarks/agbp_attention_study.py,
    # EfficientNet-Lite0 from ImageNet, 128 px, cls base, 2,843 images, one seed): at CPU budgets auto barely moves
    # the attention (magnetic tile pixel AUROC 0.595 at the start, 0.595 / 0.586 after 150 / 600 steps, the maps
    # themselves 0.678); 10 for 600 steps lifts it above the start on all four labelled sets (0.632). A setting to
    # raise on short runs, read out by the attention probe; the default stays the paper's
    distill_weight: float | Literal["auto"] = "auto"
    distill_stages: list[int] | None = None  # default: last two stages
    freeze_stages: list[int] | None = None  # default: first two stages from ImageNet weights, none from random init
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=2)
    image_size: int = Field(128, ge=32)
    num_workers: int = Field(2, ge=0)
    device: str = "auto"
    optimizer: Literal["auto", "sgd", "adamw"] = "auto"
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    checkpoint_every: int = Field(1, ge=1)
    grad_clip: float | None = 10.0
    max_steps_per_epoch: int | None = Field(None, ge=1)  # smoke runs and benchmarks
    crop_scale_min: float = Field(0.35, gt=0.0, le=1.0)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.0, ge=0.0, le=1.0)
    resume: bool = True  # continue an unfinished run with the same config and data
    log_every_steps: int = Field(10, ge=1)
    seed: int = 0


class DetectorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "yolov8n"
    backbone: str = "yolov8n"
    epochs: int = Field(1, ge=1)
    image_size: int = Field(160, ge=32)
    batch_size: int = Field(16, ge=1)
    # AGDP with the backbone frozen (ultralytics freeze=10), the paper's recipe: true. auto: frozen only when AGBP
    # started from ImageNet weights (backbone_spec(...).imagenet), so a CSPDarknet backbone (random init, only a
    # short AGBP behind it) trains. Measured mixed (variants.py): in-domain GT 8.6 -> 11.1,
    # cross-domain pseudo boxes 8.3 -> 1.6 (-> 7.3 with finetune.agssp_init: backbone)
    freeze_backbone: bool | Literal["auto"] = True
    device: str = "auto"
    seed: int = 0
    workers: int = Field(2, ge=0)
    # share of pseudo-labelled images held out for ultralytics' validation during AGDP pretraining
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    # negatives (images judged normal) kept per positive image; None keeps all
    max_negative_ratio: float | None = Field(1.0, ge=0.0)
    # further ultralytics train arguments (augmentation, lr0, ...), passed unchanged
    train_args: dict[str, Any] = Field(default_factory=dict)


class FinetuneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1)
    image_size: int = Field(160, ge=32)
    batch_size: int = Field(16, ge=1)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # few-shot regimes (the paper's Table 3): N labelled training images, one N or several (nested subsets)
    few_shot_train_images: int | list[int] | None = None
    # epochs of the few-shot runs; None: ``epochs`` (the paper's equal epochs). N images make ceil(N / batch) steps
    # an epoch, so at a small budget equal epochs can leave a few-shot run inside ultralytics' warm-up (100 steps
    # at least): raise it to give every variant enough steps; the table states each regime's epochs
    few_shot_epochs: int | None = Field(None, ge=1)
    extra_weights: dict[str, str] = Field(default_factory=dict)  # variant name -> local weights file
    device: str = "auto"
    seed: int = 0  # the split's seed and the first training seed
    seeds: int = Field(1, ge=1)  # training seeds per variant: seed, seed+1, ... (the benchmark uses 3)
    bootstrap_replicates: int = Field(500, ge=50)  # of the paired 95 % intervals over seeds and val images
    plots: bool = True  # ultralytics' figures per run (about half of a tiny run's time on CPU)
    workers: int = Field(2, ge=0)
    # built-in variants (training/variants.py; extra_weights add theirs): scratch, imagenet (mode 1), domain
    # (mode 2: a backbone run with distill_weight 0, trained by backbone_checkpoint beside AGBP when listed
    # here), agbp (mode 3), agssp (mode 4: the AGDP detector). All four modes of the paper's Table 2 by default.
    variants: list[str] = Field(default_factory=lambda: ["scratch", "imagenet", "domain", "agbp", "agssp"])
    # which layers of the AGDP detector the agssp variant starts from (training/variants.py has the measurements):
    # detector (the paper: backbone, neck and head; class logits re-initialised when the class count differs),
    # backbone_neck (Detect head re-initialised), backbone (layers 0..9 only)
    agssp_init: Literal["detector", "backbone_neck", "backbone"] = "detector"
    # prediction settings for the COCO evaluation (COCO protocol: low confidence, 100 detections per image)
    conf: float = Field(0.001, gt=0.0, lt=1.0)
    iou: float = Field(0.7, gt=0.0, le=1.0)
    max_det: int = Field(100, ge=1)
    coco_backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval"
    # further ultralytics train arguments (augmentation, lr0, ...), the same for every variant
    train_args: dict[str, Any] = Field(default_factory=dict)
