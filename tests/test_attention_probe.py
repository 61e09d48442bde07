"""The attention probe: AUROC of AGBP's attention against defect pixels, its inputs, writer, reader and asset."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime

import cv2
import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from agssp_pipeline.config import PipelineConfig, SourceConfig, dump_config
from agssp_pipeline.eval import attention_probe as probe
from agssp_pipeline.training import checkpoint as ckpt
from agssp_pipeline.training import losses
from agssp_pipeline.training.backbones import StagedBackbone, build_backbone
from assets.partitions import BACKBONE_PARTITION
from assets.resources import PipelineConfigResource
from assets.training import backbone_attention_evaluation

SIZE = 32


class _Darkness(nn.Module):
    """Activation = how dark the (normalised) pixel is: attention sits exactly on dark pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(-x.mean(dim=1, keepdim=True))


class DarkPixelBackbone(StagedBackbone):
    """Two stages: darkness at full resolution, then average-pooled to half (like a strided stage)."""

    def __init__(self):
        native = nn.ModuleDict({"dark": _Darkness(), "pool": nn.AvgPool2d(2)})
        super().__init__(native, [[native["dark"]], [native["pool"]]], [1, 1])


def _synthetic(count: int = 24, seed: int = 0) -> probe.ProbeImages:
    """Bright images with one dark square each; the mask is the square."""
    rng = np.random.default_rng(seed)
    images = np.full((count, 3, SIZE, SIZE), 0.9, dtype=np.float32)
    masks = np.zeros((count, SIZE, SIZE), dtype=bool)
    for i in range(count):
        y, x = rng.integers(0, SIZE - 8, size=2)
        images[i, :, y:y + 8, x:x + 8] = 0.1
        masks[i, y:y + 8, x:x + 8] = True
    return probe.ProbeImages("synth", torch.from_numpy(images), masks, "masks", 0)


def test_attention_on_the_defect_gives_auroc_near_one_and_shuffled_masks_near_half():
    data = _synthetic()
    start = probe.Start("dark", DarkPixelBackbone(), (0, 1))
    row = probe.probe_start(start, data, "efficientnet_lite0", SIZE)  # the name only picks mean/std
    assert row["pixel_auroc"] > 0.97
    assert row["images_used"] == 24 and row["n_pixels"] == 24 * SIZE * SIZE
    shuffled = probe.ProbeImages("synth", data.images, data.masks[np.roll(np.arange(24), 5)], "masks", 0)
    row = probe.probe_start(start, shuffled, "efficientnet_lite0", SIZE)
    assert 0.4 < row["pixel_auroc"] < 0.6


def test_probe_reuses_agbp_attention_definition():
    assert probe.attention_map is losses.attention_map
    features = [torch.rand(2, 5, 4, 4), torch.rand(2, 7, 2, 2)]
    combined = probe.stage_attention(features, (0, 1), 8, 8)
    expected = []
    for feature in features:
        a = torch.nn.functional.interpolate(losses.attention_map(feature)[:, None], size=(8, 8), mode="bilinear",
                                            align_corners=False)[:, 0]
        flat = a.flatten(1)
        expected.append((a - flat.min(1).values[:, None, None]) / (flat.max(1).values - flat.min(1).values)[:, None, None])
    torch.testing.assert_close(combined, torch.stack(expected).mean(0))
    assert combined.min() >= 0 and combined.max() <= 1


