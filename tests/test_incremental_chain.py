"""New images in a plant folder: the sensor re-indexes that source, its maps follow the index run
(encoding only the new images); thresholds and boxes follow by automation; nothing else reruns."""

from __future__ import annotations

import cv2
import dagster as dg
import pytest
import yaml

from agssp_pipeline.demo import generate_demo
from agssp_pipeline.kead.store import current_version

PLANT = "demo_plant_line1"
CHEAP = ("image_index", "category_thresholds", "pseudo_boxes")


def _requested(result) -> dict[str, set]:
    out = {}
    for key in (*CHEAP, "anomaly_maps", "backbone_checkpoint", "detector_checkpoint", "finetune_evaluation"):
        partitions = result.get_requested_partitions(dg.AssetKey(key))
        if partitions:
            out[key] = set(partitions)
    return out


def _tick(sensor, instance, resources, cursor):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    result = sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _run(defs, instance, keys, partition):
    assets = list(defs.resolve_asset_graph().assets_defs)
    # assets resolved from the Definitions carry their resources already
    result = dg.materialize([a for a in assets if a.is_executable], instance=instance, partition_key=partition,
                            selection=dg.AssetSelection.assets(*keys))
    assert result.success
    return result


def _follow_automation(defs, instance, selection, cursor, max_ticks: int = 4):
    """Tick the automation policy and run what it requests until it is quiet; returns all requests."""
    followed: dict[str, set] = {}
    for _ in range(max_ticks):
        ticks = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection,
                                                  cursor=cursor)
        cursor, requested = ticks.cursor, _requested(ticks)
        if not requested:
            return cursor, followed
        for key, partitions in requested.items():
            followed.setdefault(key, set()).update(partitions)
            for partition in sorted(partitions, key=str):
                _run(defs, instance, [key], partition)
    raise AssertionError(f"automation still requesting after {max_ticks} ticks: {followed}")


def _index_then_maps(defs, instance, request) -> None:
    """What the daemon does with one request of the ingestion sensor: the index run, then the maps run
    that ``maps_after_ingestion_sensor`` requests on its success (two runs: two partition sets)."""
    from jobs.ingestion import maps_after_ingestion_sensor

    index_run = _run(defs, instance, ["image_index"], request.partition_key)
    run = instance.get_run_by_id(index_run.run_id)
    run = run.with_tags({**run.tags, **request.tags})  # the sensor's tags, as the daemon sets them
    context = dg.build_run_status_sensor_context(
        sensor_name=maps_after_ingestion_sensor.name, dagster_instance=instance, dagster_run=run,
        dagster_event=dg.DagsterEvent("PIPELINE_SUCCESS", job_name=run.job_name))
    follow = maps_after_ingestion_sensor(context)
    assert isinstance(follow, dg.RunRequest) and follow.partition_key == request.partition_key
    _run(defs, instance, ["anomaly_maps"], follow.partition_key)


def _maps_metadata(instance) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey("anomaly_maps"))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


@pytest.mark.slow
def test_one_percent_new_images_cost_about_one_percent_of_the_encoder_work(tmp_path):
    from agssp_pipeline.definitions import build_definitions
    from jobs.ingestion import new_plant_images_sensor

    corpus = generate_demo(tmp_path / "demo", seed=3, scale=2.0)
    config = yaml.safe_load(corpus.config_path.read_text())
    config["sources"] = [s for s in config["sources"] if s["name"] == PLANT]
    config["kead"].update(image_size=128, batch_size=16)
    corpus.config_path.write_text(yaml.safe_dump(config))
    defs = build_definitions(str(corpus.config_path))
    selection = dg.AssetSelection.all()

    with dg.instance_for_test() as instance:
        first = _tick(new_plant_images_sensor, instance, defs.resources, None)
        assert [(r.partition_key, sorted(k.to_user_string() for k in r.asset_selection))
                for r in first.run_requests] == [(PLANT, ["image_index"])]
        ticks = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
        _index_then_maps(defs, instance, first.run_requests[0])
        full = _maps_metadata(instance)
        n_images = full["images_in_store"]
        assert full["images_computed"] == n_images >= 90
        version = current_version(str(corpus.storage_root / "maps.zarr" / PLANT))

        cursor, followed = _follow_automation(defs, instance, selection, ticks.cursor)
        assert followed == {"category_thresholds": {None}, "pseudo_boxes": {PLANT}}

        # one new camera image (1% of the folder): a mirrored copy of an existing one, new bytes
        folder = corpus.source_roots[PLANT]
        existing = sorted(p for p in folder.rglob("*.png") if p.stat().st_size > 1000)[0]
        image = cv2.imread(str(existing), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(existing.parent / "new_shift_0001.png"), cv2.flip(image, 1))

        changed = _tick(new_plant_images_sensor, instance, defs.resources, first.cursor)
        assert [r.partition_key for r in changed.run_requests] == [PLANT]
        _index_then_maps(defs, instance, changed.run_requests[0])
        incremental = _maps_metadata(instance)
        assert incremental["images_in_store"] == n_images + 1
        assert incremental["images_computed"] == 1 and incremental["images_skipped"] == n_images
        assert incremental["forward_passes"] / full["forward_passes"] <= 0.15  # one batch of ~7
        assert current_version(str(corpus.storage_root / "maps.zarr" / PLANT)) == version, "references must not move"

        # the cheap assets follow; GPU assets (checkpoints, evaluations) never start by themselves
        cursor, followed = _follow_automation(defs, instance, selection, cursor)
        assert followed == {"category_thresholds": {None}, "pseudo_boxes": {PLANT}}
        print(f"\nfull: {full['images_computed']} images in {full['forward_passes']} forward passes; "
              f"+1 image: {incremental['images_computed']} image in {incremental['forward_passes']} pass "
              f"({incremental['images_computed'] / full['images_computed']:.1%} of the encoder work)")
