"""image_index materialised through Dagster on a fixture config: files, metadata, checks, failures."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml
from sources_fixtures import make_voc, write_image

from agssp_pipeline.artifact_io import read_parquet
from assets.ingestion import image_index, image_index_not_empty, image_index_quarantine_rate
from assets.partitions import image_source_partitions
from assets.resources import PipelineConfigResource

ASSETS = [image_index, image_index_not_empty, image_index_quarantine_rate]


@pytest.fixture
def fixture_config(tmp_path) -> Path:
    make_voc(tmp_path / "public_voc")
    line = tmp_path / "plant_line"
    write_image(line / "a.jpg", seed=101)
    write_image(line / "b.jpg", seed=102)
    (line / "copied_from_voc.jpg").write_bytes((tmp_path / "public_voc" / "IMAGES" / "b.jpg").read_bytes())
    (line / "broken.jpg").write_bytes(b"")
    config = {
        "storage_root": "store",
        "sources": [
            {"name": "public_voc", "format": "voc", "root": "public_voc", "category": "rolled_strip", "classes": ["scratch", "pit"]},
            {"name": "plant_line", "kind": "plant", "format": "image_folder", "root": "plant_line", "category": "rolled_strip"},
            {"name": "plant_gone", "kind": "plant", "format": "image_folder", "root": "does/not/exist", "category": "rolled_strip"},
        ],
    }
    path = tmp_path / "agssp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def materialize(instance, config_path: Path, partition: str, **kwargs) -> dg.ExecuteInProcessResult:
    return dg.materialize(ASSETS, instance=instance, partition_key=partition,
                          resources={"pipeline_config": PipelineConfigResource(config_path=str(config_path))}, **kwargs)


def test_image_index_partitions_files_metadata_and_checks(fixture_config):
    store = fixture_config.parent / "store"
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(image_source_partitions.name, ["public_voc", "plant_line", "plant_gone"])
        first = materialize(instance, fixture_config, "public_voc")
        assert first.success
        metadata = first.asset_materializations_for_node("image_index")[0].metadata
        assert metadata["images"].value == 7 and metadata["boxes"].value == 4 and metadata["duplicates"].value == 1
        assert metadata["normal"].value == 1 and metadata["quarantined"].value > 0
        assert "a_copy.jpg" in metadata["preview"].value and "inverted" in metadata["quarantine_examples"].value
        assert metadata["contact_sheet"].value.startswith("![public_voc](data:image/jpeg;base64,")
        assert Path(metadata["index_path"].value) == store / "index" / "public_voc.parquet"
        for suffix in ("parquet", "annotations.parquet", "quarantine.parquet"):
            assert (store / "index" / f"public_voc.{suffix}").is_file()
        checks = {e.check_name: e for e in first.get_asset_check_evaluations()}
        assert checks["image_index_not_empty"].passed and checks["image_index_quarantine_rate"].passed

        # a later source: the copy of a public image is flagged against public_voc; broken file quarantined
        second = materialize(instance, fixture_config, "plant_line")
        assert second.success
        index = read_parquet(str(store / "index" / "plant_line.parquet"))
        copied = index[index.path.str.endswith("copied_from_voc.jpg")].iloc[0]
        assert copied.duplicate_of == copied.image_id and len(index) == 3
        checks = {e.check_name: e for e in second.get_asset_check_evaluations()}
        # 1 of 4 files quarantined = 25% > 5%: a warning, not an error
        rate = checks["image_index_quarantine_rate"]
        assert not rate.passed and rate.severity == dg.AssetCheckSeverity.WARN
        assert checks["image_index_not_empty"].passed

        # data version = content hash of the three files, reproducible from the library
        from agssp_pipeline.config import load_config
        from agssp_pipeline.sources import ingest_source, known_hashes_from

        config = load_config(fixture_config)
        expected = ingest_source(config.source("plant_line"), known_hashes_from(config.layout(), ["public_voc"])).content_hash()
        assert second.asset_materializations_for_node("image_index")[0].tags["dagster/data_version"] == expected

        # run-time override of the quarantine limit
        relaxed = materialize(instance, fixture_config, "plant_line", run_config={
            "ops": {"image_index_image_index_quarantine_rate": {"config": {"max_rate": 0.5}}}})
        assert {e.check_name: e.passed for e in relaxed.get_asset_check_evaluations()}["image_index_quarantine_rate"]
        # the re-run took the three good files' probes from the previous index instead of re-reading them
        reused = lambda result: result.asset_materializations_for_node("image_index")[0].metadata["files_reused_unread"].value  # noqa: E731
        assert reused(second) == 0 and reused(relaxed) == 3
        assert relaxed.asset_materializations_for_node("image_index")[0].tags["dagster/data_version"] == expected


def test_missing_root_fails_only_its_partition(fixture_config):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(image_source_partitions.name, ["plant_gone"])
        failed = materialize(instance, fixture_config, "plant_gone", raise_on_error=False)
        assert not failed.success
        errors = [e.step_failure_data.error for e in failed.all_events if e.is_step_failure]
        message = " ".join(str(err.cause or err) + err.message for err in errors)
        assert "FileNotFoundError" in message and "source 'plant_gone'" in message and "does/not/exist" in message


def test_definitions_load_with_ingestion_wiring(fixture_config):
    from agssp_pipeline.definitions import build_definitions

    defs = build_definitions(str(fixture_config))
    repo = defs.get_repository_def()
    assert repo.has_job("ingest_job")
    assert {s.name for s in repo.sensor_defs} >= {"new_plant_images_sensor"}
    assert {s.name for s in repo.schedule_defs} >= {"nightly_ingest_schedule"}
    graph = defs.resolve_asset_graph()
    assert dg.AssetKey("plant_images") in graph.get(dg.AssetKey("image_index")).parent_keys


def test_plant_images_observation_makes_image_index_stale(fixture_config):
    from dagster._core.definitions.data_version import StaleStatus
    from dagster._core.definitions.observe import observe
    from dagster._utils.test.data_versions import get_stale_status_resolver

    from assets.ingestion import plant_images

    resources = {"pipeline_config": PipelineConfigResource(config_path=str(fixture_config))}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(image_source_partitions.name, ["plant_line"])
        observed = observe([plant_images], instance=instance, resources=resources)
        (observation,) = [e.asset_observation_data.asset_observation for e in observed.all_events
                          if e.event_type_value == "ASSET_OBSERVATION"]
        assert "plant_line" in observation.metadata["fingerprints"].value
        assert dg.materialize([image_index], instance=instance, partition_key="plant_line", resources=resources).success

        def status() -> StaleStatus:
            return get_stale_status_resolver(instance, [plant_images, image_index]).get_status(image_index.key, "plant_line")

        assert status() == StaleStatus.FRESH
        write_image(fixture_config.parent / "plant_line" / "new_frame.jpg", seed=55)
        observe([plant_images], instance=instance, resources=resources)
        assert status() == StaleStatus.STALE
