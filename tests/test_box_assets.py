"""Dagster wiring of category_thresholds, pseudo_boxes (+ checks) and pseudo_box_quality on a tiny storage."""

from __future__ import annotations

import cv2
import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

from agssp_pipeline.config import load_config
from agssp_pipeline.kead.store import MapTable, read_map_table, write_map_table

SIZE, GRID = 64, 8


def _write_source(layout, root, source: str, category: str, n: int, seed: int, with_masks: bool) -> None:
    """Images, index, and a map table whose hot patches sit on the planted defects."""
    rng = np.random.default_rng(seed)
    folder = root / source
    folder.mkdir(parents=True)
    rows, maps = [], np.zeros((n, GRID, GRID), np.float32)
    for i in range(n):
        image = rng.integers(90, 110, (SIZE, SIZE), dtype=np.uint8)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        if i % 2 == 0:
            y, x = rng.integers(4, SIZE - 24, 2)
            mask[y : y + 16, x : x + 16] = 255
            image[mask > 0] = 20
        path = folder / f"{source}_{i}.png"
        cv2.imwrite(str(path), image)
        mask_path = None
        if with_masks:
            mask_path = folder / f"{source}_{i}_mask.png"
            cv2.imwrite(str(mask_path), mask)
        coarse = cv2.resize(mask.astype(np.float32) / 255, (GRID, GRID), interpolation=cv2.INTER_AREA)
        maps[i] = 0.1 + 0.05 * rng.random((GRID, GRID)) + 0.8 * coarse
        rows.append(
            {
                "image_id": f"{source[:4]}{i:012x}", "path": str(path), "source": source, "category": category,
                "width": SIZE, "height": SIZE, "mask_path": str(mask_path) if mask_path else None,
                "duplicate_of": None,
            }
        )
    index = pd.DataFrame(rows)
    (root / "storage" / "index").mkdir(parents=True, exist_ok=True)
    index.to_parquet(layout.index(source))
    ids = index["image_id"].to_numpy()
    write_map_table(
        layout.maps_store(source),
        MapTable(
            image_id=ids,
            maps=maps.astype(np.float16),
            image_score=maps.reshape(n, -1).max(axis=1).astype(np.float32),
            zero_shot_score=np.full(n, np.nan, np.float32),
            attrs={"encoder": "test"},
        ),
    )


@pytest.fixture()
def tiny_pipeline(tmp_path):
    config = {
        "storage_root": str(tmp_path / "storage"),
        "sources": [
            {"name": "line_a", "format": "image_folder", "root": str(tmp_path / "line_a"), "category": "steel"},
            {"name": "masks_b", "format": "mask_folder", "root": str(tmp_path / "masks_b"), "category": "steel"},
            {"name": "held_out", "format": "image_folder", "root": str(tmp_path / "held_out"),
             "category": "steel", "role": "downstream"},
        ],
        "boxes": {"image_split": "quantile", "image_score_quantile": 0.5},
    }
    path = tmp_path / "agssp.yaml"
    path.write_text(yaml.safe_dump(config))
    pipeline = load_config(path)
    layout = pipeline.layout()
    _write_source(layout, tmp_path, "line_a", "steel", 10, 1, with_masks=False)
    _write_source(layout, tmp_path, "masks_b", "steel", 12, 2, with_masks=True)
    _write_source(layout, tmp_path, "held_out", "steel", 6, 3, with_masks=False)
    return path, pipeline


