"""Any registered backbone inside ultralytics' YOLOv8 neck and head (the paper runs YOLOv8 with CSPDarknet,
ResNet50 and Swin-B; offline, EfficientNet-Lite0 is the one with real ImageNet weights).

ultralytics' ``DetectionModel`` is a flat list of layers; the neck reads the backbone through three saved
outputs: layer 4 (P3, stride 8), layer 6 (P4, stride 16) and layer 9 (P5, stride 32, after SPPF). A hybrid
detector keeps layers 10.. (neck and Detect head, the very modules and state keys of ``yolov8<s>.yaml``) and
replaces layers 0..9:

* layer 0 (:class:`BackboneFeatures`): normalises [0, 1] pixels as the backbone was trained (AGBP feeds ImageNet-
  normalised images), runs the registered :class:`StagedBackbone` and returns its last stage of each stride
  8/16/32; its weights are ``model.0.backbone.native.<native key>`` (:data:`HYBRID_BACKBONE_PREFIX`), so an AGBP
  checkpoint (native keys) loads by adding one prefix;
* layers 4, 6, 9 (:class:`PickFeature` with a 1x1 ``Conv``): project one of those maps to the channels the neck
  of this scale expects; the other layers only pass the list on.

Freezing "the backbone" therefore means layer 0 only (``freeze=[0]``): the projections are new and must train.
A plain ``yolov8*`` backbone needs none of this (its checkpoint keys are already ``model.0..9``).
"""

from __future__ import annotations

import torch
from torch import nn

from agssp_pipeline.training import checkpoint as ckpt
from agssp_pipeline.training.backbones import StagedBackbone, backbone_spec

HYBRID_BACKBONE_PREFIX = "model.0.backbone.native."
NECK_TAPS = (4, 6, 9)  # the layers of yolov8.yaml whose outputs the neck reads (P3, P4, P5)
NECK_STRIDES = (8, 16, 32)
HYBRID_FREEZE = [0]  # ultralytics freeze list of the hybrid's backbone


def is_native(backbone: str | None) -> bool:
    """True for ultralytics' own CSPDarknet (``yolov8*``): no layer swap needed."""
    return backbone is None or backbone_spec(backbone).detector_compatible


def _ultralytics_layer(module: nn.Module, index: int, source: int, kind: str) -> nn.Module:
    """The attributes ultralytics' forward and summaries read on every layer."""
    module.i, module.f, module.type = index, source, kind
    module.np = sum(p.numel() for p in module.parameters())
    return module


