"""User weight files are read without full unpickling: a crafted pickle never runs, a pickled model is
refused with the command that converts it, and the converted file loads with the same tensors."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from agssp_pipeline.cli import main
from agssp_pipeline.training.detector import UnsafeWeightsError, build_detection_model, load_weight_file


class _RunsCode:
    """Unpickling this calls os.system: what a malicious .pt would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_in_a_weight_file_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "weights.pt"
    with open(crafted, "wb") as handle:
        pickle.dump({"model": _RunsCode(str(marker))}, handle)
    torch.save({"model": {"w": torch.ones(2)}, "payload": _RunsCode(str(marker))}, tmp_path / "mixed.pt")
    for path in (crafted, tmp_path / "mixed.pt"):
        with pytest.raises(UnsafeWeightsError, match="agssp convert-weights"):
            load_weight_file(path)
    assert not marker.exists()


def test_pickled_model_is_refused_and_the_converted_file_loads_the_same_tensors(tmp_path):
    torch.manual_seed(3)
    model = build_detection_model("yolov8n", num_classes=2)
    pickled = tmp_path / "yolov8n.pt"
    torch.save({"model": model.half(), "train_args": {}}, pickled)
    with pytest.raises(UnsafeWeightsError, match="yolov8n.safetensors"):
        load_weight_file(pickled)
    assert main(["convert-weights", str(pickled)]) == 0
    converted = load_weight_file(tmp_path / "yolov8n.safetensors")
    expected = {k: v.float() for k, v in model.state_dict().items()}
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_plain_state_dict_pt_loads_with_weights_only(tmp_path):
    state = {"model.0.conv.weight": torch.randn(4, 3, 3, 3), "model.0.bn.num_batches_tracked": torch.tensor(5)}
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": state}, tmp_path / "nested.pth")
    for name in ("plain.pt", "nested.pth"):
        loaded = load_weight_file(tmp_path / name)
        assert torch.equal(loaded["model.0.conv.weight"], state["model.0.conv.weight"])
        assert loaded["model.0.bn.num_batches_tracked"].dtype == torch.int64
