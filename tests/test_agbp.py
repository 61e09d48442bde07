"""AGBP trainer: distillation learns, frozen stages stay put, resume after a crash continues exactly."""

from __future__ import annotations

import logging

import pytest
import torch

from agssp_pipeline.config import PipelineConfig
from agssp_pipeline.training import checkpoint as ckpt
from agssp_pipeline.training.agbp import LoggingCallback, TrainingCallback, train_backbone
from agssp_pipeline.training.backbones import build_backbone, stage_state_keys
from agssp_pipeline.training.data import make_synthetic_pretrain_table
from agssp_pipeline.training.settings import BackboneSettings

FAST = dict(image_size=64, num_workers=0, crop_scale_min=1.0, hflip=0.0, checkpoint_every=1)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return make_synthetic_pretrain_table(str(tmp_path_factory.mktemp("agbp_images")), images=8, size=64)


def _config(tmp_path) -> PipelineConfig:
    return PipelineConfig(storage_root=str(tmp_path / "storage"))


class Recorder(TrainingCallback):
    def __init__(self, crash_after_epoch: int | None = None):
        self.steps, self.epochs, self.start_info = [], [], None
        self.crash_after_epoch = crash_after_epoch

    def on_train_start(self, info):
        self.start_info = info

    def on_step_end(self, progress):
        self.steps.append(progress)

    def on_epoch_end(self, summary):
        self.epochs.append(summary)
        if summary.epoch == self.crash_after_epoch:
            raise RuntimeError("simulated crash (power cut)")


@pytest.fixture(scope="module")
def distill_run(table, tmp_path_factory):
    """Distillation only, yolov8n, one 8-image batch per epoch, 5 epochs."""
    config = _config(tmp_path_factory.mktemp("distill"))
    settings = BackboneSettings(base_loss="none", epochs=5, batch_size=8, lr=0.05, freeze_stages=[0, 1], **FAST)
    return config, train_backbone(config, "yolov8n", settings=settings, table=table)


def test_distillation_loss_decreases(distill_run):
    _, result = distill_run
    losses = [e["distill_loss"] for e in result.epoch_history]
    assert len(losses) == 5
    assert losses[-1] < 0.85 * losses[0], losses
    assert result.lineage["final_losses"]["distill_loss"] == pytest.approx(losses[-1])
    assert result.lineage["final_losses"]["base_loss"] is None


def test_frozen_stages_stay_bit_identical(distill_run):
    _, result = distill_run
    state, lineage = ckpt.load_checkpoint(result.run_dir)
    assert lineage["resolved"]["freeze_stages"] == [0, 1]
    torch.manual_seed(0)  # the trainer seeds with settings.seed (0) before building the model
    fresh = build_backbone("yolov8n").backbone
    initial = fresh.native_state_dict()
    for stage in (0, 1):
        for key in stage_state_keys(fresh, stage):  # weights and BatchNorm statistics
            assert torch.equal(state[key], initial[key]), key
    changed = [k for k in stage_state_keys(fresh, 4) if not torch.equal(state[k], initial[k])]
    assert changed, "the distilled last stage should have been trained"


def test_auto_weight_equalises_first_step_and_both_losses_are_logged(table, tmp_path, caplog):
    recorder = Recorder()
    settings = BackboneSettings(
        base_loss="cls", epochs=1, batch_size=4, max_steps_per_epoch=2, log_every_steps=1, **FAST
    )
    with caplog.at_level(logging.INFO, logger="agbp-test"):
        result = train_backbone(
            _config(tmp_path),
            "yolov8n",
            settings=settings,
            table=table,
            callbacks=[recorder, LoggingCallback(logging.getLogger("agbp-test"), every_steps=1)],
        )
    first = recorder.steps[0]
    assert first.distill_weight == pytest.approx(first.base_loss / first.distill_loss, rel=1e-4)
    assert first.total_loss == pytest.approx(2 * first.base_loss, rel=1e-4)
    assert len(recorder.steps) == 2 and recorder.steps[-1].global_step == 2
    assert all(s.images_per_s > 0 for s in recorder.steps) and recorder.steps[-1].eta_s == 0
    text = caplog.text
    for fragment in ("epoch 1/1 step 2/2", "base ", "distill ", "img/s", "ETA"):
        assert fragment in text
    assert result.lineage["distill_weight"] == pytest.approx(first.distill_weight)


