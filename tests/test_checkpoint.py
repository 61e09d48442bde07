"""Checkpoints of every kind: safetensors + lineage sidecar, latest pointer, recorded inputs, weight injection."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from agssp_pipeline import artifact_io
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
    by_dir, lineage = ckpt.load_checkpoint(ckpt.backbone_dir(layout, "yolov8n"))
    by_file, _ = ckpt.load_checkpoint(result.model_path)
    assert lineage["run_id"] == result.run_id
    assert all(torch.equal(by_dir[k], by_file[k]) for k in by_dir)
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(ckpt.backbone_dir(layout, "resnet50"))


def test_trained_yolov8n_backbone_loads_unchanged_into_an_ultralytics_detector(trained):
    from ultralytics.nn.tasks import DetectionModel

    _, result = trained
    state, _ = ckpt.load_checkpoint(result.run_dir)
    weights = ckpt.backbone_state_for_detector(state)
    assert weights.keys() == ckpt.backbone_state_for_detector(result.run_dir).keys()
    detector = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    head_before = {k: v.clone() for k, v in detector.state_dict().items() if int(k.split(".")[1]) >= 10}
    initial = ckpt.InitialWeights("agbp", weights, ckpt.BACKBONE_PREFIXES)
    loaded = ckpt.inject_weights(detector, initial).loaded
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

    small = ckpt.InitialWeights("s", build_backbone("yolov8s").backbone.native_state_dict(), ckpt.BACKBONE_PREFIXES)
    with pytest.raises(ValueError, match="another model scale"):
        ckpt.inject_weights(DetectionModel("yolov8n.yaml", nc=1, verbose=False), small)
    resnet_dir = str(tmp_path / "resnet18" / "run")
    ckpt.save_checkpoint(
        resnet_dir, build_backbone("resnet18").backbone.native_state_dict(), {"backbone": "resnet18"}
    )
    with pytest.raises(ValueError, match="not a YOLOv8 backbone"):
        ckpt.backbone_state_for_detector(resnet_dir)
    state, lineage = ckpt.load_checkpoint(resnet_dir)
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


def _round_trip(layout, kind: str) -> None:
    """Weights, lineage, extra files, resume state, pointer (only once complete) and listing of one kind."""
    if kind == ckpt.BACKBONE:
        state = build_backbone("yolov8n").backbone.native_state_dict()
    else:
        from agssp_pipeline.training.detector import build_detection_model

        state = build_detection_model("yolov8n", num_classes=1).state_dict()
    run = ckpt.run_dir(layout, "yolov8n", "run1", kind=kind)
    assert run == layout.checkpoints(kind, "yolov8n", "run1")
    lineage = {"kind": kind, "name": "yolov8n", "backbone": "yolov8n", "run_id": "run1", "created_at": "1",
               "status": "running"}
    ckpt.save_checkpoint(run, state, lineage, files={"ultralytics/weights/last.pt": b"pt bytes"})
    ckpt.save_training_state(run, {"epoch": 1})
    with pytest.raises(ValueError, match="only a completed run"):
        ckpt.write_latest_pointer(layout, "yolov8n", "run1", kind=kind)
    assert ckpt.read_latest_pointer(layout, "yolov8n", kind=kind) is None
    with pytest.raises(FileNotFoundError, match=f"no completed {kind} checkpoint"):
        ckpt.latest_checkpoint_dir(layout, "yolov8n", kind=kind)
    ckpt.save_checkpoint(run, state, {**lineage, "status": "complete"})
    ckpt.write_latest_pointer(layout, "yolov8n", "run1", kind=kind)
    pointer = ckpt.read_latest_pointer(layout, "yolov8n", kind=kind)
    assert (pointer["kind"], pointer["name"], pointer["run_id"]) == (kind, "yolov8n", "run1")
    assert ckpt.latest_checkpoint_dir(layout, "yolov8n", kind=kind) == run
    for form in (ckpt.checkpoint_dir(layout, "yolov8n", kind=kind), run, f"{run}/{ckpt.MODEL_FILE}"):
        loaded, read_back = ckpt.load_checkpoint(form)
        assert read_back["run_id"] == "run1" and read_back["status"] == "complete"
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert artifact_io.read_bytes(f"{run}/ultralytics/weights/last.pt") == b"pt bytes"
    assert ckpt.load_training_state(run)["epoch"] == 1
    assert [run_id for run_id, _ in ckpt.list_runs(layout, "yolov8n", kind=kind)] == ["run1"]


@pytest.mark.parametrize("kind", [ckpt.BACKBONE, ckpt.DETECTOR])
def test_checkpoint_round_trip_on_a_local_root(tmp_path, kind):
    from agssp_pipeline.storage import StorageLayout

    root = tmp_path / "storage"
    _round_trip(StorageLayout(str(root)), kind)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents]
    assert outside == []  # nothing written outside the storage root
    assert not list(root.rglob(f"*{artifact_io.PARTIAL_MARK}*"))  # every write was atomic and finished


@pytest.mark.parametrize("kind", [ckpt.BACKBONE, ckpt.DETECTOR])
def test_checkpoint_round_trip_on_object_storage(moto_endpoint, moto_s3_server, tmp_path, monkeypatch, kind):
    from agssp_pipeline.storage import StorageLayout

    monkeypatch.chdir(tmp_path)  # a local folder named s3: would appear here if a path lost its scheme
    layout = StorageLayout(f"s3://{moto_s3_server.bucket}/storage-{kind}")
    _round_trip(layout, kind)
    keys = {k.split("/storage-" + kind + "/", 1)[-1] for k in artifact_io.glob(f"{layout.root}/checkpoints/*/*/*")}
    assert keys >= {f"checkpoints/{kind}/yolov8n/latest.json", f"checkpoints/{kind}/yolov8n/run1"}
    assert not list(tmp_path.iterdir())


def test_the_trainer_writes_the_lineage_once_with_what_the_caller_adds(tmp_path, lineage_writes):
    """One writer of lineage.json: extra keys go through train_backbone, nobody rewrites the file afterwards."""
    table = make_synthetic_pretrain_table(str(tmp_path / "images"), images=4, size=64)
    config = PipelineConfig(storage_root=str(tmp_path / "storage"))
    writes = lineage_writes
    settings = BackboneSettings(epochs=1, batch_size=4, image_size=64, num_workers=0, max_steps_per_epoch=1)
    extra = {"dagster_upstream_data_versions": {"anomaly_maps": {"synthetic": "dv-1"}}}
    result = train_backbone(config, "yolov8n", settings=settings, table=table, extra_lineage=extra)
    assert writes == [f"{result.run_dir}/{ckpt.LINEAGE_FILE}"]
    on_disk = ckpt.read_lineage(result.run_dir)
    assert on_disk == json.loads(json.dumps(result.lineage, default=str))
    assert on_disk["dagster_upstream_data_versions"] == extra["dagster_upstream_data_versions"]
    assert on_disk["weights_digest"] == ckpt.state_dict_digest(ckpt.load_checkpoint(result.run_dir)[0])
    with pytest.raises(ValueError, match="would overwrite"):
        train_backbone(config, "yolov8n", settings=settings, table=table, extra_lineage={"run_id": "mine"})


def test_recorded_inputs_of_a_backbone_and_a_detector(trained, tmp_path):
    config, result = trained
    inputs = ckpt.recorded_inputs(result.run_dir)
    by_asset = {(i["asset"], i["partition"]): i for i in inputs}
    lineage = result.lineage["data"]
    assert by_asset[("anomaly_maps", "synthetic")]["version"] == "synthetic-0"
    assert by_asset[("image_index", "synthetic")]["uri"] == config.layout().index("synthetic")
    assert by_asset[("category_thresholds", None)]["version"] == lineage["threshold_table_version"]
    assert by_asset[("category_thresholds", None)]["uri"] == config.layout().thresholds()
    detector_lineage = {
        "kind": ckpt.DETECTOR, "run_id": "d1",
        "backbone": {"checkpoint": result.run_dir, "weights_digest": "abc", "lineage": result.lineage},
        "pseudo_boxes": {"plant": {"path": "/s/pseudo_boxes/plant.parquet", "sha256": "s1", "index_path": "/s/i.parquet",
                                   "index_sha256": "i1", "map_store_version": ["v1"]}},
    }
    detector_inputs = ckpt.recorded_inputs(detector_lineage)
    assert [(i["asset"], i["partition"], i["version"]) for i in detector_inputs] == [
        ("backbone_checkpoint", "yolov8n", "abc"), ("pseudo_boxes", "plant", "s1"), ("image_index", "plant", "i1")]
    assert detector_inputs[0]["uri"] == result.run_dir and detector_inputs[0]["run_id"] == result.run_id
    # a future kind can state its inputs itself
    adaptor = {"kind": "adaptor", "inputs": [{"asset": "backbone_checkpoint", "partition": "yolov8n",
                                              "uri": result.run_dir, "version": "x"}]}
    assert ckpt.recorded_inputs(adaptor) == adaptor["inputs"]
    assert ckpt.recorded_inputs({"kind": "unknown"}) == []
    assert ckpt.recorded_inputs(str(tmp_path / "nothing")) == []


def test_run_ids_sort_by_time_and_differ():
    first, second = ckpt.new_run_id(), ckpt.new_run_id()
    assert first != second and len(first) == len("20260101T000000-abcdef")
    assert first[:15] <= second[:15]


def test_training_on_object_storage_resumes_and_publishes_to_the_bucket(moto_endpoint, moto_s3_server, tmp_path,
                                                                       monkeypatch):
    """AGBP with storage_root s3://...: resume state, weights, lineage and latest.json all live in the bucket."""
    from test_agbp import Recorder

    monkeypatch.chdir(tmp_path)
    table = make_synthetic_pretrain_table(str(tmp_path / "images"), images=4, size=64)
    config = PipelineConfig(storage_root=f"s3://{moto_s3_server.bucket}/agbp")
    settings = BackboneSettings(epochs=2, batch_size=4, image_size=64, num_workers=0, max_steps_per_epoch=1,
                                checkpoint_every=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_backbone(config, "yolov8n", settings=settings, table=table, callbacks=[Recorder(crash_after_epoch=1)])
    ((run_id, lineage),) = ckpt.list_runs(config.layout(), "yolov8n")
    assert lineage["status"] == "running" and ckpt.read_latest_pointer(config.layout(), "yolov8n") is None
    result = train_backbone(config, "yolov8n", settings=settings, table=table)
    assert result.run_id == run_id and result.start_epoch == 2
    assert result.run_dir.startswith(config.storage_root) and artifact_io.is_file(result.model_path)
    state, on_disk = ckpt.load_checkpoint(ckpt.backbone_dir(config.layout(), "yolov8n"))
    assert on_disk["status"] == "complete" and on_disk["run_id"] == run_id
    assert "model.0.conv.weight" in state
    assert [p.name for p in tmp_path.iterdir()] == ["images"]  # nothing landed in a local "s3:" folder


def test_a_mode_2_baseline_run_is_superseded_only_by_a_newer_baseline(tmp_path):
    """latest.json is the AGBP run; the distill_weight 0 baseline beside it is not "older than latest"."""
    layout = PipelineConfig(storage_root=str(tmp_path / "storage")).layout()
    state = {"w": torch.zeros(1)}

    def run(run_id: str, created: str, weight: float) -> None:
        ckpt.save_checkpoint(ckpt.run_dir(layout, "yolov8n", run_id), state,
                             {"kind": ckpt.BACKBONE, "name": "yolov8n", "run_id": run_id, "created_at": created,
                              "status": "complete", "distill_weight": weight})

    run("agbp1", "1", 2.5)
    ckpt.write_latest_pointer(layout, "yolov8n", "agbp1")
    run("domain1", "2", 0.0)
    assert ckpt.later_run(layout, ckpt.BACKBONE, "yolov8n", "domain1", {"distill_weight": 0.0}) is None
    assert ckpt.later_run(layout, ckpt.BACKBONE, "yolov8n", "agbp1", {"distill_weight": 2.5}) is None
    run("domain2", "3", 0.0)
    run("agbp2", "4", 2.5)
    ckpt.write_latest_pointer(layout, "yolov8n", "agbp2")
    assert "domain2" in ckpt.later_run(layout, ckpt.BACKBONE, "yolov8n", "domain1", {"distill_weight": 0.0})
    assert "agbp2" in ckpt.later_run(layout, ckpt.BACKBONE, "yolov8n", "agbp1", {"distill_weight": 2.5})
    flags = ckpt.checkpoint_record(ckpt.run_dir(layout, "yolov8n", "domain1"), ckpt.BACKBONE, layout).flags
    assert [level for level, _ in flags if level == "NEWER"] == ["NEWER"]
