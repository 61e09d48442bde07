"""Dagster wiring of anomaly_maps (+ checks) and kead_evaluation on two tiny sources sharing a category."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest
import yaml

from agssp_pipeline.config import load_config
from agssp_pipeline.kead.store import read_map_table
from tests.test_kead_runner import _write_corpus


@pytest.fixture()
def kead_pipeline(tmp_path):
    """Source 'tiles' (masks, marked normals) and 'plant' (same category, no normals, no masks)."""
    config = {
        "storage_root": str(tmp_path / "storage"),
        "sources": [
            {"name": "tiles", "format": "mask_folder", "root": str(tmp_path / "tiles"), "category": "tile"},
            {"name": "plant", "format": "image_folder", "root": str(tmp_path / "plant"), "category": "tile"},
        ],
        "kead": {"encoder": "cnn_fewshot", "k_shot": 3, "image_size": 64, "batch_size": 4, "num_workers": 0},
    }
    path = tmp_path / "agssp.yaml"
    path.write_text(yaml.safe_dump(config))
    pipeline = load_config(path)
    layout = pipeline.layout()
    layout.ensure_dir("index")
    tiles = _write_corpus(tmp_path / "tiles", n_normal=4, n_defect=4)
    tiles.loc[tiles.index[-1], "duplicate_of"] = tiles["image_id"].iloc[-2]  # a duplicate gets no map
    tiles.to_parquet(layout.index("tiles"))
    plant = _write_corpus(tmp_path / "plant", n_normal=0, n_defect=3)
    plant = plant.assign(image_id=lambda f: "p" + f["image_id"].str[1:], source="plant", mask_path=None,
                         is_normal=None)
    plant.to_parquet(layout.index("plant"))
    return path, pipeline


def test_anomaly_maps_checks_and_evaluation(kead_pipeline):
    from assets.kead import (
        KeadModelResource,
        anomaly_maps,
        anomaly_maps_finite_and_in_range,
        anomaly_maps_one_per_image,
        kead_evaluation,
    )
    from assets.resources import PipelineConfigResource

    config_path, pipeline = kead_pipeline
    layout = pipeline.layout()
    resources = {"pipeline_config": PipelineConfigResource(config_path=str(config_path)),
                 "kead_model": KeadModelResource(device="cpu")}
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("pretrain_source", ["plant", "tiles"])
    assets = [anomaly_maps, anomaly_maps_finite_and_in_range, anomaly_maps_one_per_image]

    # one run over both partitions (single-run backfill): the plant source borrows the tiles' normals
    result = dg.materialize(assets, instance=instance, resources=resources,
                            tags={"dagster/asset_partition_range_start": "plant",
                                  "dagster/asset_partition_range_end": "tiles"})
    assert result.success
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {
        "anomaly_maps_finite_and_in_range": True, "anomaly_maps_one_per_image": True}
    plant_table = read_map_table(layout.maps_store("plant"))
    tiles_table = read_map_table(layout.maps_store("tiles"))
    assert len(plant_table) == 3 and len(tiles_table) == 7  # 8 tiles minus one duplicate
    assert plant_table.attrs["references"] == tiles_table.attrs["references"]
    assert all(i.startswith("free") for i in plant_table.attrs["references"]["tile"])
    observations = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    by_partition = {e.event_specific_data.asset_observation.partition: e.event_specific_data.asset_observation
                    for e in observations}
    assert set(by_partition) == {"plant", "tiles"}
    tiles_meta = by_partition["tiles"].metadata
    assert tiles_meta["images_computed"].value == 7 and tiles_meta["device"].value == "cpu"
    assert "data:image/jpeg;base64" in tiles_meta["top_anomalous"].value
    assert "data:image/png;base64" in tiles_meta["image_score_histogram"].value

    # again: nothing left to compute
    result = dg.materialize(assets, instance=instance, resources=resources, partition_key="tiles")
    assert result.success
    metadata = result.asset_materializations_for_node("anomaly_maps")[0].metadata
    assert metadata["images_computed"].value == 0 and metadata["images_skipped"].value == 7
    assert metadata["store_version"].value == tiles_table.attrs["version"]

    result = dg.materialize([kead_evaluation], instance=instance, resources=resources, partition_key="tiles")
    assert result.success
    evaluation = pd.read_parquet(layout.evaluations("kead", "tiles"))
    assert {"encoder", "n_images", "image_auroc", "pixel_auroc"} <= set(evaluation.columns)
    assert evaluation.loc[evaluation["level"] == "overall", "pixel_auroc"].item() > 0.7
    first_version = evaluation["store_version"].iloc[0]
    assert first_version == tiles_table.attrs["version"] and evaluation["weights"].nunique() == 1

    # another map-store version (other references): its evaluation joins the history, none is written over
    other = {**resources, "kead_model": KeadModelResource(device="cpu", k_shot=2)}
    assert dg.materialize(assets, instance=instance, resources=other, partition_key="tiles").success
    for _ in range(2):  # evaluating the same version twice replaces its rows
        result = dg.materialize([kead_evaluation], instance=instance, resources=other, partition_key="tiles")
    history = pd.read_parquet(layout.evaluations("kead", "tiles"))
    overall = history[history["level"] == "overall"]
    assert len(overall) == 2 and set(overall["store_version"]) == {first_version, read_map_table(
        layout.maps_store("tiles")).attrs["version"]}
    assert len(history) == 2 * len(evaluation)
    metadata = result.asset_materializations_for_node("kead_evaluation")[0].metadata
    assert metadata["versions_evaluated"].value == 2 and first_version in metadata["history"].value
    result = dg.materialize([kead_evaluation], instance=instance, resources=resources, partition_key="plant")
    metadata = result.asset_materializations_for_node("kead_evaluation")[0].metadata
    assert metadata["evaluated"].value is False and "no ground-truth masks" in metadata["reason"].value


def test_definitions_load_with_kead_resource():
    from agssp_pipeline.definitions import build_definitions

    definitions = build_definitions("unused.yaml")
    assert "kead_model" in definitions.resources
    graph = definitions.resolve_asset_graph()
    maps = graph.get(dg.AssetKey("anomaly_maps"))
    assert maps.backfill_policy == dg.BackfillPolicy.single_run()
    from assets.kead import anomaly_maps

    assert anomaly_maps.op.pool == "gpu"
    assert dg.AssetKey("image_index") in maps.parent_keys


def test_encoder_is_built_once_per_run_and_not_kept_in_the_process(kead_pipeline, monkeypatch, tmp_path):
    """A run over several sources (a single-run backfill, or the headless runner's one maps run) loads
    the model once; the encoder lives on the run's resource copy, so the next run builds its own and no
    model outlives its run in the process."""
    from agssp_pipeline.kead import encoders
    from assets import kead as kead_assets
    from assets.kead import KeadModelResource, anomaly_maps
    from assets.resources import PipelineConfigResource

    config_path, pipeline = kead_pipeline
    built = []
    real_build = encoders.build_encoder
    monkeypatch.setattr(encoders, "build_encoder", lambda settings: built.append(settings) or real_build(settings))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("pretrain_source", ["plant", "tiles"])
    resource = KeadModelResource(device="cpu")
    resources = {"pipeline_config": PipelineConfigResource(config_path=str(config_path)), "kead_model": resource}

    both = {"dagster/asset_partition_range_start": "plant", "dagster/asset_partition_range_end": "tiles"}
    assert dg.materialize([anomaly_maps], instance=instance, resources=resources, tags=both).success
    assert len(built) == 1, "one build for both partitions of the run"
    assert not resource._encoders, "the configured resource itself never holds a model"
    assert dg.materialize([anomaly_maps], instance=instance, resources=resources, partition_key="plant").success
    assert len(built) == 2, "a new run builds its own encoder (nothing kept in the process)"

    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"a")
    first = kead_assets._weights_stamp(str(weights))
    weights.write_bytes(b"ab")
    assert first and kead_assets._weights_stamp(str(weights)) != first
    assert kead_assets._weights_stamp("laion400m_e32") == ""
