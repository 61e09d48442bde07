"""kead_evaluation covers what users have: sources with boxes but no masks (image AUROC from is_normal,
box-interior pixel AUROC), and the few-shot references are left out of the scores."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from agssp_pipeline.kead.evaluation import box_mask, evaluate_maps, has_boxes, reference_ids
from agssp_pipeline.kead.store import MapTable

GRID, SIDE = 8, 64


def _box_source(tmp_path, n_normal: int = 4, n_defect: int = 4, n_unlabelled: int = 2):
    """Index (no masks), annotation boxes, and maps that are hot inside each defect's box."""
    rows, boxes, maps, scores = [], [], [], []
    rng = np.random.default_rng(0)
    for kind, count in (("ok", n_normal), ("bad", n_defect), ("unknown", n_unlabelled)):
        for number in range(count):
            image_id = f"{kind}{number:04d}"
            path = tmp_path / f"{image_id}.png"
            cv2.imwrite(str(path), np.full((SIDE, SIDE), 100, np.uint8))
            rows.append({"image_id": image_id, "path": str(path), "source": "boxed", "category": "plate",
                         "width": SIDE, "height": SIDE, "mask_path": None,
                         "is_normal": True if kind == "ok" else None, "duplicate_of": None})
            patch = rng.uniform(0.0, 0.3, (GRID, GRID)).astype(np.float32)
            if kind == "bad":
                x1, y1 = 8 * (number % 4), 8 * (number % 3)
                boxes.append({"image_id": image_id, "class_name": "scratch", "x1": float(x1), "y1": float(y1),
                              "x2": float(x1 + 24), "y2": float(y1 + 24)})
                patch[y1 // 8 : (y1 + 24) // 8, x1 // 8 : (x1 + 24) // 8] = 0.9
            maps.append(patch)
            scores.append(float(patch.max()))
    index = pd.DataFrame(rows)
    table = MapTable(image_id=index["image_id"].to_numpy(), maps=np.stack(maps).astype(np.float16),
                     image_score=np.asarray(scores, np.float32),
                     zero_shot_score=np.full(len(index), np.nan, np.float32),
                     attrs={"encoder": "cnn_fewshot", "version": "v1", "references": {"plate": ["ok0000", "ok0001"]}})
    return index, pd.DataFrame(boxes), table


def test_box_only_source_gets_image_and_box_interior_pixel_auroc(tmp_path):
    index, boxes, table = _box_source(tmp_path)
    evaluation = evaluate_maps(index, table, annotations=boxes).set_index(["level", "name"])
    overall = evaluation.loc[("overall", "all")]
    # 4 boxed + 4 normal - 2 references; the 2 images with neither boxes nor a normal flag are left out
    assert overall["n_images"] == 6 and overall["n_anomalous"] == 4 and overall["n_normal"] == 2
    assert overall["references_excluded"] == 2 and overall["ground_truth"] == "boxes"
    assert overall["image_auroc"] == pytest.approx(1.0)
    assert overall["pixel_auroc"] > 0.95  # the maps are hot exactly inside the boxes

    without_boxes = evaluate_maps(index, table)  # no annotations: only normals are labelled, nothing to rank
    assert np.isnan(without_boxes.set_index("level").loc["overall", "image_auroc"])


def test_box_interior_auroc_falls_when_maps_miss_the_boxes(tmp_path):
    index, boxes, table = _box_source(tmp_path)
    shifted = boxes.assign(y1=40.0, y2=64.0)  # below every hot region (hot rows end at y = 40)
    good = evaluate_maps(index, table, annotations=boxes).set_index("level").loc["overall", "pixel_auroc"]
    bad = evaluate_maps(index, table, annotations=shifted).set_index("level").loc["overall", "pixel_auroc"]
    assert good > 0.95 and bad < 0.5


def test_references_are_left_out_unless_asked(tmp_path):
    index, boxes, table = _box_source(tmp_path)
    assert reference_ids(table) == {"ok0000", "ok0001"}
    kept = evaluate_maps(index, table, annotations=boxes, exclude_references=False).set_index("level")
    assert kept.loc["overall", "n_normal"] == 4 and kept.loc["overall", "references_excluded"] == 0
    # a reference scored high (as if against another memory) would lower the image AUROC only when kept
    table.image_score[list(table.image_id).index("ok0000")] = 5.0
    assert evaluate_maps(index, table, annotations=boxes).set_index("level").loc["overall", "image_auroc"] == 1.0
    kept = evaluate_maps(index, table, annotations=boxes, exclude_references=False).set_index("level")
    assert kept.loc["overall", "image_auroc"] < 1.0


def test_a_mask_wins_over_boxes_and_box_masks_are_clipped(tmp_path):
    index, boxes, table = _box_source(tmp_path)
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[0:8, 0:8] = 255
    mask_path = tmp_path / "bad0000_mask.png"
    cv2.imwrite(str(mask_path), mask)
    index.loc[index["image_id"] == "bad0000", "mask_path"] = str(mask_path)
    overall = evaluate_maps(index, table, annotations=boxes).set_index("level").loc["overall"]
    assert overall["ground_truth"] == "boxes+masks"
    clipped = box_mask(np.array([[-5.0, 60.5, 10.0, 80.0]]), 64, 64)
    assert clipped.sum() == 10 * 4 and clipped[63, 0] and not clipped[59, 0]
    assert not has_boxes(None) and not has_boxes(boxes.iloc[:0]) and has_boxes(boxes)


def test_kead_evaluation_asset_evaluates_a_box_only_source(tmp_path):
    import dagster as dg
    import yaml

    from agssp_pipeline.config import load_config
    from agssp_pipeline.kead.store import MapWriter
    from assets.kead import kead_evaluation
    from assets.resources import PipelineConfigResource

    config = {"storage_root": str(tmp_path / "storage"),
              "sources": [{"name": "boxed", "format": "image_folder", "root": str(tmp_path), "category": "plate"}]}
    path = tmp_path / "agssp.yaml"
    path.write_text(yaml.safe_dump(config))
    layout = load_config(path).layout()
    layout.ensure_dir("index")
    index, boxes, table = _box_source(tmp_path)
    index.to_parquet(layout.index("boxed"))
    boxes.to_parquet(layout.annotations("boxed"))
    attrs = {"identity": {"encoder": "cnn_fewshot"}, "encoder": "cnn_fewshot", "references": table.attrs["references"]}
    with MapWriter(layout.maps_store("boxed"), "v1", GRID, attrs) as writer:
        writer.append(list(table.image_id), table.maps.astype(np.float32), table.image_score, table.zero_shot_score)

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("pretrain_source", ["boxed"])
    result = dg.materialize([kead_evaluation], instance=instance, partition_key="boxed",
                            resources={"pipeline_config": PipelineConfigResource(config_path=str(path))})
    assert result.success
    metadata = result.asset_materializations_for_node("kead_evaluation")[0].metadata
    assert metadata["evaluated"].value is True and metadata["ground_truth"].value == "boxes"
    assert metadata["references_excluded"].value == 2 and metadata["image_auroc"].value == pytest.approx(1.0)
    history = pd.read_parquet(layout.evaluations("kead", "boxed"))
    assert (history["adaptor"] == "").all()
