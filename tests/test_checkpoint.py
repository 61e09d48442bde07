"""Backbone checkpoints: safetensors + lineage sidecar, latest pointer, loading into a YOLOv8 detector."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from agssp_pipeline.config import PipelineConfig
from agssp_pipeline.training import checkpoint as ckpt
from agssp_pipeline.training.agbp import train_backbone
from agssp_pipeline.training.backbones import build_backbone
from agssp_pipeline.training.data import make_synthetic_pretrain_table
from agssp_pipeline.training.settings import BackboneSettings


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    table = make_synthetic_pretrain_table(str(root / "images"), images=4, size=64)
    config = PipelineConfig(storage_root=str(root / "storage"))
    (root / "storage").mkdir()
    (root / "storage" / "thresholds.parquet").write_bytes(b"threshold table stand-in")
    settings = BackboneSettings(epochs=1, batch_size=4, image_size=64, num_workers=0, max_steps_per_epoch=1)
    return config, train_backbone(config, "yolov8n", settings=settings, table=table)


def test_checkpoint_files_and_lineage_fields(trained):
    config, result = trained
    run_dir = ckpt.run_dir(config.layout(), "yolov8n", result.run_id)
    assert result.run_dir == run_dir
    state = safetensors.torch.load_file(f"{run_dir}/model.safetensors")  # no pickle involved
    assert "model.0.conv.weight" in state
    lineage = json.loads(open(f"{run_dir}/lineage.json").read())
    for key in (
        "backbone",
        "config",
        "config_hash",
        "data",
        "code",
        "final_losses",
        "epochs",
        "epochs_completed",
        "images_per_s",
        "device",
        "resolved",
        "status",
    ):
        assert key in lineage, key
    assert lineage["status"] == "complete" and lineage["backbone"] == "yolov8n"
    source = lineage["data"]["sources"]["synthetic"]
    assert source["map_store_version"] == "synthetic-0" and source["images_used"] == 4
    assert "index_version" in source and "encoder" in source
    assert lineage["data"]["threshold_table_version"] is not None
    assert lineage["code"]["git_commit"] or lineage["code"]["package_version"]
    assert set(lineage["final_losses"]) == {"base_loss", "distill_loss", "total_loss"}
    assert lineage["images_per_s"] > 0 and lineage["device"].startswith("cpu")


def test_latest_pointer_and_path_forms_resolve_to_the_same_run(trained):
    config, result = trained
    layout = config.layout()
    assert ckpt.read_latest_pointer(layout, "yolov8n")["run_id"] == result.run_id
    assert ckpt.latest_checkpoint_dir(layout, "yolov8n") == result.run_dir
    by_dir, lineage = ckpt.load_backbone_checkpoint(ckpt.backbone_dir(layout, "yolov8n"))
    by_file, _ = ckpt.load_backbone_checkpoint(result.model_path)
    assert lineage["run_id"] == result.run_id
    assert all(torch.equal(by_dir[k], by_file[k]) for k in by_dir)
    with pytest.raises(FileNotFoundError):
        ckpt.load_backbone_checkpoint(ckpt.backbone_dir(layout, "resnet50"))


def test_trained_yolov8n_backbone_loads_unchanged_into_an_ultralytics_detector(trained):
    from ultralytics.nn.tasks import DetectionModel

    _, result = trained
    state, _ = ckpt.load_backbone_checkpoint(result.run_dir)
    weights = ckpt.backbone_state_for_detector(state)
    assert weights.keys() == ckpt.backbone_state_for_detector(result.run_dir).keys()
    detector = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    head_before = {k: v.clone() for k, v in detector.state_dict().items() if int(k.split(".")[1]) >= 10}
    loaded = ckpt.load_backbone_into_detector(detector, weights)
    assert len(loaded) == len(weights) == sum(1 for k in detector.state_dict() if int(k.split(".")[1]) < 10)
    after = detector.state_dict()
    for key, value in weights.items():
        assert torch.equal(after[key], value), key
    assert all(torch.equal(after[k], v) for k, v in head_before.items())  # head untouched
    # the detector still runs with the pretrained backbone
    detector.eval()
    with torch.no_grad():
        detector(torch.zeros(1, 3, 64, 64))


def test_scale_mismatch_and_non_yolo_checkpoints_are_clear_errors(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    small = build_backbone("yolov8s").backbone.native_state_dict()
    with pytest.raises(ValueError, match="do not fit this detector"):
        ckpt.load_backbone_into_detector(DetectionModel("yolov8n.yaml", nc=1, verbose=False), small)
    resnet_dir = str(tmp_path / "resnet18" / "run")
    ckpt.save_backbone_checkpoint(
        resnet_dir, build_backbone("resnet18").backbone.native_state_dict(), {"backbone": "resnet18"}
    )
    with pytest.raises(ValueError, match="not a YOLOv8 backbone"):
        ckpt.backbone_state_for_detector(resnet_dir)
    state, lineage = ckpt.load_backbone_checkpoint(resnet_dir)
    assert lineage == {"backbone": "resnet18"}
    import timm

    timm.create_model("resnet18", pretrained=False, num_classes=0).load_state_dict(state, strict=True)


def test_training_state_loads_with_weights_only(tmp_path):
    state = {
        "epoch": 3,
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]},
    }
    ckpt.save_training_state(str(tmp_path), state)
    loaded = ckpt.load_training_state(str(tmp_path))
    assert loaded["epoch"] == 3 and torch.equal(
        loaded["optimizer"]["state"][0]["momentum_buffer"], torch.ones(2)
    )
    assert ckpt.load_training_state(str(tmp_path / "missing")) is None


@pytest.fixture
def moto_endpoint(moto_s3_server, monkeypatch):
    """The server reached through the standard AWS environment variables (no storage options)."""
    import fsspec

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_s3_server.endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    fsspec.filesystem("s3").clear_instance_cache()
    return moto_s3_server.endpoint


def test_checkpoint_round_trip_on_object_storage(moto_endpoint):
    from agssp_pipeline.storage import StorageLayout

    layout = StorageLayout("s3://agssp/storage")
    state = build_backbone("yolov8n").backbone.native_state_dict()
    run = ckpt.run_dir(layout, "yolov8n", "run1")
    ckpt.save_backbone_checkpoint(run, state, {"backbone": "yolov8n", "run_id": "run1", "created_at": "1"})
    ckpt.save_training_state(run, {"epoch": 1})
    ckpt.write_latest_pointer(layout, "yolov8n", "run1")
    loaded, lineage = ckpt.load_backbone_checkpoint(ckpt.backbone_dir(layout, "yolov8n"))
    assert lineage["run_id"] == "run1" and all(torch.equal(loaded[k], state[k]) for k in state)
    assert ckpt.load_training_state(run)["epoch"] == 1
    assert [run_id for run_id, _ in ckpt.list_runs(layout, "yolov8n")] == ["run1"]
