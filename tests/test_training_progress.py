"""Training stages are never silent: per-epoch lines (epoch/total, losses, mAP where known, ETA) through the
``log`` callable each library entry point takes, and finetune runs keep ultralytics' figures."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_detector_data import make_pipeline_storage

from agssp_pipeline.config import PipelineConfig
from agssp_pipeline.training.agbp import train_backbone
from agssp_pipeline.training.data import make_synthetic_pretrain_table
from agssp_pipeline.training.detector import epoch_progress_callback
from agssp_pipeline.training.settings import BackboneSettings


def _trainer(epoch: int, epochs: int, val: bool, metrics: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        epoch=epoch, epochs=epochs, start_epoch=0, args=SimpleNamespace(val=val), tloss={"box_loss": 1.23456},
        metrics=metrics or {}, train_time_start=time.time() - 10.0 * (epoch + 1),
        label_loss_items=lambda items, prefix="train": {f"{prefix}/{k}": v for k, v in items.items()},
    )


def test_epoch_line_has_progress_losses_map_and_eta():
    lines: list[str] = []
    report = epoch_progress_callback(lines.append, "finetune neu/full/agssp")
    metrics = {"metrics/mAP50(B)": 0.5, "metrics/mAP50-95(B)": 0.25}
    report(_trainer(1, 5, val=True, metrics=metrics))  # second epoch of five, 10 s each
    assert lines[-1].startswith("finetune neu/full/agssp: epoch 2/5 box_loss 1.2346 mAP50 0.500 mAP50-95 0.250")
    assert "10.0 s/epoch" in lines[-1] and lines[-1].endswith("ETA 0:00:30")
    report(_trainer(1, 5, val=False, metrics=metrics))  # not validated this epoch: ultralytics' zeros are no mAP
    assert "mAP" not in lines[-1] and "epoch 2/5" in lines[-1]
    report(_trainer(4, 5, val=False, metrics=metrics))  # the last epoch is always validated
    assert "mAP50 0.500" in lines[-1] and lines[-1].endswith("ETA 0:00:00")
    report(_trainer(5, 5, val=False, metrics=metrics))  # ultralytics' final validation of best.pt
    assert lines[-1] == "finetune neu/full/agssp: final validation of best.pt: mAP50 0.500 mAP50-95 0.250"


def test_agbp_logs_each_epoch_through_the_log_callable(tmp_path):
    table = make_synthetic_pretrain_table(str(tmp_path / "images"), images=4, size=64)
    settings = BackboneSettings(base_loss="none", epochs=2, batch_size=4, image_size=64, num_workers=0,
                                crop_scale_min=1.0, hflip=0.0, log_every_steps=100)
    lines: list[str] = []
    train_backbone(PipelineConfig(storage_root=str(tmp_path / "storage")), "yolov8n", settings=settings,
                   table=table, log=lines.append)
    epochs = [line for line in lines if " done in " in line]
    assert [line.split(" done")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("distill " in line and "total " in line and "ETA " in line for line in epochs)
    assert lines[0].startswith("AGBP yolov8n run ")


@pytest.mark.slow
def test_tiny_finetune_logs_epochs_and_publishes_ultralytics_figures(tmp_path):
    from agssp_pipeline.training.finetune import run_finetune_evaluation

    config = make_pipeline_storage(tmp_path)
    config.finetune.variants = ["scratch"]
    config.finetune.epochs = 2
    lines: list[str] = []
    [evaluation] = run_finetune_evaluation(config, log=lines.append)
    epochs = [line for line in lines if " epoch " in line]
    assert [line.split(" box_loss")[0] for line in epochs] == [
        "finetune labelled/full/scratch: epoch 1/2", "finetune labelled/full/scratch: epoch 2/2"]
    assert "ETA" in epochs[0] and "mAP50 " in epochs[1]  # only the last epoch is validated (val=False)
    assert any(line.startswith("finetune labelled/full/scratch: mAP@0.5 ") for line in lines)
    published = Path(config.layout().path("runs", "finetune", "labelled", "full", "scratch"))
    kept = {p.relative_to(published).as_posix() for p in published.rglob("*") if p.is_file()}
    assert {"results.png", "results.csv", "weights/last.pt", "val/confusion_matrix.png"} <= kept, sorted(kept)
    assert any("PR_curve" in name and name.startswith("val/") for name in kept), sorted(kept)
    assert any(name.startswith("val/val_batch") and name.endswith("_pred.jpg") for name in kept), sorted(kept)
    assert all((published / name).stat().st_size > 1000 for name in kept if name.endswith((".png", ".jpg")))
    assert Path(evaluation.table["evaluated_weights"].iloc[0]).is_file()


def test_finetune_headline_figures_are_the_floats_worth_plotting():
    import pandas as pd

    from assets.detection import headline_figures

    table = pd.DataFrame({
        "dataset": ["a", "a", "b", "b", "a"], "regime": ["full", "full", "full", "full", "few8"],
        "variant": ["scratch", "agssp", "scratch", "agssp", "agssp"],
        "map50_pct": [40.0, 50, 20, 40, 90], "map50_95_pct": [20.0, 30, 10, 20, 50],
        "delta_map50_pct": [0.0, 10, 0, 20, 30],
    })
    figures = headline_figures(table)
    assert figures == pytest.approx({"scratch_map50_pct": 30, "scratch_map50_95_pct": 15, "agssp_map50_pct": 45,
                                     "agssp_map50_95_pct": 25, "agssp_delta_map50_pct_vs_scratch": 15})
    assert all(isinstance(v, float) for v in figures.values())