def test_thresholds_boxes_checks_and_quality_materialize(tiny_pipeline):
    from assets.boxes import (
        category_thresholds,
        pseudo_box_quality,
        pseudo_boxes,
        pseudo_boxes_at_most_top_k,
        pseudo_boxes_flagged_fraction,
        pseudo_boxes_inside_images,
        thresholds_well_founded,
    )
    from assets.resources import PipelineConfigResource

    config_path, pipeline = tiny_pipeline
    layout = pipeline.layout()
    resources = {"pipeline_config": PipelineConfigResource(config_path=str(config_path))}
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("image_source", ["line_a", "masks_b", "held_out"])
    instance.add_dynamic_partitions("pretrain_source", ["line_a", "masks_b"])  # held_out is downstream

    result = dg.materialize([category_thresholds, thresholds_well_founded], instance=instance, resources=resources)
    assert result.success
    thresholds = pd.read_parquet(layout.thresholds())
    assert thresholds["category"].tolist() == ["steel"]
    assert thresholds["n_images"].tolist() == [22]  # the downstream source does not shape pseudo labels
    assert thresholds["sources"].tolist() == ["line_a,masks_b"]
    metadata = result.asset_materializations_for_node("category_thresholds")[0].metadata
    assert "data:image/png;base64" in metadata["map_maxima"].value
    assert "| steel |" in metadata["thresholds"].value

    checks = [pseudo_boxes, pseudo_boxes_inside_images, pseudo_boxes_at_most_top_k, pseudo_boxes_flagged_fraction]
    result = dg.materialize(checks, instance=instance, resources=resources, partition_key="masks_b")
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert {e.check_name: e.passed for e in evaluations} == {
        "pseudo_boxes_inside_images": True,
        "pseudo_boxes_at_most_top_k": True,
        "pseudo_boxes_flagged_fraction": True,
    }
    table = pd.read_parquet(layout.pseudo_boxes("masks_b"))
    assert table["image_id"].nunique() == 12
    metadata = result.asset_materializations_for_node("pseudo_boxes")[0].metadata
    assert metadata["n_images"].value == 12 and metadata["n_boxes"].value >= 5
    assert "data:image/jpeg;base64" in metadata["preview"].value

    # per-run override of the boxes settings: delta 0 and one box per image
    override = dg.RunConfig(ops={"pseudo_boxes": {"config": {"delta": 0.0, "top_k": 1}}})
    result = dg.materialize(checks, instance=instance, resources=resources, partition_key="line_a",
                            run_config=override)
    assert result.success
    assert pd.read_parquet(layout.pseudo_boxes("line_a")).groupby("image_id")["box_index"].count().max() <= 1
    top_k_check = [e for e in result.get_asset_check_evaluations() if e.check_name == "pseudo_boxes_at_most_top_k"]
    assert top_k_check[0].metadata["top_k"].value == 1  # the run's override, recorded in the table

    result = dg.materialize([pseudo_box_quality], instance=instance, resources=resources, partition_key="masks_b")
    assert result.success
    quality = pd.read_parquet(layout.evaluations("box_quality", "masks_b"))
    pseudo = quality[(quality["view"] == "boxes") & (quality["method"] == "pseudo")].set_index("iou_threshold")
    assert pseudo.loc[0.3, "recall"] > 0.8
    metadata = result.asset_materializations_for_node("pseudo_box_quality")[0].metadata
    assert metadata["evaluated"].value is True and metadata["mask_iou"].value > 0.3

    result = dg.materialize([pseudo_box_quality], instance=instance, resources=resources, partition_key="line_a")
    assert result.success  # no ground truth: recorded, nothing written
    assert result.asset_materializations_for_node("pseudo_box_quality")[0].metadata["evaluated"].value is False


def test_flagged_fraction_warns_on_degenerate_maps(tiny_pipeline, tmp_path):
    from assets.boxes import category_thresholds, pseudo_boxes, pseudo_boxes_flagged_fraction
    from assets.resources import PipelineConfigResource

    config_path, pipeline = tiny_pipeline
    data = yaml.safe_load(config_path.read_text())
    data["boxes"]["flagged_fraction_band"] = [0.9, 1.0]  # half the images have boxes: outside this band
    config_path.write_text(yaml.safe_dump(data))
    resources = {"pipeline_config": PipelineConfigResource(config_path=str(config_path))}
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("image_source", ["masks_b"])
    instance.add_dynamic_partitions("pretrain_source", ["masks_b"])
    assert dg.materialize([category_thresholds], instance=instance, resources=resources).success
    result = dg.materialize([pseudo_boxes, pseudo_boxes_flagged_fraction], instance=instance, resources=resources,
                            partition_key="masks_b")
    assert result.success  # a WARN check does not fail the run
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.passed is False and evaluation.severity == dg.AssetCheckSeverity.WARN


def test_missing_maps_is_a_clear_error(tmp_path):
    from agssp_pipeline.boxes import stage

    path = tmp_path / "agssp.yaml"
    path.write_text(yaml.safe_dump({
        "storage_root": str(tmp_path / "s"),
        "sources": [{"name": "x", "format": "image_folder", "root": str(tmp_path), "category": "c"}],
    }))
    with pytest.raises(FileNotFoundError, match="materialize anomaly_maps"):
        stage.compute_thresholds(load_config(path))


def test_stale_thresholds_are_refused(tiny_pipeline):
    from agssp_pipeline.boxes import stage

    _, pipeline = tiny_pipeline
    run = stage.compute_thresholds(pipeline)
    stage.write_thresholds(pipeline, run)
    assert len(stage.compute_pseudo_boxes(pipeline, "line_a"))
    assert len(stage.compute_pseudo_boxes(pipeline, "held_out"))  # downstream: uses its category's T_c
    layout = pipeline.layout()
    table = read_map_table(layout.maps_store("line_a"))
    table.attrs = {"encoder": "test", "version": "v-new"}
    write_map_table(layout.maps_store("line_a"), table)
    with pytest.raises(ValueError, match="rematerialize category_thresholds"):
        stage.compute_pseudo_boxes(pipeline, "line_a")
    only_a = stage.compute_thresholds(pipeline, sources=["line_a"])
    with pytest.raises(ValueError, match="without source 'masks_b'"):
        stage.compute_pseudo_boxes(pipeline, "masks_b", thresholds=only_a.table)