def test_resume_after_crash_continues_at_next_epoch_with_same_state(table, tmp_path):
    settings = BackboneSettings(base_loss="cls", epochs=2, batch_size=4, max_steps_per_epoch=1, **FAST)
    reference = train_backbone(_config(tmp_path / "ref"), "yolov8n", settings=settings, table=table)

    config = _config(tmp_path / "crash")
    crashing = Recorder(crash_after_epoch=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_backbone(config, "yolov8n", settings=settings, table=table, callbacks=[crashing])
    ((run_id, lineage),) = ckpt.list_runs(config.layout(), "yolov8n")
    assert lineage["status"] == "running" and lineage["epochs_completed"] == 1
    assert ckpt.read_latest_pointer(config.layout(), "yolov8n") is None  # not complete: not "latest"
    saved = ckpt.load_training_state(ckpt.run_dir(config.layout(), "yolov8n", run_id))
    assert saved["epoch"] == 1 and saved["optimizer"]["state"]  # momentum buffers exist

    resumed_recorder = Recorder()
    resumed = train_backbone(config, "yolov8n", settings=settings, table=table, callbacks=[resumed_recorder])
    assert resumed.run_id == run_id and resumed.start_epoch == 2
    assert resumed_recorder.start_info["start_epoch"] == 2
    assert [e.epoch for e in resumed_recorder.epochs] == [2]
    assert resumed_recorder.steps[0].global_step == 2  # scheduler/step count continue
    assert resumed.lineage["status"] == "complete" and resumed.lineage["epochs_completed"] == 2
    assert ckpt.read_latest_pointer(config.layout(), "yolov8n")["run_id"] == run_id
    # crash + resume reproduces the uninterrupted run: optimizer, scheduler, RNG and weights were restored
    ref_state, _ = ckpt.load_checkpoint(reference.run_dir)
    resumed_state, _ = ckpt.load_checkpoint(resumed.run_dir)
    for key in ref_state:
        assert torch.allclose(ref_state[key], resumed_state[key], atol=1e-5), key
    ref_opt = ckpt.load_training_state(reference.run_dir)["optimizer"]["state"]
    res_opt = ckpt.load_training_state(resumed.run_dir)["optimizer"]["state"]
    for index in ref_opt:
        assert torch.allclose(ref_opt[index]["momentum_buffer"], res_opt[index]["momentum_buffer"], atol=1e-5)


def test_changed_config_starts_a_new_run_instead_of_resuming(table, tmp_path):
    config = _config(tmp_path)
    settings = BackboneSettings(base_loss="none", epochs=2, batch_size=4, max_steps_per_epoch=1, **FAST)
    with pytest.raises(RuntimeError):
        train_backbone(
            config, "yolov8n", settings=settings, table=table, callbacks=[Recorder(crash_after_epoch=1)]
        )
    ((crashed_id, _),) = ckpt.list_runs(config.layout(), "yolov8n")
    other = settings.model_copy(update={"epochs": 1})
    result = train_backbone(config, "yolov8n", settings=other, table=table)
    assert result.start_epoch == 1 and result.run_id != crashed_id
    assert len(ckpt.list_runs(config.layout(), "yolov8n")) == 2
    with pytest.raises(ValueError, match="another config"):  # forcing the old run id with new settings
        train_backbone(config, "yolov8n", settings=other, table=table, run_id=crashed_id)


@pytest.mark.parametrize(("backbone", "base_loss"), [("yolov8n", "moco"), ("swin_micro", "ssl")])
def test_self_supervised_losses_combine_with_distillation(table, tmp_path, backbone, base_loss):
    recorder = Recorder()
    settings = BackboneSettings(base_loss=base_loss, epochs=1, batch_size=4, max_steps_per_epoch=1, **FAST)
    result = train_backbone(_config(tmp_path), backbone, settings=settings, table=table, callbacks=[recorder])
    step = recorder.steps[0]
    assert step.base_loss > 0 and step.distill_loss > 0
    assert step.total_loss == pytest.approx(
        step.base_loss + step.distill_weight * step.distill_loss, rel=1e-4
    )
    expected = {"yolov8n": ("moco", "cosine", "sgd"), "swin_micro": ("simmim", "l2norm", "adamw")}[backbone]
    resolved = result.lineage["resolved"]
    assert (resolved["base_loss"], resolved["distill_distance"], resolved["optimizer"]) == expected


def test_frozen_and_distilled_stage_overlap_is_rejected(table, tmp_path):
    settings = BackboneSettings(freeze_stages=[3, 4], epochs=1, batch_size=4, **FAST)
    with pytest.raises(ValueError, match="both frozen and distilled"):
        train_backbone(_config(tmp_path), "yolov8n", settings=settings, table=table)
