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
