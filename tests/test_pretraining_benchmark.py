"""benchmarks/pretraining_comparison.py: its config runs every mode, seeds and few-shot regimes on the shared
sets, with the downstream set kept out of pretraining (skipped where ../shared/data is absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("pretraining_comparison",
                                                  REPO / "benchmarks" / "pretraining_comparison.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_config_has_every_mode_and_keeps_downstream_apart(tmp_path):
    from conftest import shared_dataset

    shared = shared_dataset("neu_det").parent
    from agssp_pipeline.config import load_config
    from agssp_pipeline.definitions import build_definitions
    from agssp_pipeline.orchestration import selected_keys

    bench = _benchmark()
    args = bench.parse_args(["--workdir", str(tmp_path / "bench"), "--shared", str(shared), "--demo-scale", "0.2"])
    config = load_config(bench.build_config(args))
    assert config.finetune.variants == ["scratch", "imagenet", "domain", "agbp", "agssp"]
    assert (config.finetune.seeds, config.finetune.few_shot_train_images, config.finetune.few_shot_epochs) == (3, [50], 30)
    # the recipe is the product's unless a flag changes it, and the report says where it differs
    assert config.backbone.distill_weight == "auto" and bench.recipe_differences(config).startswith("recipe: the product")
    assert config.detector.backbone == "efficientnet_lite0" and config.backbone.backbones == ["efficientnet_lite0"]
    assert [s.name for s in config.downstream_sources()] == ["neu_det"]
    pretrain = {s.name for s in config.pretrain_sources()}
    assert {"magnetic_tile", "x_sdd", "casting"} <= pretrain and "neu_det" not in pretrain
    graph = build_definitions(str(tmp_path / "bench" / "agssp.yaml")).resolve_asset_graph()
    first = {k.to_user_string() for k in selected_keys(graph, "*detector_checkpoint")}
    assert {"backbone_checkpoint", "detector_checkpoint"} <= first and "finetune_evaluation" not in first
    other = load_config(bench.build_config(bench.parse_args(
        ["--workdir", str(tmp_path / "mt"), "--shared", str(shared), "--downstream", "magnetic_tile",
         "--demo-scale", "0.2"])))
    assert [s.name for s in other.downstream_sources()] == ["magnetic_tile"]
    weighted = load_config(bench.build_config(bench.parse_args(
        ["--workdir", str(tmp_path / "w"), "--shared", str(shared), "--distill-weight", "10", "--demo-scale", "0.2"])))
    assert weighted.backbone.distill_weight == 10.0
    assert "backbone.distill_weight 10.0 (product default auto)" in bench.recipe_differences(weighted)
    assert "magnetic_tile" not in {s.name for s in other.pretrain_sources()}
    with pytest.raises(SystemExit, match="unknown downstream set 'nope'"):
        bench.build_config(bench.parse_args(["--workdir", str(tmp_path / "x"), "--downstream", "nope"]))