class BackboneFeatures(nn.Module):
    """Layer 0 of a hybrid detector: normalise, run the stages, return the stride-8/16/32 maps."""

    def __init__(self, name: str, image_size: int = 224, pretrained: bool = False):
        super().__init__()
        spec = backbone_spec(name)
        self.name = name
        self.backbone: StagedBackbone = spec.builder(image_size, pretrained=pretrained)
        strides = list(spec.stage_strides)
        missing = [s for s in NECK_STRIDES if s not in strides]
        if missing:
            raise ValueError(f"backbone '{name}' has no stage of stride {missing} (stages: {strides}); "
                             "the YOLOv8 neck needs strides 8, 16 and 32")
        # the last stage of each stride: the deepest features at that resolution
        self.taps = [len(strides) - 1 - strides[::-1].index(s) for s in NECK_STRIDES]
        self.register_buffer("mean", torch.tensor(spec.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.input_std).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> list[int]:
        return [self.backbone.out_channels[t] for t in self.taps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        wanted, outputs = set(self.taps), {}
        for index in range(max(self.taps) + 1):
            x = self.backbone.run_stage(index, x)
            if index in wanted:
                outputs[index] = self.backbone.to_nchw(x)
        return [outputs[t] for t in self.taps]


class PickFeature(nn.Module):
    """One map of layer 0's list, projected to the neck's channels (or passed through, ``projection=None``)."""

    def __init__(self, index: int, projection: nn.Module | None = None):
        super().__init__()
        self.index = index
        self.projection = projection

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if self.projection is None:
            return features
        return self.projection(features[self.index])


@torch.no_grad()
def _neck_channels(model: nn.Module) -> list[int]:
    """Channels of layers 4/6/9 of this scale, from a tiny eval-mode forward of the original layers."""
    x, outputs = torch.zeros(1, 3, 64, 64), {}
    layers = model.model
    was_training = layers.training
    layers.eval()
    for index in range(NECK_TAPS[-1] + 1):
        x = layers[index](x)
        outputs[index] = int(x.shape[1])
    layers.train(was_training)
    return [outputs[t] for t in NECK_TAPS]


def swap_backbone(model: nn.Module, backbone: str, image_size: int = 224, pretrained: bool = False) -> nn.Module:
    """Replace layers 0..9 of an ultralytics YOLOv8 ``DetectionModel`` by ``backbone`` (in place; returned).

    Random init unless ``pretrained`` (ImageNet, where the backbone has offline weights); initial weights of a
    checkpoint come in afterwards through ``inject_weights`` like for any detector.
    """
    from ultralytics.nn.modules import Conv

    if is_native(backbone):
        raise ValueError(f"'{backbone}' is ultralytics' own backbone: build the detector from its yaml instead")
    neck = _neck_channels(model)
    features = _ultralytics_layer(BackboneFeatures(backbone, image_size, pretrained), 0, -1,
                                  f"{__name__}.BackboneFeatures")
    for index in range(1, NECK_TAPS[-1] + 1):
        if index in NECK_TAPS:
            tap = NECK_TAPS.index(index)
            layer = PickFeature(tap, Conv(features.channels[tap], neck[tap], 1, 1))
        else:
            layer = PickFeature(0)
        model.model[index] = _ultralytics_layer(layer, index, 0 if index in NECK_TAPS else -1,
                                                f"{__name__}.PickFeature")
    model.model[0] = features
    model.save = sorted(set(model.save) | {0, *NECK_TAPS})
    model.yaml = {**dict(model.yaml), "agssp_backbone": backbone}
    return model


def build_hybrid_detector(model_name: str, backbone: str, num_classes: int, image_size: int = 224,
                          pretrained: bool = False) -> nn.Module:
    """A YOLOv8 ``DetectionModel`` (neck/head of ``model_name``) on a registered backbone, offline."""
    from agssp_pipeline.training.detector import build_detection_model

    return swap_backbone(build_detection_model(model_name, num_classes), backbone, image_size, pretrained)


def detector_backbone_state(state: dict[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """A backbone checkpoint's native state dict keyed for the detector that uses ``backbone``."""
    if is_native(backbone):  # AGBP fed it ImageNet-normalised images, ultralytics feeds [0, 1]: fold that in
        from agssp_pipeline.training.detector import fold_input_normalisation

        spec = backbone_spec(backbone)
        return fold_input_normalisation(ckpt.backbone_state_for_detector(state), spec.input_mean, spec.input_std)
    return {HYBRID_BACKBONE_PREFIX + key: value for key, value in state.items()}


def required_prefixes(backbone: str | None) -> tuple[str, ...]:
    """State keys that must all load for a "pretrained backbone" row to be one."""
    return ckpt.BACKBONE_PREFIXES if is_native(backbone) else (HYBRID_BACKBONE_PREFIX,)


def imagenet_state(backbone: str, image_size: int = 224) -> tuple[dict[str, torch.Tensor], str]:
    """The offline ImageNet weights of ``backbone`` keyed for its detector, and where they came from."""
    spec = backbone_spec(backbone)
    if not spec.imagenet:
        raise ValueError(f"backbone '{backbone}' has no offline ImageNet weights")
    staged = spec.builder(image_size, pretrained=True)
    return detector_backbone_state(staged.native_state_dict(), backbone), staged.init
