"""The whole chain, headless, on a small synthetic corpus: what `make demo` runs, at 1 epoch each."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from agssp_pipeline.cli import main as agssp_main
from agssp_pipeline.config import load_config
from agssp_pipeline.definitions import build_definitions
from agssp_pipeline.demo import generate_demo
from agssp_pipeline.orchestration import materialize_selection, prepare_instance


def test_partial_failure_is_confined_to_its_source(tmp_path, dagster_home, monkeypatch):
    corpus = generate_demo(tmp_path / "demo", seed=1, scale=0.2)
    data = yaml.safe_load(corpus.config_path.read_text())
    data["sources"].append({"name": "gone_line", "kind": "plant", "format": "image_folder",
                            "root": "does/not/exist", "category": "brushed_steel"})
    corpus.config_path.write_text(yaml.safe_dump(data))
    config = load_config(corpus.config_path)
    instance = prepare_instance(config, str(corpus.config_path))
    report = materialize_selection(build_definitions(str(corpus.config_path)), config, instance,
                                   selection="image_index")
    outcome = {s.partition: s for s in report.steps}
    assert set(outcome) == set(config.source_names)
    assert not outcome["gone_line"].success
    assert "gone_line" in outcome["gone_line"].error and "does/not/exist" in outcome["gone_line"].error
    assert all(outcome[name].success for name in corpus.sources)
    assert Path(config.layout().index("demo_rolled_voc")).exists()


def test_cli_rejects_bad_config_with_field_name(tmp_path, capsys):
    bad = tmp_path / "agssp.yaml"
    bad.write_text("sources:\n  - name: x\n    format: nope\n    root: .\n    category: c\n")
    assert agssp_main(["validate", "--config", str(bad)]) == 2
    assert "sources.0.format" in capsys.readouterr().err


@pytest.mark.slow
def test_whole_chain_on_the_demo_corpus(tmp_path, dagster_home):
    corpus = generate_demo(tmp_path / "demo", seed=0, scale=0.5)
    config = load_config(corpus.config_path)
    instance = prepare_instance(config, str(corpus.config_path))
    defs = build_definitions(str(corpus.config_path))
    report = materialize_selection(defs, config, instance)
    assert not report.failed, "\n".join(report.summary_lines())
    ran = {s.asset for s in report.steps}
    assert {"image_index", "anomaly_maps", "category_thresholds", "pseudo_boxes", "backbone_checkpoint",
            "detector_checkpoint", "finetune_evaluation"} <= ran
    layout = config.layout()
    # maps and boxes exist only for pretraining sources; the downstream set is held apart
    assert Path(layout.maps_store("demo_rolled_voc")).exists()
    assert not Path(layout.maps_store("demo_downstream")).exists()
    assert Path(layout.thresholds()).exists()
    boxes = pd.read_parquet(layout.pseudo_boxes("demo_billet_masks"))
    assert len(boxes) > 0
    evaluation = pd.read_parquet(layout.evaluations("finetune", "demo_downstream"))
    assert {"scratch", "agbp", "agssp"} <= set(evaluation["variant"])
    ran_ok = evaluation[evaluation["status"] == "ok"]
    assert {"scratch", "agbp", "agssp"} <= set(ran_ok["variant"])
    assert ran_ok[["map50_pct", "map50_95_pct"]].notna().all().all()
    # every materialisation is recorded in the instance, with lineage metadata on the checkpoints
    record = instance.get_latest_materialization_event(__import__("dagster").AssetKey("detector_checkpoint"))
    assert record is not None
    # the comparison a person reads: the chart file beside the tables, inline in the asset's metadata
    assert Path(layout.evaluations("finetune", "demo_downstream", ".png")).stat().st_size > 1000
    finetune = instance.get_latest_materialization_event(__import__("dagster").AssetKey("finetune_evaluation"))
    metadata = finetune.asset_materialization.metadata
    assert "data:image/png;base64," in metadata["comparison_chart"].value


def test_cli_validate_refuses_misspelt_format_option(tmp_path, capsys):
    cfg = tmp_path / "agssp.yaml"
    cfg.write_text("sources:\n  - name: x\n    format: voc\n    root: .\n    category: c\n"
                   "    options: {anotations: ANNOTATIONS}\n")
    assert agssp_main(["validate", "--config", str(cfg)]) == 2
    assert "anotations" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("sources:\n  - name: x\n    format: voc\n    root: .\n    category: c\n")
    assert agssp_main(["validate", "--config", str(good)]) == 0
