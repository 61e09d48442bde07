"""AGDP stage: pseudo boxes + AGBP backbone -> detector checkpoint with lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_checkpoint import moto_endpoint  # noqa: F401  (fixture: the moto server via AWS_* variables)
from test_detector_data import make_pipeline_storage, save_fake_backbone_checkpoint

from agssp_pipeline import artifact_io
from agssp_pipeline.training.checkpoint import (
    backbone_state_for_detector,
    latest_checkpoint_dir,
    load_checkpoint,
)
from agssp_pipeline.training.detector import (
    collect_pretrain_set,
    pretrain_detector,
)
from agssp_pipeline.training.yolo_backbones import detector_backbone_state


def test_pretrain_set_positives_negatives_and_cap(tmp_path):
    config = make_pipeline_storage(tmp_path)
    full = collect_pretrain_set(config.layout(), ["plant"], val_fraction=0.25, seed=0, max_negative_ratio=None)
    assert full.counts()["positives"] == 8 and full.counts()["negatives"] == 4
    assert set(full.images.loc[full.images.negative, "image_id"]).isdisjoint(full.boxes["image_id"])
    assert full.counts()["images_val"] == 3
    capped = collect_pretrain_set(config.layout(), ["plant"], max_negative_ratio=0.25)
    assert capped.counts()["negatives"] == 2 and capped.negatives_dropped == 2
    assert full.tables["plant"]["map_store_version"] == ["v1"] and len(full.tables["plant"]["sha256"]) == 16


def test_pretrain_detector_writes_checkpoint_with_lineage(tmp_path):
    config = make_pipeline_storage(tmp_path)
    backbone_dir = save_fake_backbone_checkpoint(config)
    result = pretrain_detector(config)
    assert Path(result.weights).is_file()
    assert artifact_io.parent(result.run_dir) == config.layout().checkpoints("detector", "yolov8n")
    assert latest_checkpoint_dir(config.layout(), "yolov8n", kind="detector") == result.run_dir
    state, lineage = load_checkpoint(result.run_dir, float32=True)
    assert lineage["backbone"]["checkpoint"] == backbone_dir
    assert lineage["backbone"]["lineage"]["run_id"] == "run-test"
    assert set(lineage["pseudo_boxes"]) == {"plant"} and lineage["pseudo_boxes"]["plant"]["sha256"]
    assert lineage["settings"]["freeze_layers"] == 10
    assert Path(lineage["ultralytics_last_pt"]).is_file()
    assert str(lineage["ultralytics_last_pt"]).startswith(str(result.run_dir))
    assert state["model.22.cv3.0.2.weight"].shape[0] == 1  # single class "defect"
    # frozen backbone: the detector carries the AGBP weights unchanged, but for the input normalisation that
    # AGBP's ImageNet-normalised inputs need folded into layer 0 (ultralytics feeds [0, 1] pixels)
    raw = backbone_state_for_detector(load_checkpoint(backbone_dir)[0])
    backbone = detector_backbone_state(load_checkpoint(backbone_dir)[0], "yolov8n")
    for key, value in backbone.items():
        assert torch.allclose(state[key], value.float(), atol=1e-5), key
    assert not torch.allclose(state["model.0.conv.weight"], raw["model.0.conv.weight"].float(), atol=1e-3)
    assert "folded into model.0" in lineage["backbone"]["lineage"]["input_normalisation"]
    assert json.loads((Path(result.run_dir) / "lineage.json").read_text())["weights_digest"]
    # ultralytics trained in scratch; its run files were published beside the weights, the scratch copy removed
    assert Path(lineage["ultralytics_best_pt"] or lineage["ultralytics_last_pt"]).is_file()
    assert not list((Path(config.layout().root) / "scratch").rglob("*.pt"))


def test_pretrain_detector_needs_pseudo_boxes(tmp_path):
    config = make_pipeline_storage(tmp_path)
    save_fake_backbone_checkpoint(config)
    (Path(config.layout().pseudo_boxes("plant"))).unlink()
    with pytest.raises(FileNotFoundError, match="pseudo boxes of source 'plant' missing"):
        pretrain_detector(config)


@pytest.mark.usefixtures("moto_endpoint")
def test_pretrain_detector_on_object_storage_publishes_every_file_to_the_bucket(tmp_path, moto_s3_server,
                                                                                 monkeypatch):
    """storage_root s3://...: ultralytics trains in a local scratch folder, the checkpoint lands in the bucket."""
    from agssp_pipeline.training import checkpoint as ckpt

    local = make_pipeline_storage(tmp_path / "local")
    root = f"s3://{moto_s3_server.bucket}/agdp"
    artifact_io.upload_tree(local.layout().root, root)  # index + pseudo boxes, as ingestion would have put them
    config = local.model_copy(update={"storage_root": root})
    save_fake_backbone_checkpoint(config)
    monkeypatch.setenv("AGSSP_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.chdir(tmp_path)
    result = pretrain_detector(config)
    assert result.run_dir == ckpt.latest_checkpoint_dir(config.layout(), "yolov8n", kind="detector")
    assert result.run_dir.startswith(f"{root}/checkpoints/detector/yolov8n/")
    state, lineage = load_checkpoint(ckpt.checkpoint_dir(config.layout(), "yolov8n", kind="detector"))
    assert lineage["weights_digest"] == ckpt.state_dict_digest(state) and lineage["status"] == "complete"
    assert artifact_io.is_file(lineage["ultralytics_last_pt"]) and lineage["ultralytics_last_pt"].startswith(root)
    assert ckpt.recorded_inputs(result.run_dir)[0]["uri"] == config.layout().checkpoints("backbone", "yolov8n",
                                                                                           "run-test")
    assert not (tmp_path / "s3:").exists()  # no address lost its scheme


def test_freeze_backbone_auto_freezes_only_an_imagenet_started_backbone():
    from agssp_pipeline.training.detector import detector_train_settings
    from agssp_pipeline.training.settings import DetectorSettings

    def freeze(**fields) -> object:
        return detector_train_settings(DetectorSettings(**fields)).train_args().get("freeze")

    assert freeze() == 10 and freeze(freeze_backbone=False) is None  # the paper's frozen backbone by default
    assert freeze(freeze_backbone="auto") is None  # CSPDarknet: random init (AGBP froze its stem at that init)
    assert freeze(freeze_backbone="auto", backbone="efficientnet_lite0") == [0]  # ImageNet + AGBP: frozen
    with pytest.raises(ValueError):
        DetectorSettings(freeze_backbone="sometimes")
