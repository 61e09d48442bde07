"""Any registered backbone inside ultralytics' YOLOv8 neck/head: shapes, keys, freezing, and that training
really starts from the injected weights (ultralytics rebuilds its model in the trainer, so a weight set
beforehand can be silently lost) for every backbone kind."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_detector_data import make_pipeline_storage, make_yolo_dataset

from agssp_pipeline.training.backbones import build_backbone
from agssp_pipeline.training.checkpoint import (
    InitialWeights,
    backbone_state_for_detector,
    load_checkpoint,
    save_checkpoint,
    write_latest_pointer,
)
from agssp_pipeline.training.detector import (
    YoloTrainSettings,
    backbone_initial_weights,
    detector_initial_weights,
    pretrain_detector,
    train_yolo,
)
from agssp_pipeline.training.finetune import EvalSettings, predict_detections
from agssp_pipeline.training.yolo_backbones import (
    HYBRID_BACKBONE_PREFIX,
    build_hybrid_detector,
    detector_backbone_state,
    required_prefixes,
)

HYBRIDS = ["efficientnet_lite0", "resnet18", "swin_micro"]


def _shifted_native(backbone: str, shift: float = 0.25) -> dict[str, torch.Tensor]:
    """A backbone's native weights, visibly unlike any fresh init (random init + shift)."""
    torch.manual_seed(11)
    native = build_backbone(backbone, image_size=64, pretrained=False).backbone.native_state_dict()
    return {k: (v + shift if v.is_floating_point() else v) for k, v in native.items()}


@pytest.mark.parametrize("backbone", HYBRIDS)
def test_hybrid_detector_feeds_the_neck_strides_8_16_32(backbone):
    model = build_hybrid_detector("yolov8n", backbone, num_classes=3, image_size=64).eval()
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    features = model.model[0](torch.rand(2, 3, 64, 64))
    assert [f.shape[-1] for f in features] == [8, 4, 2]  # strides 8, 16, 32 at 64 px
    projected = [model.model[i](features).shape[1] for i in (4, 6, 9)]
    assert projected == [64, 128, 256]  # what yolov8n's neck was built for
    predictions = model(torch.rand(1, 3, 64, 64))[0]
    assert predictions.shape == (1, 4 + 3, 8 * 8 + 4 * 4 + 2 * 2)
    state = model.state_dict()
    native = build_backbone(backbone, image_size=64, pretrained=False).backbone.native_state_dict()
    assert {HYBRID_BACKBONE_PREFIX + k for k in native} <= set(state)
    # the neck and head keep ultralytics' keys and shapes: an AGDP detector of this scale loads there
    plain = build_hybrid_detector("yolov8n", "resnet18", 3).state_dict() if backbone != "resnet18" else state
    assert all(state[k].shape == plain[k].shape for k in state if k.startswith(("model.22.", "model.12.")))


def test_freezing_the_backbone_of_a_hybrid_freezes_layer_0_only():
    assert YoloTrainSettings(backbone="efficientnet_lite0", freeze_layers=10).train_args()["freeze"] == [0]
    assert YoloTrainSettings(backbone="yolov8n", freeze_layers=10).train_args()["freeze"] == 10
    assert YoloTrainSettings(freeze_layers=10).train_args()["freeze"] == 10
    with pytest.raises(ValueError, match="no offline ImageNet weights"):
        build_backbone("resnet18", pretrained=True)


@pytest.mark.parametrize("backbone", ["yolov8n", *HYBRIDS])
def test_training_starts_from_the_injected_weights(tmp_path, backbone):
    data_yaml = make_yolo_dataset(tmp_path / "data", n_train=6, n_val=2)
    native = _shifted_native(backbone)
    state = backbone_state_for_detector(native) if backbone == "yolov8n" else detector_backbone_state(native, backbone)
    initial = InitialWeights("shifted", state, required_prefixes(backbone))
    at_start: dict[str, torch.Tensor] = {}

    def capture(trainer) -> None:  # the model ultralytics is about to train, after all of its setup
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        at_start.update({k: v.detach().float().cpu().clone() for k, v in model.state_dict().items() if k in state})

    settings = YoloTrainSettings(backbone=backbone, epochs=1, image_size=64, batch_size=3, device="cpu", workers=0,
                                 val=False)
    result = train_yolo(data_yaml, settings, tmp_path / "runs", "t", initial=initial,
                        callbacks={"on_train_start": [capture]})
    assert set(at_start) == set(state) and len(result.injection.loaded) == len(state)
    for key, value in state.items():
        assert torch.equal(at_start[key], value.float()), key
    weights = [k for k in state if k.endswith(".weight") and state[k].ndim == 4]
    assert any(not torch.allclose(result.final_state_dict[k], state[k]) for k in weights)  # and then it trained
    # ultralytics' last.pt (a pickled hybrid model) loads and predicts through the evaluation's own path
    images = pd.DataFrame({"image_id": ["a"], "path": [str(tmp_path / "data" / "images" / "val" / "val000.png")]})
    detections = predict_detections(result.last_pt, images, ["dark", "bright"], 64, "cpu", EvalSettings())
    assert list(detections.columns) == ["image_id", "class_name", "score", "x1", "y1", "x2", "y2"]


def test_agbp_and_agdp_work_for_efficientnet(tmp_path):
    """AGBP checkpoint of EfficientNet-Lite0 -> AGDP (frozen backbone keeps it exactly) -> finetune weights."""
    config = make_pipeline_storage(tmp_path)
    config.detector.backbone = "efficientnet_lite0"
    native = _shifted_native("efficientnet_lite0")
    layout = config.layout()
    run_dir = layout.checkpoints("backbone", "efficientnet_lite0", "run-eff")
    save_checkpoint(run_dir, native, {"kind": "backbone", "backbone": "efficientnet_lite0", "run_id": "run-eff",
                                      "distill_weight": 1.0})
    write_latest_pointer(layout, "efficientnet_lite0", "run-eff")
    initial = backbone_initial_weights(run_dir)
    assert initial.required_prefixes == (HYBRID_BACKBONE_PREFIX,) and len(initial.state_dict) == len(native)
    result = pretrain_detector(config)
    state, lineage = load_checkpoint(result.run_dir, float32=True)
    assert lineage["settings"]["backbone"] == "efficientnet_lite0" and result.injection.loaded
    for key, value in native.items():  # frozen in AGDP (freeze=[0]): the AGBP weights arrive unchanged
        if value.is_floating_point() and "running" not in key:
            assert torch.equal(state[HYBRID_BACKBONE_PREFIX + key], value.float()), key
    assert lineage["injection"]["loaded"] == len(native)  # every backbone tensor, nothing of the new projections
    from agssp_pipeline.training.checkpoint import backbone_digest

    # lineage compares the backbone's digest now with what the detector recorded: the same keying on both sides
    assert backbone_digest(run_dir) == initial.digest == lineage["backbone"]["weights_digest"]
    agssp = detector_initial_weights(result.run_dir)
    assert agssp.required_prefixes == (HYBRID_BACKBONE_PREFIX,)
