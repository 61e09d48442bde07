"""new_plant_images_sensor and the nightly schedule: partitions registered, runs only for changed folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.utils import make_new_run_id
from sources_fixtures import write_image

from assets.partitions import (
    apply_partition_requests,
    backbone_partitions,
    image_source_partitions,
    pretrain_source_partitions,
)
from assets.resources import PipelineConfigResource
from jobs.ingestion import MAPS_FOLLOW_TAG, ingest_job, new_plant_images_sensor, nightly_ingest_schedule


@pytest.fixture
def plant_config(tmp_path) -> tuple[Path, dict[str, Path]]:
    folders = {name: tmp_path / name for name in ("line_a", "line_b")}
    for number, folder in enumerate(folders.values()):
        write_image(folder / "cam1" / "0001.jpg", seed=number)
    sources = [{"name": name, "kind": "plant", "format": "image_folder", "root": str(folder), "category": "rolled_strip"}
               for name, folder in folders.items()]
    sources.append({"name": "line_offline", "kind": "plant", "format": "image_folder", "root": str(tmp_path / "nas_down"),
                    "category": "rolled_strip"})
    path = tmp_path / "agssp.yaml"
    path.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "store"), "sources": sources}))
    return path, folders


def tick(instance, config_path: Path, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"pipeline_config": PipelineConfigResource(config_path=str(config_path))})
    return new_plant_images_sensor(context)


def test_sensor_registers_partitions_and_runs_only_changed_folders(plant_config):
    config_path, folders = plant_config
    with dg.instance_for_test() as instance:
        first = tick(instance, config_path, None)
        # every configured source becomes a partition, even the one whose folder is missing today; all
        # three are plant (pretraining) sources, so they are pretraining partitions too
        added = {r.partitions_def_name: sorted(r.partition_keys) for r in first.dynamic_partitions_requests}
        assert added == {image_source_partitions.name: ["line_a", "line_b", "line_offline"],
                         pretrain_source_partitions.name: ["line_a", "line_b", "line_offline"],
                         backbone_partitions.name: ["yolov8n"]}
        # index runs only; the maps of these pretraining sources follow each successful run
        assert all(r.asset_selection == [dg.AssetKey("image_index")] for r in first.run_requests)
        assert all(r.tags[MAPS_FOLLOW_TAG] == "true" for r in first.run_requests)
        assert sorted(r.partition_key for r in first.run_requests) == ["line_a", "line_b"]
        assert all(r.run_key == f"{r.partition_key}:{r.tags['agssp/folder_fingerprint']}" for r in first.run_requests)
        (observation,) = first.asset_events  # plant_images: one version over all folders, per-source table
        assert observation.asset_key == dg.AssetKey("plant_images") and "line_b" in observation.metadata["fingerprints"].value
        cursor = json.loads(first.cursor)
        assert set(cursor) == {"line_a", "line_b"}

        apply_partition_requests(instance, first.dynamic_partitions_requests)
        unchanged = tick(instance, config_path, first.cursor)
        assert not unchanged.run_requests and not unchanged.dynamic_partitions_requests and not unchanged.asset_events
        assert unchanged.skip_reason is not None

        write_image(folders["line_b"] / "cam2" / "0002.jpg", seed=7)
        changed = tick(instance, config_path, unchanged.cursor)
        assert [r.partition_key for r in changed.run_requests] == ["line_b"]
        assert changed.asset_events[0].tags["dagster/data_version"] != observation.tags["dagster/data_version"]
        assert json.loads(changed.cursor)["line_a"] == cursor["line_a"]
        assert json.loads(changed.cursor)["line_b"] != cursor["line_b"]

        # the offline share comes back: a run for it alone
        write_image(Path(str(config_path.parent / "nas_down")) / "0001.jpg", seed=9)
        back = tick(instance, config_path, changed.cursor)
        assert [r.partition_key for r in back.run_requests] == ["line_offline"]

        # a new plant folder added to the config: registered as a partition and ingested once
        config = yaml.safe_load(config_path.read_text())
        write_image(config_path.parent / "line_c" / "0001.jpg", seed=11)
        config["sources"].append({"name": "line_c", "kind": "plant", "format": "image_folder",
                                  "root": str(config_path.parent / "line_c"), "category": "rolled_strip"})
        config_path.write_text(yaml.safe_dump(config))
        added = tick(instance, config_path, back.cursor)
        assert [(r.partitions_def_name, list(r.partition_keys)) for r in added.dynamic_partitions_requests] == [
            (image_source_partitions.name, ["line_c"]), (pretrain_source_partitions.name, ["line_c"])]
        assert [r.partition_key for r in added.run_requests] == ["line_c"]
        apply_partition_requests(instance, added.dynamic_partitions_requests)

        # line_b becomes a downstream set: it leaves the pretraining partitions (no stale key lingers)
        config = yaml.safe_load(config_path.read_text())
        config["sources"][1]["role"] = "downstream"
        config_path.write_text(yaml.safe_dump(config))
        demoted = tick(instance, config_path, added.cursor)
        assert [(type(r).__name__, r.partitions_def_name, list(r.partition_keys))
                for r in demoted.dynamic_partitions_requests] == [
            ("DeleteDynamicPartitionsRequest", pretrain_source_partitions.name, ["line_b"])]
        apply_partition_requests(instance, demoted.dynamic_partitions_requests)
        assert instance.get_dynamic_partitions(pretrain_source_partitions.name) == ["line_a", "line_offline",
                                                                                    "line_c"]


def test_maps_follow_only_the_sensors_index_runs_of_pretraining_sources():
    from jobs.ingestion import maps_after_ingestion_sensor, maps_job

    assert maps_job.name == "materialize__anomaly_maps"
    with dg.instance_for_test() as instance:
        def run_with(tags: dict):
            run = dg.DagsterRun(job_name=ingest_job.name, run_id=make_new_run_id(),
                                tags={"dagster/partition": "line_a", **tags})
            context = dg.build_run_status_sensor_context(
                sensor_name=maps_after_ingestion_sensor.name, dagster_instance=instance, dagster_run=run,
                dagster_event=dg.DagsterEvent("PIPELINE_SUCCESS", job_name=ingest_job.name))
            return run, maps_after_ingestion_sensor(context)

        run, request = run_with({MAPS_FOLLOW_TAG: "true", "agssp/folder_fingerprint": "fp1"})
        assert isinstance(request, dg.RunRequest)
        assert (request.partition_key, request.run_key) == ("line_a", f"maps:{run.run_id}")
        assert request.tags["agssp/folder_fingerprint"] == "fp1"
        _, skipped = run_with({})  # the nightly schedule's re-index (or a downstream set's): no maps
        assert isinstance(skipped, dg.SkipReason)


def test_nightly_schedule_compares_with_last_materialization(plant_config):
    config_path, folders = plant_config
    resource = PipelineConfigResource(config_path=str(config_path))
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(instance=instance, resources={"pipeline_config": resource})
        requests = nightly_ingest_schedule(context)
        assert sorted(r.partition_key for r in requests) == ["line_a", "line_b"]
        assert sorted(instance.get_dynamic_partitions(image_source_partitions.name)) == ["line_a", "line_b", "line_offline"]
        assert sorted(instance.get_dynamic_partitions(pretrain_source_partitions.name)) == ["line_a", "line_b",
                                                                                            "line_offline"]

        from assets.ingestion import image_index

        for name in ("line_a", "line_b"):
            assert dg.materialize([image_index], instance=instance, partition_key=name,
                                  resources={"pipeline_config": resource}).success
        context = dg.build_schedule_context(instance=instance, resources={"pipeline_config": resource})
        assert isinstance(nightly_ingest_schedule(context), dg.SkipReason)

        stat = (folders["line_a"] / "cam1" / "0001.jpg").stat()
        os.utime(folders["line_a"] / "cam1" / "0001.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
        context = dg.build_schedule_context(instance=instance, resources={"pipeline_config": resource})
        assert [r.partition_key for r in nightly_ingest_schedule(context)] == ["line_a"]


def test_sensor_waits_until_a_folder_settles(plant_config, monkeypatch):
    config_path, folders = plant_config
    monkeypatch.setenv("AGSSP_INGEST_SETTLE_SECONDS", "3600")  # the default for sources without settle_seconds
    with dg.instance_for_test() as instance:
        busy = tick(instance, config_path, None)
        assert not busy.run_requests and json.loads(busy.cursor) == {}  # files were written seconds ago
        old = 1_600_000_000  # 2020: long settled
        for path in folders["line_a"].rglob("*"):
            os.utime(path, (old, old))
        settled = tick(instance, config_path, busy.cursor)
        assert [r.partition_key for r in settled.run_requests] == ["line_a"]
