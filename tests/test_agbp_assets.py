"""Dagster wiring of AGBP (backbone_checkpoint partitions, pool, deps, lineage metadata, check) and its CLI."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from agssp_pipeline.config import PipelineConfig, SourceConfig, dump_config
from agssp_pipeline.training import checkpoint as ckpt
from agssp_pipeline.training import data as agbp_data
from agssp_pipeline.training.data import InMemoryMaps, make_synthetic_pretrain_table
from assets.partitions import BACKBONE_PARTITION, backbone_partitions
from assets.resources import PipelineConfigResource
from assets.training import backbone_checkpoint, backbone_checkpoint_loads


def test_asset_definition_is_gpu_pooled_partitioned_and_not_eager():
    spec = backbone_checkpoint.specs_by_key[dg.AssetKey("backbone_checkpoint")]
    assert backbone_checkpoint.partitions_def == backbone_partitions  # keys: backbone.backbones of agssp.yaml
    assert backbone_checkpoint.op.pool == "gpu"
    assert spec.automation_condition is None
    assert {dep.asset_key.path[0] for dep in spec.deps} == {"anomaly_maps", "image_index", "category_thresholds"}
    for dep in spec.deps:
        if dep.asset_key.path[0] != "category_thresholds":  # unpartitioned
            assert isinstance(dep.partition_mapping, dg.AllPartitionMapping)
    assert backbone_checkpoint.code_versions_by_key[dg.AssetKey("backbone_checkpoint")]


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    """A config with one pretraining source whose index and maps exist (maps served from memory)."""
    table = make_synthetic_pretrain_table(str(tmp_path / "images"), images=4, size=64)
    source = SourceConfig(
        name="synth", format="image_folder", root=str(tmp_path / "images"), category="steel"
    )
    downstream = SourceConfig(
        name="held_out", format="yolo", root=str(tmp_path), category="steel", role="downstream"
    )
    config = PipelineConfig(storage_root=str(tmp_path / "storage"), sources=[source, downstream])
    layout = config.layout()
    layout.ensure_dir("index")
    index = table.rows.assign(source="synth", duplicate_of=None)[
        ["image_id", "path", "source", "category", "duplicate_of"]
    ]
    index.to_parquet(layout.index("synth"))
    maps = InMemoryMaps(
        {row.image_id: table.maps["synthetic"][row.image_id] for row in table.rows.itertuples()},
        version="store-v7",
        attrs={"version": "store-v7", "encoder": "kead_clip", "model": "ViT-B-16", "mode": "zero+few"},
    )
    opened = []

    def fake_open(uri: str):
        opened.append(uri)
        assert uri == layout.maps_store("synth")
        return maps

    monkeypatch.setattr(agbp_data, "open_lazy_maps", fake_open)
    config_path = tmp_path / "agssp.yaml"
    dump_config(config, config_path)
    return config_path, layout, opened


def test_materialise_records_consumed_partitions_versions_and_curves(pipeline, lineage_writes):
    config_path, layout, opened = pipeline
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(BACKBONE_PARTITION, ["yolov8n"])
    instance.report_runless_asset_event(
        dg.AssetMaterialization("anomaly_maps", partition="synth", tags={"dagster/data_version": "maps-dv-1"})
    )
    result = dg.materialize(
        [backbone_checkpoint, backbone_checkpoint_loads],
        partition_key="yolov8n",
        instance=instance,
        resources={"pipeline_config": PipelineConfigResource(config_path=str(config_path))},
        run_config={
            "ops": {
                "backbone_checkpoint": {
                    "config": {
                        "epochs": 1,
                        "batch_size": 4,
                        "image_size": 64,
                        "device": "cpu",
                        "max_steps_per_epoch": 1,
                    }
                }
            }
        },
    )
    assert result.success
    assert opened  # the map store of the pretraining source was read, the downstream one was not
    materialization = result.asset_materializations_for_node("backbone_checkpoint")[0]
    metadata = materialization.metadata
    table = metadata["consumed_inputs"].value
    assert (
        "| synth | 4 |" in table and "store-v7" in table and "maps-dv-1" in table and "held_out" not in table
    )
    assert metadata["images_per_s"].value > 0 and metadata["device"].value.startswith("cpu")
    assert metadata["loss_curves"].value.startswith("![losses](data:image/png;base64,")
    assert metadata["epochs"].value == "1"  # text: Dagster plots numbers, and epochs is a setting
    checkpoint_path = metadata["checkpoint_path"].value
    state, lineage = ckpt.load_checkpoint(checkpoint_path)
    assert lineage["dagster_upstream_data_versions"]["anomaly_maps"]["synth"] == "maps-dv-1"
    # one writer: the trainer wrote each sidecar once (one epoch), with what the asset added; nobody rewrote it.
    # The default finetune variants hold "domain": the mode 2 baseline run (distill weight 0) is trained too,
    # and latest.json stays on the AGBP run
    domain_dir = metadata["domain_checkpoint_path"].value.rsplit("/", 1)[0]
    assert lineage_writes == [metadata["lineage_path"].value, f"{domain_dir}/{ckpt.LINEAGE_FILE}"]
    _, domain_lineage = ckpt.load_checkpoint(domain_dir)
    assert domain_lineage["distill_weight"] == 0 and lineage["distill_weight"] != 0
    assert domain_lineage["final_losses"]["distill_loss"] is not None  # measured, not optimised
    assert metadata["domain_run_id"].value != metadata["run_id"].value
    from agssp_pipeline.training.variants import latest_backbone_runs

    assert latest_backbone_runs(layout, "yolov8n") == (ckpt.latest_checkpoint_dir(layout, "yolov8n"), domain_dir)
    assert lineage["data"]["sources"]["synth"]["encoder"]["encoder"] == "kead_clip"
    assert (
        json.loads(json.dumps(metadata["consumed_inputs_json"].value))["sources"]["synth"][
            "map_store_version"
        ]
        == "store-v7"
    )
    assert ckpt.latest_checkpoint_dir(layout, "yolov8n") in checkpoint_path
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks)
    assert checks[0].metadata["detector_tensors_loaded"].value == len(state)
    assert np.isfinite(metadata["final_total_loss"].value)
    assert isinstance(pd.read_parquet(layout.index("synth")), pd.DataFrame)


def test_command_line_entry_point_trains_and_prints_the_checkpoint(pipeline, capsys, monkeypatch):
    from agssp_pipeline.training.agbp import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config_path, layout, _ = pipeline
    argv = [
        "--config",
        str(config_path),
        "--backbone",
        "yolov8n",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--image-size",
        "64",
    ]
    assert (
        main(
            [*argv, "--device", "cpu", "--workers", "0", "--max-steps-per-epoch", "1", "--base-loss", "none"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "checkpoint: " in out and "images/s: " in out
    state, lineage = ckpt.load_checkpoint(ckpt.latest_checkpoint_dir(layout, "yolov8n"))
    assert lineage["config"]["base_loss"] == "none" and lineage["config"]["batch_size"] == 2
    assert lineage["config_path"] == str(config_path)


def test_weekly_schedule_requests_configured_backbone_partitions_and_ships_stopped(tmp_path):
    from jobs.training import weekly_backbone_pretraining

    config = PipelineConfig(storage_root=str(tmp_path))
    config.backbone.backbones = ["yolov8n", "resnet50", "vgg16"]  # vgg16 is not a registered backbone
    path = tmp_path / "agssp.yaml"
    dump_config(config, path)
    assert weekly_backbone_pretraining.default_status == dg.DefaultScheduleStatus.STOPPED
    with dg.instance_for_test() as instance:  # the schedule registers the configured backbone partitions
        context = dg.build_schedule_context(
            instance=instance,
            resources={"pipeline_config": PipelineConfigResource(config_path=str(path))},
            scheduled_execution_time=pd.Timestamp("2026-11-28 02:00", tz="UTC").to_pydatetime(),
        )
        requests = weekly_backbone_pretraining(context)
        assert instance.get_dynamic_partitions(BACKBONE_PARTITION) == ["yolov8n", "resnet50"]
    assert [(r.partition_key, r.run_key) for r in requests] == [
        ("yolov8n", "yolov8n:2026-W48"),
        ("resnet50", "resnet50:2026-W48"),
    ]


def test_command_line_lists_the_registry_and_requires_a_backbone(capsys):
    from agssp_pipeline.training.agbp import main

    assert main(["--list-backbones"]) == 0
    listing = capsys.readouterr().out
    assert "yolov8n" in listing and "swin_b" in listing and "l2norm" in listing
    with pytest.raises(SystemExit):
        main(["--config", "agssp.yaml"])
    assert "--backbone is required" in capsys.readouterr().err