def _write_labelled_source(root, count: int = 5) -> pd.DataFrame:
    """Images with a dark defect, masks for some, boxes for one, an unreadable image and a corrupt mask."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image = np.full((48, 40, 3), 200, np.uint8)
        image[10:20, 8:18] = 30
        path = root / f"img{i}.png"
        cv2.imwrite(str(path), image)
        mask_path = root / f"img{i}_mask.png"
        mask = np.zeros((48, 40), np.uint8)
        mask[10:20, 8:18] = 255
        cv2.imwrite(str(mask_path), mask)
        rows.append({"image_id": f"{i:016x}", "path": str(path), "mask_path": str(mask_path)})
    rows[1]["mask_path"] = None  # labelled by a box instead
    (root / "broken.png").write_bytes(b"not an image")
    rows.append({"image_id": "f" * 16, "path": str(root / "broken.png"), "mask_path": str(root / "img0_mask.png")})
    (root / "bad_mask.png").write_bytes(b"")
    rows.append({"image_id": "e" * 16, "path": str(root / "img0.png"), "mask_path": str(root / "bad_mask.png")})
    rows.append({"image_id": "d" * 16, "path": str(root / "img0.png"), "mask_path": None})  # unlabelled
    return pd.DataFrame(rows).assign(source="labelled", category="steel", duplicate_of=None)


def test_load_probe_images_is_ordered_bounded_and_skips_bad_files(tmp_path):
    index = _write_labelled_source(tmp_path / "data")
    boxes = pd.DataFrame([{"image_id": f"{1:016x}", "x1": 8.0, "y1": 10.0, "x2": 18.0, "y2": 20.0}])
    data = probe.load_probe_images("labelled", index.sample(frac=1, random_state=3), boxes, SIZE, max_images=64)
    assert len(data.images) == 5 and data.skipped == 2  # broken image, empty mask; unlabelled row ignored
    assert data.ground_truth == "boxes+masks"
    assert data.images.shape == (5, 3, SIZE, SIZE) and data.masks.shape == (5, SIZE, SIZE)
    again = probe.load_probe_images("labelled", index, boxes, SIZE, max_images=3)
    torch.testing.assert_close(again.images, data.images[:3])  # image-id order, whatever the index order
    assert list(data.image_ids) == sorted(data.image_ids) and again.image_ids == data.image_ids[:3]
    assert len(set(data.image_ids)) == 5 and set(data.image_ids) <= set(index["image_id"])
    assert probe.load_probe_images("labelled", index.drop(columns="mask_path"), None, SIZE) is None


def _save_backbone_run(layout, name: str, distill_weight: float, seed: int) -> str:
    torch.manual_seed(seed)
    state = build_backbone(name, image_size=64, pretrained=False).backbone.native_state_dict()
    run_id = ckpt.new_run_id()
    lineage = {"kind": ckpt.BACKBONE, "name": name, "backbone": name, "run_id": run_id, "status": "complete",
               "created_at": datetime.now(UTC).isoformat(), "image_size": 64, "distill_weight": distill_weight,
               "resolved": {"distill_stages": [3, 4]}, "weights_digest": ckpt.state_dict_digest(state)}
    ckpt.save_checkpoint(ckpt.run_dir(layout, name, run_id), state, lineage)
    ckpt.write_latest_pointer(layout, name, run_id)
    return run_id


@pytest.fixture
def pipeline(tmp_path):
    index = _write_labelled_source(tmp_path / "data")
    unlabelled = SourceConfig(name="plain", format="image_folder", root=str(tmp_path / "data"), category="steel")
    labelled = SourceConfig(name="labelled", format="mask_folder", root=str(tmp_path / "data"), category="steel",
                            role="downstream")
    config = PipelineConfig(storage_root=str(tmp_path / "storage"), sources=[unlabelled, labelled])
    config.backbone.image_size = 64
    layout = config.layout()
    layout.ensure_dir("index")
    index.to_parquet(layout.index("labelled"))
    index.drop(columns="mask_path").assign(source="plain").to_parquet(layout.index("plain"))
    path = tmp_path / "agssp.yaml"
    dump_config(config, path)
    return path, layout


def test_asset_materialises_one_row_per_source_and_start(pipeline):
    path, layout = pipeline
    run_id = _save_backbone_run(layout, "yolov8n", 1.0, seed=1)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(BACKBONE_PARTITION, ["yolov8n"])
    result = dg.materialize([backbone_attention_evaluation], partition_key="yolov8n", instance=instance,
                            resources={"pipeline_config": PipelineConfigResource(config_path=str(path))})
    assert result.success
    table = pd.read_parquet(layout.evaluations("attention", "yolov8n"))
    assert list(table.columns) == probe.ATTENTION_COLUMNS
    assert list(table["start"]) == ["scratch", "imagenet", run_id]  # only the labelled source has rows
    assert set(table["source"]) == {"labelled"}
    scratch, imagenet, run = table.to_dict("records")
    assert 0.0 <= scratch["pixel_auroc"] <= 1.0 and scratch["images_used"] == 4  # no box table here
    assert np.isnan(imagenet["pixel_auroc"]) and imagenet["note"].startswith("not applicable")
    assert run["run_id"] == run_id and run["distill_weight"] == 1.0 and run["stages"] == "3,4"
    assert run["pixel_auroc"] != scratch["pixel_auroc"]  # the checkpoint's weights were loaded, not a re-init
    metadata = result.asset_materializations_for_node("backbone_attention_evaluation")[0].metadata
    assert "| labelled | scratch |" in metadata["table"].value
    assert backbone_attention_evaluation.code_versions_by_key[dg.AssetKey("backbone_attention_evaluation")]

    record = probe.attention_record(layout.evaluations("attention", "yolov8n"))
    assert set(record.fields["pixel AUROC"]) == {"labelled/scratch", f"labelled/{run_id}"}
    backbone_inputs = [i for i in record.inputs if i.kind == ckpt.BACKBONE]
    assert len(backbone_inputs) == 1 and backbone_inputs[0].version == run["weights_digest"]

    from agssp_pipeline.lineage_report import build_lineage_report

    report = build_lineage_report(layout.evaluations("attention", "yolov8n"), use_dagster=False)
    assert report.target_kind == "attention"
    assert [e.label for e in report.stage("evaluations").entries] == ["attention evaluation yolov8n"]
    assert len(report.stage("backbone").entries) == 1 and report.stage("sources").entries
    assert not report.flags("STALE")


def test_probe_is_deterministic_and_scores_the_imagenet_start(pipeline):
    _, layout = pipeline
    first = probe.evaluate_attention(layout, "efficientnet_lite0", ["labelled", "plain", "absent"], 64)
    second = probe.evaluate_attention(layout, "efficientnet_lite0", ["labelled"], 64)
    assert list(first["start"]) == ["scratch", "imagenet"]
    assert first["note"].iloc[1].startswith("imagenet:")
    np.testing.assert_allclose(first["pixel_auroc"], second["pixel_auroc"])
    assert first["pixel_auroc"].notna().all()


def test_a_checkpoint_that_does_not_fit_is_an_error_naming_the_run(pipeline):
    _, layout = pipeline
    run_id = _save_backbone_run(layout, "yolov8n", 1.0, seed=2)
    shutil.copytree(ckpt.run_dir(layout, "yolov8n", run_id), ckpt.run_dir(layout, "yolov8s", run_id))
    with pytest.raises(ValueError, match=f"{run_id}.*does not fit backbone 'yolov8s'"):
        list(probe.backbone_starts(layout, "yolov8s", 64))
