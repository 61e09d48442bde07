"""Dagster wiring of detector_checkpoint and finetune_evaluation (+ the worse-than-scratch check)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml
from test_detector_data import make_pipeline_storage, save_fake_backbone_checkpoint

from assets import detection
from assets.resources import PipelineConfigResource


def test_assets_materialize_and_publish_lineage_and_comparison(tmp_path):
    config = make_pipeline_storage(tmp_path)
    save_fake_backbone_checkpoint(config)
    config_path = tmp_path / "agssp.yaml"
    data = config.model_dump(mode="json", exclude_none=True)
    data["finetune"]["variants"] = ["scratch", "agssp"]
    config_path.write_text(yaml.safe_dump(data))
    resources = {"pipeline_config": PipelineConfigResource(config_path=str(config_path))}
    with dg.instance_for_test() as instance:
        result = dg.materialize([detection.detector_checkpoint, detection.finetune_evaluation,
                                 detection.agssp_not_worse_than_scratch],
                                instance=instance, resources=resources)
        assert result.success
        [detector_event] = result.asset_materializations_for_node("detector_checkpoint")
        metadata = detector_event.metadata
        assert Path(metadata["checkpoint"].value).is_file()
        assert "plant" in metadata["pseudo_box_tables"].value
        assert metadata["tensors_loaded_from_backbone"].value > 0
        assert metadata["frozen_backbone_layers"].value == 10
        [evaluation_event] = result.asset_materializations_for_node("finetune_evaluation")
        figures = {k: v.value for k, v in evaluation_event.metadata.items() if isinstance(v, dg.FloatMetadataValue)}
        assert {"scratch_map50_pct", "agssp_map50_pct", "agssp_delta_map50_pct_vs_scratch"} <= set(figures), figures
        assert isinstance(evaluation_event.metadata["epochs"], dg.TextMetadataValue)
        comparison = evaluation_event.metadata["comparison"].value
        assert "**labelled**, regime full" in comparison and "| scratch | - |" in comparison
        assert "| agssp | 4 |" in comparison
        assert metadata["run_id"].value in evaluation_event.metadata["checkpoint_lineage"].value
        [check] = result.get_asset_check_evaluations()
        assert check.severity == dg.AssetCheckSeverity.WARN
        assert check.metadata["rows_checked"].value == 1
        assert Path(config.layout().evaluations("finetune", "labelled", ".md")).is_file()


def test_definitions_load_with_detection_assets():
    defs = dg.Definitions(assets=[detection.detector_checkpoint, detection.finetune_evaluation],
                          asset_checks=[detection.agssp_not_worse_than_scratch],
                          resources={"pipeline_config": PipelineConfigResource(config_path="unused.yaml")})
    graph = defs.resolve_asset_graph()
    assert dg.AssetKey("finetune_evaluation") in graph.get_all_asset_keys()
    assert dg.AssetKey("detector_checkpoint") in graph.get(dg.AssetKey("finetune_evaluation")).parent_keys
