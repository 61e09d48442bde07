"""Finetune evaluations: overlap guard, variants with their weights, COCO + ultralytics figures, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_detector_data import make_pipeline_storage, save_fake_backbone_checkpoint

from agssp_pipeline.cli import main
from agssp_pipeline.training.checkpoint import save_checkpoint, state_dict_digest, write_latest_pointer
from agssp_pipeline.training.detector import DETECTOR_KIND, build_detection_model
from agssp_pipeline.training.finetune import (
    DataOverlapError,
    add_deltas,
    check_no_overlap,
    comparison_markdown,
    run_finetune_evaluation,
    worse_than_scratch,
)


def test_overlap_between_pretraining_and_downstream_is_refused(tmp_path):
    config = make_pipeline_storage(tmp_path, shared_ids=3)
    with pytest.raises(DataOverlapError, match=r"'labelled' shares 3 of its 16 images") as error:
        check_no_overlap(config.layout(), ["plant"], ["labelled"])
    assert "aa00000000000000 (also in plant)" in str(error.value)
    with pytest.raises(DataOverlapError):
        run_finetune_evaluation(config)
    clean = make_pipeline_storage(tmp_path / "clean")
    check_no_overlap(clean.layout(), ["plant"], ["labelled"])  # no error


def _fake_detector_checkpoint(config) -> tuple[Path, str]:
    torch.manual_seed(7)
    state = build_detection_model("yolov8n", num_classes=1).state_dict()
    run_dir = Path(config.layout().checkpoints(DETECTOR_KIND, "yolov8n", "run-det"))
    save_checkpoint(str(run_dir), state, {"kind": DETECTOR_KIND, "run_id": "run-det"})
    write_latest_pointer(config.layout(), "yolov8n", "run-det", kind=DETECTOR_KIND)
    return run_dir, state_dict_digest(state)


def test_finetune_evaluation_runs_every_variant_with_its_weights(tmp_path):
    config = make_pipeline_storage(tmp_path)
    backbone_dir = save_fake_backbone_checkpoint(config)
    detector_dir, detector_digest = _fake_detector_checkpoint(config)
    pickled = tmp_path / "user.pt"
    torch.manual_seed(9)
    torch.save({"model": build_detection_model("yolov8n", num_classes=5).half(), "train_args": {}}, pickled)
    assert main(["convert-weights", str(pickled)]) == 0  # the one trusted unpickling, by the user
    user_pt = tmp_path / "user.safetensors"
    config.finetune.extra_weights = {"user_coco": str(user_pt)}
    # the modes with a checkpoint here (domain needs its own backbone run: tests/test_variants.py)
    config.finetune.variants = ["scratch", "imagenet", "agbp", "agssp"]
    [evaluation] = run_finetune_evaluation(config)

    everything = evaluation.table
    # CSPDarknet has no offline ImageNet weights: the imagenet row says so instead of vanishing
    assert everything["variant"].tolist() == ["scratch", "imagenet", "agbp", "agssp", "user_coco"]
    [missing] = everything[everything["status"] == "not applicable"].to_dict("records")
    assert missing["variant"] == "imagenet" and "no ImageNet weights" in missing["note"]
    table = everything[everything["status"] == "ok"]
    assert (table["regime"] == "full").all() and (table["train_images"] == 12).all() and (table["val_images"] == 4).all()
    for column in ("map50_pct", "map50_95_pct", "ultralytics_map50_pct", "ultralytics_map50_95_pct"):
        assert table[column].between(0.0, 100.0).all(), column
    assert (table["map50_pct"] >= table["map50_95_pct"]).all()
    assert table.loc[table.variant == "scratch", "delta_map50_pct"].iloc[0] == 0.0
    assert (table[["epochs", "imgsz", "seed", "batch"]].nunique() == 1).all()  # same recipe for every variant
    assert (table["seed"] == config.finetune.seed).all()
    by_variant = table.set_index("variant")
    assert by_variant.loc["agssp", "initial_digest"] == detector_digest
    assert by_variant.loc["agbp", "tensors_loaded"] > 0 and by_variant.loc["scratch", "tensors_loaded"] == 0
    assert json.loads(by_variant.loc["agbp", "checkpoint_lineage"])["checkpoint"] == backbone_dir
    assert by_variant.loc["agssp", "checkpoint"] == str(detector_dir)
    assert by_variant.loc["user_coco", "checkpoint"] == str(user_pt)
    assert Path(evaluation.table_path).is_file() and Path(evaluation.per_class_path).is_file()
    stored = pd.read_parquet(evaluation.table_path)
    assert len(stored) == 5 and "delta_map50_95_pct" in stored
    summary = pd.read_parquet(evaluation.summary_path)
    assert summary["variant"].tolist() == everything["variant"].tolist()
    agbp = summary.set_index("variant").loc["agbp"]
    assert agbp["map50_pct_vs_scratch_low"] <= agbp["map50_pct_vs_scratch"] <= agbp["map50_pct_vs_scratch_high"]
    assert agbp["map50_pct_vs_scratch"] == pytest.approx(  # the numpy mAP of the interval is COCO's figure
        by_variant.loc["agbp", "map50_pct"] - by_variant.loc["scratch", "map50_pct"], abs=1e-6)
    assert set(evaluation.per_class["class_name"]) == {"dark", "bright"} and len(evaluation.per_class) == 8
    assert (evaluation.per_class["seed"] == config.finetune.seed).all()
    assert Path(config.layout().path("splits", "labelled.parquet")).is_file()
    assert all(Path(p).is_file() for p in table["coco_results"])
    markdown = Path(config.layout().evaluations("finetune", "labelled", ".md")).read_text()
    assert markdown == comparison_markdown(evaluation.summary, everything, config.finetune.bootstrap_replicates) + "\n"
    assert "yolov8n on backbone yolov8n, 1 epochs, image size 64" in markdown and "12 train / 4 val images" in markdown
    assert "| imagenet | 1 | not applicable: backbone 'yolov8n' has no ImageNet weights" in markdown
    assert "| agssp | 4 | AGDP detector (AGBP backbone + pseudo-box pretraining), run run-det |" in markdown
    assert "| scratch | - | random init |" in markdown
    assert markdown.count("\n| ") == 6  # the header and one row per variant


def test_deltas_and_worse_than_scratch_flags():
    table = pd.DataFrame({
        "dataset": ["d"] * 6, "regime": ["full"] * 6, "variant": ["scratch", "agbp", "agssp"] * 2,
        "seed": [0, 0, 0, 1, 1, 1],
        "map50_pct": [50.0, 60, 40, 52, 58, 49], "map50_95_pct": [30.0, 35, 20, 31, 30, 29],
    })
    table = add_deltas(table)  # against scratch of the same seed
    assert table["delta_map50_95_pct"].round(6).tolist() == [0.0, 5.0, -10.0, 0.0, -1.0, -2.0]
    # the check reads intervals: agssp's whole interval is below 0, agbp's straddles 0 (noise, not worse)
    summary = pd.DataFrame({"variant": ["scratch", "agbp", "agssp"], "status": "ok",
                            "map50_pct_vs_scratch_high": [0.0, 4.0, -0.5],
                            "map50_95_pct_vs_scratch_high": [0.0, 1.0, 2.0]})
    assert worse_than_scratch(summary, ("agbp", "agssp"))["variant"].tolist() == ["agssp"]


def test_regimes_and_weight_files(tmp_path):
    from safetensors.torch import save_file

    from agssp_pipeline.training.finetune import VariantContext, _regimes, initial_weights_for

    split = pd.DataFrame({"image_id": list("abcdef"), "split": ["train"] * 4 + ["val"] * 2,
                          "few_shot": [True, False, True, False, False, False]})
    regimes = _regimes(split, 2)
    assert regimes["full"].tolist() == [True] * 4 + [False] * 2
    assert regimes["few2"].tolist() == [True, False, True, False, False, False]
    assert list(_regimes(split, None)) == ["full"]
    weights = {"model.0.conv.weight": torch.ones(16, 3, 3, 3, dtype=torch.float16)}
    save_file(weights, str(tmp_path / "w.safetensors"))
    (tmp_path / "w.onnx").write_bytes(b"x")
    context = VariantContext(extra_weights={"mine": str(tmp_path / "w.safetensors"), "bad": str(tmp_path / "w.onnx")})
    initial = initial_weights_for("mine", context)
    assert initial.state_dict["model.0.conv.weight"].dtype == torch.float32 and initial.name == "mine"
    with pytest.raises(ValueError, match="unsupported weights file"):
        initial_weights_for("bad", context)
    with pytest.raises(ValueError, match="unknown finetune variant 'other'"):
        initial_weights_for("other", context)
    with pytest.raises(FileNotFoundError, match="needs a detector checkpoint"):
        initial_weights_for("agssp", context)


def test_kead_references_from_downstream_are_reported(tmp_path):
    import numpy as np

    from agssp_pipeline.kead.store import MapTable, write_map_table
    from agssp_pipeline.training.finetune import kead_reference_overlap

    layout = make_pipeline_storage(tmp_path).layout()
    ids = np.array(["aa00000000000000", "aa00000000000001"])
    table = MapTable(ids, np.zeros((2, 4, 4), np.float16), np.zeros(2, np.float32), np.zeros(2, np.float32),
                     {"identity": {"encoder": "test"},
                      "references": {"steel": ["bb00000000000001", "bb00000000000002", "aa00000000000002"]}})
    write_map_table(layout.maps_store("plant"), table)
    downstream = {"bb00000000000001", "bb00000000000002", "bb00000000000003"}
    assert kead_reference_overlap(layout, ["plant", "no_maps_source"], downstream) == {"plant": 2}
    assert kead_reference_overlap(layout, ["plant"], {"cc"}) == {}
