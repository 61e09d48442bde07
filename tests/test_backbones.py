"""Backbone registry: stages, defaults, and key compatibility with ultralytics / timm."""

from __future__ import annotations

import pytest
import torch

from agssp_pipeline.training.backbones import (
    BACKBONES,
    backbone_spec,
    build_backbone,
    freeze_stages,
    stage_state_keys,
)


def test_registry_has_the_paper_backbones_with_defaults():
    for name in ("yolov8n", "yolov8s", "resnet50", "swin_b"):
        assert name in BACKBONES
    yolo, swin = backbone_spec("yolov8n"), backbone_spec("swin_b")
    assert yolo.default_distill_stages() == (3, 4)
    # the first two stages stay frozen only where ImageNet weights start them; random-init layers must train
    assert yolo.default_freeze_stages() == () and backbone_spec("resnet50").default_freeze_stages() == ()
    assert backbone_spec("efficientnet_lite0").default_freeze_stages() == (0, 1)
    assert (yolo.distill_loss, yolo.optimizer, yolo.self_supervised) == ("cosine", "sgd", "moco")
    assert swin.default_distill_stages() == (2, 3)
    assert (swin.distill_loss, swin.optimizer, swin.self_supervised) == ("l2norm", "adamw", "simmim")
    assert yolo.detector_compatible and not backbone_spec("resnet50").detector_compatible
    with pytest.raises(KeyError, match="registered: .*yolov8n"):
        backbone_spec("vgg16")


def test_yolov8n_stages_follow_yolov8_yaml_strides():
    model = build_backbone("yolov8n", num_classes=3)
    features, logits = model(torch.randn(2, 3, 64, 64))
    assert [f.shape[-1] for f in features] == [32, 16, 8, 4, 2]  # P1..P5
    assert [f.shape[1] for f in features] == model.backbone.out_channels == [16, 32, 64, 128, 256]
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("scale", ["n", "s"])
def test_yolov8_backbone_keys_match_an_ultralytics_detector(scale):
    from ultralytics.nn.tasks import DetectionModel

    backbone_state = build_backbone(f"yolov8{scale}").backbone.native_state_dict()
    detector_state = DetectionModel(f"yolov8{scale}.yaml", nc=3, verbose=False).state_dict()
    detector_backbone = {k: v for k, v in detector_state.items() if int(k.split(".")[1]) < 10}
    assert set(backbone_state) == set(detector_backbone)
    assert all(backbone_state[k].shape == detector_backbone[k].shape for k in backbone_state)


def test_swin_features_are_nchw():
    model = build_backbone("swin_micro", num_classes=2, image_size=64)
    features, logits = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    assert model.backbone.out_channels == [32, 64, 128, 256]
    assert logits.shape == (1, 2)


def test_resnet_native_keys_load_into_timm():
    import timm

    state = build_backbone("resnet18").backbone.native_state_dict()
    timm.create_model("resnet18", pretrained=False, num_classes=0).load_state_dict(state, strict=True)


def test_stage_keys_partition_the_native_state_and_freezing_stops_gradients():
    backbone = build_backbone("yolov8n").backbone
    all_keys = [k for i in range(backbone.num_stages) for k in stage_state_keys(backbone, i)]
    assert sorted(all_keys) == sorted(backbone.native_state_dict())
    freeze_stages(backbone, (0, 1))
    assert not any(p.requires_grad for i in (0, 1) for p in backbone.stage_parameters(i))
    assert all(p.requires_grad for p in backbone.stage_parameters(2))
    with pytest.raises(ValueError, match="out of range"):
        freeze_stages(backbone, (7,))
