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
    [evaluation] = run_finetune_evaluation(config)

    table = evaluation.table
    assert table["variant"].tolist() == ["scratch", "agbp", "agssp", "user_coco"]
    assert (table["regime"] == "full").all() and (table["train_images"] == 12).all() and (table["val_images"] == 4).all()
    for column in ("map50", "map50_95", "ultralytics_map50", "ultralytics_map50_95"):
        assert table[column].between(0.0, 1.0).all(), column
    assert (table["map50"] >= table["map50_95"]).all()
    assert table.loc[table.variant == "scratch", "delta_map50"].iloc[0] == 0.0
    assert (table[["epochs", "imgsz", "seed", "batch"]].nunique() == 1).all()  # same recipe for every variant
    by_variant = table.set_index("variant")
    assert by_variant.loc["agssp", "initial_digest"] == detector_digest
    assert by_variant.loc["agbp", "tensors_loaded"] > 0 and by_variant.loc["scratch", "tensors_loaded"] == 0
    assert json.loads(by_variant.loc["agbp", "checkpoint_lineage"])["checkpoint"] == backbone_dir
    assert by_variant.loc["agssp", "checkpoint"] == str(detector_dir)
    assert by_variant.loc["user_coco", "checkpoint"] == str(user_pt)
    assert Path(evaluation.table_path).is_file() and Path(evaluation.per_class_path).is_file()
    stored = pd.read_parquet(evaluation.table_path)
    assert len(stored) == 4 and "delta_map50_95" in stored
    assert set(evaluation.per_class["class_name"]) == {"dark", "bright"} and len(evaluation.per_class) == 8
    assert Path(config.layout().path("splits", "labelled.parquet")).is_file()
    assert all(Path(p).is_file() for p in table["coco_results"])
    markdown = comparison_markdown(table)
    assert markdown.count("\n") == 5 and "| labelled | full | agssp |" in markdown


def test_deltas_and_worse_than_scratch_flags():
    table = pd.DataFrame({
        "dataset": ["d"] * 3, "regime": ["full"] * 3, "variant": ["scratch", "agbp", "agssp"],
        "map50": [0.5, 0.6, 0.4], "map50_95": [0.3, 0.35, 0.2],
    })
    table = add_deltas(table)
    assert table["delta_map50_95"].round(6).tolist() == [0.0, 0.05, -0.1]
    assert worse_than_scratch(table)["variant"].tolist() == ["agssp"]


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
