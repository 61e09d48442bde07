"""Automation policy (jobs/automation.py) evaluated tick by tick with Dagster's own evaluator.

A stand-in graph with the pipeline's shape (observable plant_images -> image_index -> anomaly_maps ->
category_thresholds -> pseudo_boxes, index over every source, maps and boxes over the pretraining sources)
isolates the policy from the assets' work; a last test checks that the project's real Definitions attach
the policy to exactly the cheap assets.
"""

# no `from __future__ import annotations`: Dagster inspects the context annotation at runtime
import dagster as dg
import pytest
import yaml

from jobs.automation import (
    AUTOMATION_SENSOR_NAME,
    CHEAP_ASSET_AUTOMATION,
    CHEAP_ASSETS,
    EXPENSIVE_ASSETS,
    SENSORS,
)

SOURCES = dg.DynamicPartitionsDefinition(name="image_source")
PRETRAIN = dg.DynamicPartitionsDefinition(name="pretrain_source")
SAME_SOURCE = dg.IdentityPartitionMapping()


def build_graph(index_code_version: str = "1", maps_versions: dict[str, str] | None = None) -> list:
    """Assets shaped like the pipeline; each returns a fixed data version so tests control changes."""
    maps_versions = maps_versions or {}

    # like assets/ingestion.py: one observation (one data version) over all plant folders
    @dg.observable_source_asset(name="plant_images")
    def plant_images():
        raise NotImplementedError("observations are reported by the test")

    @dg.asset(partitions_def=SOURCES, deps=[plant_images], code_version=index_code_version,
              automation_condition=CHEAP_ASSET_AUTOMATION)
    def image_index(context: dg.AssetExecutionContext):
        return dg.MaterializeResult(data_version=dg.DataVersion(f"index-{context.partition_key}"))

    @dg.asset(partitions_def=PRETRAIN, deps=[dg.AssetDep(image_index, partition_mapping=SAME_SOURCE)],
              code_version="1")
    def anomaly_maps(context: dg.AssetExecutionContext):
        version = maps_versions.get(context.partition_key, "m1")
        return dg.MaterializeResult(data_version=dg.DataVersion(version))

    @dg.asset(deps=[anomaly_maps], code_version="1", automation_condition=CHEAP_ASSET_AUTOMATION)
    def category_thresholds():
        return dg.MaterializeResult(data_version=dg.DataVersion("t1"))

    @dg.asset(partitions_def=PRETRAIN, deps=[anomaly_maps, category_thresholds], code_version="1",
              automation_condition=CHEAP_ASSET_AUTOMATION)
    def pseudo_boxes(context: dg.AssetExecutionContext):
        return dg.MaterializeResult(data_version=dg.DataVersion(f"boxes-{context.partition_key}"))

    return [plant_images, image_index, anomaly_maps, category_thresholds, pseudo_boxes]


def observe_plant_folders(instance: dg.DagsterInstance, fingerprint: str) -> None:
    """What the ingestion sensor reports: one data version that changes when any folder changes."""
    instance.report_runless_asset_event(
        dg.AssetObservation(asset_key="plant_images", tags={"dagster/data_version": fingerprint})
    )


def materialize(assets: list, instance: dg.DagsterInstance, names: list[str], partitions: list[str | None]):
    selection = [a for a in assets if a.key.to_user_string() in names]
    for partition in partitions:
        result = dg.materialize(selection, instance=instance, partition_key=partition,
                                selection=dg.AssetSelection.keys(*names))
        assert result.success


def requested(result) -> dict[str, set]:
    out = {}
    for key in ("image_index", "category_thresholds", "pseudo_boxes", "anomaly_maps"):
        partitions = result.get_requested_partitions(dg.AssetKey(key))
        if partitions:
            out[key] = set(partitions)
    return out


@pytest.fixture
def world():
    """Two sources, every asset materialised once, and a first tick that requests nothing."""
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("image_source", ["line1", "line2"])
    instance.add_dynamic_partitions("pretrain_source", ["line1", "line2"])
    assets = build_graph()
    observe_plant_folders(instance, "files-v1")
    materialize(assets, instance, ["image_index"], ["line1", "line2"])
    materialize(assets, instance, ["anomaly_maps"], ["line1", "line2"])
    materialize(assets, instance, ["category_thresholds"], [None])
    materialize(assets, instance, ["pseudo_boxes"], ["line1", "line2"])
    first = dg.evaluate_automation_conditions(defs=assets, instance=instance)
    assert requested(first) == {}
    return instance, assets, first.cursor


def test_folder_observation_is_left_to_the_ingestion_sensor(world):
    """New files change the combined folder version; re-indexing every source would be wrong (the
    ingestion sensor requests exactly the changed ones), so the policy requests nothing."""
    instance, assets, cursor = world
    observe_plant_folders(instance, "files-v2")
    result = dg.evaluate_automation_conditions(defs=assets, instance=instance, cursor=cursor)
    assert requested(result) == {}


def test_code_version_change_requests_every_partition_of_that_asset_only(world):
    instance, _, cursor = world
    changed = build_graph(index_code_version="2")
    result = dg.evaluate_automation_conditions(defs=changed, instance=instance, cursor=cursor)
    assert requested(result) == {"image_index": {"line1", "line2"}}


