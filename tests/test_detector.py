"""YOLOv8 training wrapper: offline build, weight injection proven at on_train_start, determinism."""

from __future__ import annotations

import socket

import pytest
import torch
from test_detector_data import make_yolo_dataset

from agssp_pipeline.training.detector import (
    BACKBONE_PREFIXES,
    InitialWeights,
    WeightInjectionError,
    YoloTrainSettings,
    build_detection_model,
    inject_weights,
    train_yolo,
)

TINY = YoloTrainSettings(model="yolov8n", epochs=1, image_size=64, batch_size=4, device="cpu", seed=0, workers=0)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_yolo_dataset(tmp_path_factory.mktemp("yolo_tiny"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt (a download of weights, fonts, AMP-check models) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _backbone_checkpoint(seed: int = 123) -> dict[str, torch.Tensor]:
    """A stand-in AGBP checkpoint: backbone keys of another yolov8n, values shifted so they are unmistakable."""
    torch.manual_seed(seed)
    model = build_detection_model("yolov8n", num_classes=80)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(BACKBONE_PREFIXES):
            state[key] = value + 0.25 if value.is_floating_point() else value
    return state


def test_builds_offline_from_packaged_yaml():
    model = build_detection_model("yolov8s", num_classes=3)
    assert model.yaml["nc"] == 3 and model.model[-1].nc == 3
    with pytest.raises(ValueError, match="unknown detector model"):
        build_detection_model("yolov8n.pt", num_classes=1)


def test_injection_reports_and_refuses_incomplete_backbones():
    model = build_detection_model("yolov8n", num_classes=1)
    state = _backbone_checkpoint()
    report = inject_weights(model, InitialWeights("agbp", state, BACKBONE_PREFIXES))
    assert len(report.loaded) == len(state) and not report.shape_mismatch
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    partial = {k: v for k, v in state.items() if not k.startswith("model.9.")}
    with pytest.raises(WeightInjectionError, match="required tensors"):
        inject_weights(build_detection_model("yolov8n", 1), InitialWeights("agbp", partial, BACKBONE_PREFIXES))
    wrong_scale = {k: v for k, v in build_detection_model("yolov8s", 1).state_dict().items()
                   if k.startswith(BACKBONE_PREFIXES)}
    with pytest.raises(WeightInjectionError, match="another model scale"):
        inject_weights(build_detection_model("yolov8n", 1), InitialWeights("s", wrong_scale, BACKBONE_PREFIXES))


def test_training_starts_from_injected_backbone_and_keeps_it_frozen(tiny_data, tmp_path):
    state = _backbone_checkpoint()
    seen: dict[str, bool] = {}

    def at_train_start(trainer):
        live = trainer.model.state_dict()
        seen["equal"] = all(torch.equal(live[k].cpu(), state[k]) for k in state)
        seen["frozen"] = all(not p.requires_grad for k, p in trainer.model.named_parameters()
                             if k.startswith(BACKBONE_PREFIXES))
        seen["head_trainable"] = any(p.requires_grad for k, p in trainer.model.named_parameters()
                                     if k.startswith("model.22."))

    settings = YoloTrainSettings(**{**TINY.__dict__, "freeze_layers": 10})
    result = train_yolo(tiny_data, settings, tmp_path, "agbp", InitialWeights("agbp", state, BACKBONE_PREFIXES),
                        callbacks={"on_train_start": [at_train_start]})
    assert seen == {"equal": True, "frozen": True, "head_trainable": True}
    assert result.injection is not None and len(result.injection.loaded) == len(state)
    for key in state:  # frozen (BN in eval too): the backbone leaves training as it came
        assert torch.allclose(result.final_state_dict[key], state[key].float(), atol=1e-5), key
    assert result.last_pt.is_file() and str(result.run_dir).startswith(str(tmp_path))


def test_same_seed_same_weights_and_metrics(tiny_data, tmp_path):
    """On CPU with deterministic=True and workers=0, ultralytics training reproduces bit for bit."""
    first = train_yolo(tiny_data, TINY, tmp_path, "a")
    second = train_yolo(tiny_data, TINY, tmp_path, "b")
    assert first.ultralytics_metrics == second.ultralytics_metrics
    assert first.final_state_dict.keys() == second.final_state_dict.keys()
    assert all(torch.equal(first.final_state_dict[k], second.final_state_dict[k]) for k in first.final_state_dict)
    other = train_yolo(tiny_data, YoloTrainSettings(**{**TINY.__dict__, "seed": 1}), tmp_path, "c")
    assert any(not torch.equal(first.final_state_dict[k], other.final_state_dict[k])
               for k in first.final_state_dict)


def _random_bn_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics (a fresh model has mean 0 / var 1, which would hide a wrong fold)."""
    generator = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


def test_input_normalisation_is_folded_into_layer_0_exactly():
    """AGBP trained on (x - mean) / std; ultralytics feeds x: the folded backbone computes what AGBP's did."""
    from agssp_pipeline.training.backbones import backbone_spec
    from agssp_pipeline.training.detector import fold_input_normalisation

    spec = backbone_spec("yolov8n")
    agbp = _random_bn_stats(build_detection_model("yolov8n", num_classes=1))
    state = {k: v for k, v in agbp.state_dict().items() if k.startswith(BACKBONE_PREFIXES)}
    folded = fold_input_normalisation(state, spec.input_mean, spec.input_std)
    assert [k for k in state if not torch.equal(state[k], folded[k])] == ["model.0.conv.weight",
                                                                          "model.0.bn.running_mean"]
    detector = _random_bn_stats(build_detection_model("yolov8n", num_classes=1))
    inject_weights(detector, InitialWeights("agbp", folded, BACKBONE_PREFIXES))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(spec.input_mean).view(1, 3, 1, 1), torch.tensor(spec.input_std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected, got = agbp.model[0]((x - mean) / std), detector.model[0](x)
        unfolded = agbp.model[0](x)
    inner = (..., slice(1, -1), slice(1, -1))  # the zero-padded border is the one place the fold cannot match
    assert torch.allclose(got[inner], expected[inner], atol=1e-5)
    assert (unfolded - expected)[inner].abs().mean() > 0.05  # what the detector computed before the fold


def test_backbone_checkpoints_enter_the_detector_folded_and_digested_alike(tmp_path):
    from agssp_pipeline.training.checkpoint import backbone_digest, save_checkpoint
    from agssp_pipeline.training.detector import backbone_initial_weights

    raw = _backbone_checkpoint()
    run_dir = str(tmp_path / "run")
    save_checkpoint(run_dir, raw, {"kind": "backbone", "backbone": "yolov8n", "run_id": "r"})
    initial = backbone_initial_weights(run_dir)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    assert torch.allclose(initial.state_dict["model.0.conv.weight"], raw["model.0.conv.weight"] / std)
    assert torch.equal(initial.state_dict["model.9.cv2.conv.weight"], raw["model.9.cv2.conv.weight"])
    assert "folded into model.0" in initial.lineage["input_normalisation"]
    # lineage compares the backbone's digest now with what detector and finetune recorded: the same tensors
    assert backbone_digest(run_dir) == initial.digest
