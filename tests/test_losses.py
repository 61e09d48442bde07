"""AGBP losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from agssp_pipeline.training.backbones import build_backbone
from agssp_pipeline.training.losses import (
    MocoV3Objective,
    SimMIMObjective,
    attention_map,
    auto_distill_weight,
    build_objective,
    cosine_distance,
    distillation_loss,
    info_nce,
    normalised_l2_distance,
    resize_map,
)


def test_attention_map_sums_squares_over_channels_in_both_layouts():
    # two channels on a 1x2 grid: position 0 -> (1, 3), position 1 -> (2, -4)
    nchw = torch.tensor([[[[1.0, 2.0]], [[3.0, -4.0]]]])  # (1, 2, 1, 2)
    expected = torch.tensor([[[1 + 9, 4 + 16]]], dtype=torch.float32)
    assert torch.equal(attention_map(nchw), expected)
    nhwc = nchw.permute(0, 2, 3, 1)
    assert torch.equal(attention_map(nhwc, channels_last=True), expected)


def test_attention_map_rejects_non_4d():
    with pytest.raises(ValueError, match="4-D"):
        attention_map(torch.zeros(2, 3, 4))


def test_cosine_distance_hand_cases():
    a = torch.tensor([[[1.0, 0.0]]])
    assert cosine_distance(a, torch.tensor([[[0.0, 1.0]]])).item() == pytest.approx(1.0)
    assert cosine_distance(a, 5 * a).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_distance(torch.tensor([[[1.0, 1.0]]]), a).item() == pytest.approx(1 - 1 / math.sqrt(2))
    # batch mean: (1 + 0) / 2
    batch_a = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    batch_m = torch.tensor([[[0.0, 1.0]], [[2.0, 0.0]]])
    assert cosine_distance(batch_a, batch_m).item() == pytest.approx(0.5)


def test_normalised_l2_distance_hand_cases():
    a = torch.tensor([[[3.0, 0.0]]])
    assert normalised_l2_distance(a, torch.tensor([[[0.0, 7.0]]])).item() == pytest.approx(math.sqrt(2))
    assert normalised_l2_distance(a, torch.tensor([[[0.5, 0.0]]])).item() == pytest.approx(0.0, abs=1e-5)
    # [1,1]/sqrt2 vs [1,0]: sqrt((1/sqrt2 - 1)^2 + 1/2)
    expected = math.sqrt((1 / math.sqrt(2) - 1) ** 2 + 0.5)
    assert normalised_l2_distance(
        torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]])
    ).item() == pytest.approx(expected)


def test_resize_map_is_bilinear_and_keeps_constant_maps():
    constant = torch.full((2, 8, 8), 0.3)
    assert torch.allclose(resize_map(constant, 4, 4), torch.full((2, 4, 4), 0.3))
    ramp = torch.tensor([[[0.0, 1.0]]])  # (1, 1, 2) -> (1, 1, 4): align_corners=False bilinear
    assert torch.allclose(resize_map(ramp, 1, 4), torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]))


def test_distillation_loss_sums_stages_with_map_resized_to_each_stage():
    # stage 0: 2x2 map whose attention is [[1,0],[0,0]]; stage 1: 1x1; anomaly map 4x4 with a hot top-left quadrant
    stage0 = torch.zeros(1, 1, 2, 2)
    stage0[0, 0, 0, 0] = 1.0
    stage1 = torch.ones(1, 3, 1, 1)
    anomaly = torch.zeros(1, 4, 4)
    anomaly[0, :2, :2] = 1.0
    # stage0: resized map is [[1,0],[0,0]] -> cosine distance 0; stage1: 1x1 maps -> both positive -> 0
    assert distillation_loss([stage0, stage1], anomaly, [0, 1], "cosine").item() == pytest.approx(
        0.0, abs=1e-6
    )
    # hot quadrant moved to the bottom right: orthogonal at stage 0 (distance 1), stage 1 still 0
    moved = torch.zeros(1, 4, 4)
    moved[0, 2:, 2:] = 1.0
    assert distillation_loss([stage0, stage1], moved, [0, 1], "cosine").item() == pytest.approx(1.0)
    assert distillation_loss([stage0, stage1], moved, [0], "l2norm").item() == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="unknown distillation"):
        distillation_loss([stage0], moved, [0], "kl")


def test_distillation_gradient_moves_attention_towards_map():
    feature = torch.rand(1, 4, 4, 4, requires_grad=True)
    anomaly = torch.zeros(1, 4, 4)
    anomaly[0, 1, 2] = 1.0
    optimizer = torch.optim.SGD([feature], lr=0.5)
    first = None
    for _ in range(20):
        loss = distillation_loss([feature], anomaly, [0], "cosine")
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_auto_distill_weight_equalises_first_iteration():
    assert auto_distill_weight(2.0, 0.5) == pytest.approx(4.0)
    assert auto_distill_weight(2.0, 0.0) == 1.0
    assert auto_distill_weight(float("nan"), 1.0) == 1.0


def test_info_nce_hand_case():
    temperature = 0.5
    q = torch.eye(2)
    # logits diag 1/T, off-diagonal 0 -> CE = -log(e^2 / (e^2 + 1)); scaled by 2T
    expected = -math.log(math.exp(2) / (math.exp(2) + 1)) * 2 * temperature
    assert info_nce(q, q.clone(), temperature).item() == pytest.approx(expected, rel=1e-5)
    # swapped keys: positives are orthogonal -> CE = -log(1 / (1 + e^2))
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    expected_bad = -math.log(1 / (1 + math.exp(2))) * 2 * temperature
    assert info_nce(q, swapped, temperature).item() == pytest.approx(expected_bad, rel=1e-5)


def test_moco_momentum_update_is_an_ema():
    model = build_backbone("yolov8n", num_classes=0)
    objective = MocoV3Objective(model, dim=8, hidden=16, momentum=0.9)
    online = next(objective.backbone.parameters())
    target = next(objective.momentum_backbone.parameters())
    before = target.detach().clone()
    with torch.no_grad():
        online.add_(1.0)
    objective.after_step(progress=0.0)  # cosine schedule starts at the base momentum
    assert torch.allclose(target, 0.9 * before + 0.1 * online.detach(), atol=1e-6)
    assert not target.requires_grad


def test_moco_objective_two_views_and_loss():
    model = build_backbone("yolov8n", num_classes=0)
    objective = MocoV3Objective(model, dim=8, hidden=16)
    loss, features = objective(torch.randn(2, 2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert len(features) == 2 and len(features[0]) == 5
    with pytest.raises(ValueError, match="2 views"):
        objective(torch.randn(2, 1, 3, 32, 32), torch.zeros(2, dtype=torch.long))


def test_simmim_masks_the_requested_ratio_and_rejects_cnns():
    model = build_backbone("swin_micro", num_classes=0, image_size=64)
    objective = SimMIMObjective(model, mask_ratio=0.5, mask_patch_size=16)
    mask = objective.random_mask(3, 64, 64, torch.device("cpu"))
    assert mask.shape == (3, 4, 4)
    assert mask.sum(dim=(1, 2)).tolist() == [8, 8, 8]
    loss, features = objective(torch.randn(2, 1, 3, 64, 64), torch.zeros(2, dtype=torch.long))
    assert loss.item() > 0 and features[0][-1].shape[1] == model.backbone.out_channels[-1]
    with pytest.raises(ValueError, match="ViT-like"):
        build_objective("simmim", build_backbone("yolov8n", num_classes=0))


def test_classification_objective_needs_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_objective("cls", build_backbone("yolov8n", num_classes=0))
    with pytest.raises(ValueError, match="unknown base loss"):
        build_objective("dino", build_backbone("yolov8n", num_classes=2))