def test_expensive_assets_are_never_requested_and_new_maps_flow_to_cheap_assets(world):
    instance, assets, cursor = world
    # reindexing changes image_index data? No: same data version; anomaly_maps must stay manual anyway
    materialize(assets, instance, ["image_index"], ["line2"])
    result = dg.evaluate_automation_conditions(defs=assets, instance=instance, cursor=cursor)
    assert "anomaly_maps" not in requested(result)
    # maps rebuilt by hand with identical content: nothing downstream moves
    materialize(assets, instance, ["anomaly_maps"], ["line1"])
    result = dg.evaluate_automation_conditions(defs=assets, instance=instance, cursor=result.cursor)
    assert requested(result) == {}
    # maps of line1 rebuilt with new content: thresholds (all categories) and then boxes follow
    new_maps = build_graph(maps_versions={"line1": "m2"})
    materialize(new_maps, instance, ["anomaly_maps"], ["line1"])
    result = dg.evaluate_automation_conditions(defs=new_maps, instance=instance, cursor=result.cursor)
    got = requested(result)
    assert got["category_thresholds"] == {None}
    assert "line1" in got["pseudo_boxes"]
    assert "anomaly_maps" not in got and "image_index" not in got


def test_a_new_source_is_indexed_and_nothing_else(world):
    instance, assets, cursor = world
    instance.add_dynamic_partitions("image_source", ["line3"])
    instance.add_dynamic_partitions("pretrain_source", ["line3"])
    result = dg.evaluate_automation_conditions(defs=assets, instance=instance, cursor=cursor)
    # its maps are missing, so boxes for line3 wait; thresholds do not move for a missing partition
    assert requested(result) == {"image_index": {"line3"}}
    again = dg.evaluate_automation_conditions(defs=assets, instance=instance, cursor=result.cursor)
    assert requested(again) == {}


def test_a_downstream_source_is_indexed_and_never_waits_for_maps(world):
    """A downstream set is a key of image_source only: indexed, and no pretraining asset is missing it."""
    instance, assets, cursor = world
    instance.add_dynamic_partitions("image_source", ["customer"])
    result = dg.evaluate_automation_conditions(defs=assets, instance=instance, cursor=cursor)
    assert requested(result) == {"image_index": {"customer"}}
    materialize(assets, instance, ["image_index"], ["customer"])
    again = dg.evaluate_automation_conditions(defs=assets, instance=instance, cursor=result.cursor)
    assert requested(again) == {}
    for name in ("anomaly_maps", "pseudo_boxes"):
        assert instance.get_materialized_partitions(dg.AssetKey(name)) == {"line1", "line2"}
    assert PRETRAIN.get_partition_keys(dynamic_partitions_store=instance) == ["line1", "line2"]


def test_sensor_is_exported_and_running_by_default():
    (sensor,) = [s for s in SENSORS if isinstance(s, dg.AutomationConditionSensorDefinition)]
    assert sensor.name == AUTOMATION_SENSOR_NAME
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert not set(CHEAP_ASSETS) & set(EXPENSIVE_ASSETS)


# --------------------------------------------------------------------------------------------------
# The project's own definitions: the policy as attached, together with the ingestion sensor


def _project_defs():
    from agssp_pipeline.definitions import defs

    return defs


@pytest.fixture
def plant_folders(tmp_path):
    from sources_fixtures import write_image

    folders = {name: tmp_path / name for name in ("line1", "line2")}
    for number, folder in enumerate(folders.values()):
        for index in range(2):
            write_image(folder / f"{index:04d}.png", size=(48, 40), seed=10 * number + index)
    sources = [{"name": name, "kind": "plant", "format": "image_folder", "root": str(folder), "category": "strip"}
               for name, folder in folders.items()]
    config_path = tmp_path / "agssp.yaml"
    config_path.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "storage"), "sources": sources}))
    return config_path, folders


def _sensor_tick(instance, resources, cursor):
    """One tick of the ingestion sensor, applied the way the daemon applies it (partitions, events, runs)."""
    from jobs.ingestion import new_plant_images_sensor

    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    result = new_plant_images_sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result


def test_project_policy_with_the_ingestion_sensor_reindexes_exactly_the_changed_source(plant_folders):
    """Real definitions: cheap assets carry the policy, GPU assets none; a new image in one plant folder
    gets one index run for that source (the sensor's) and no automation request on top of it."""
    from sources_fixtures import write_image

    from assets.ingestion import image_index
    from assets.resources import PipelineConfigResource

    defs = _project_defs()
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string(): key for key in graph.get_all_asset_keys()}
    for name in CHEAP_ASSETS:
        assert graph.get(keys[name]).automation_condition == CHEAP_ASSET_AUTOMATION, name
    for name in EXPENSIVE_ASSETS:
        if name in keys and graph.get(keys[name]).is_materializable:
            assert graph.get(keys[name]).automation_condition is None, f"{name} must not start by itself"

    config_path, folders = plant_folders
    resources = {"pipeline_config": PipelineConfigResource(config_path=str(config_path))}
    selection = dg.AssetSelection.assets(*CHEAP_ASSETS)
    instance = dg.DagsterInstance.ephemeral()

    def run_requested(result) -> None:
        for request in result.run_requests:
            assert dg.materialize([image_index], instance=instance, resources=resources,
                                  partition_key=request.partition_key).success

    first = _sensor_tick(instance, resources, None)
    assert sorted(r.partition_key for r in first.run_requests) == ["line1", "line2"]
    run_requested(first)
    ticks = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
    assert requested(ticks) == {}

    write_image(folders["line2"] / "0099.png", size=(48, 40), seed=99)
    changed = _sensor_tick(instance, resources, first.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["line2"]
    ticks = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection,
                                              cursor=ticks.cursor)
    assert requested(ticks) == {}, "the sensor's run covers the change; automation must not add runs"
    run_requested(changed)
    ticks = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection,
                                              cursor=ticks.cursor)
    assert requested(ticks) == {}
