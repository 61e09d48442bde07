"""YOLO / COCO exports: ultralytics and pycocotools read them back; user images are never copied or touched."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from agssp_pipeline.boxes.export import (
    export_coco_dataset,
    export_ground_truth_yolo,
    export_pseudo_coco,
    export_pseudo_yolo,
    export_yolo_dataset,
)
from agssp_pipeline.storage import StorageLayout


@pytest.fixture()
def user_images(tmp_path):
    folder = tmp_path / "plant" / "images"  # an /images/ folder of the user's own: labels must not go beside it
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate([(40, 60), (50, 50), (30, 80)]):
        path = folder / f"img_{i}.JPG"
        cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        records.append({"image_id": f"{i:016x}", "path": str(path), "width": w, "height": h})
    return pd.DataFrame(records)


def _snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


def test_yolo_export_is_read_by_ultralytics_and_leaves_user_images_alone(tmp_path, user_images):
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    before = _snapshot(tmp_path / "plant" / "images")
    boxes = pd.DataFrame(
        {
            "image_id": [f"{0:016x}", f"{0:016x}", f"{2:016x}"],
            "class_name": ["scratch", "pit", "pit"],
            "x1": [0.0, 10.0, -5.0],
            "y1": [0.0, 10.0, 5.0],
            "x2": [60.0, 20.0, 20.0],
            "y2": [40.0, 30.0, 25.0],
        }
    )
    out = tmp_path / "export"
    data_yaml = export_yolo_dataset(user_images, boxes, ["pit", "scratch"], out, "train")
    export_yolo_dataset(user_images.iloc[:1], boxes.iloc[:2], ["pit", "scratch"], out, "val")

    assert _snapshot(tmp_path / "plant" / "images") == before
    assert not list((tmp_path / "plant").glob("labels*"))
    links = sorted((out / "train" / "images").iterdir())
    assert len(links) == 3 and all(p.is_symlink() for p in links)
    label = (out / "train" / "labels" / f"{0:016x}.txt").read_text().splitlines()
    assert label == ["0 0.250000 0.500000 0.166667 0.500000", "1 0.500000 0.500000 1.000000 1.000000"]
    clipped = (out / "train" / "labels" / f"{2:016x}.txt").read_text().split()
    assert clipped == ["0", "0.125000", "0.500000", "0.250000", "0.666667"]
    assert (out / "train" / "labels" / f"{1:016x}.txt").read_text() == ""  # background image

    data = check_det_dataset(str(data_yaml))
    assert data["names"] == {0: "pit", 1: "scratch"} and data["val"].endswith("val/images")
    dataset = YOLODataset(img_path=data["train"], data=data, task="detect", augment=False, imgsz=64)
    assert sorted(len(lab["cls"]) for lab in dataset.labels) == [0, 1, 2]


def test_yolo_export_is_deterministic_and_removes_its_own_stale_files(tmp_path, user_images):
    boxes = pd.DataFrame({"image_id": [f"{1:016x}"], "class_id": [0], "x1": [1.0], "y1": [2.0], "x2": [3.0], "y2": [4.0]})
    out = tmp_path / "export"
    export_yolo_dataset(user_images, boxes, ["defect"], out, "train")
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.txt")}
    export_yolo_dataset(user_images, boxes, ["defect"], out, "train")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.txt")} == first
    export_yolo_dataset(user_images.iloc[1:2], boxes, ["defect"], out, "train")
    assert [p.name for p in (out / "train" / "labels").iterdir()] == [f"{1:016x}.txt"]
    assert len(list((out / "train" / "images").iterdir())) == 1
    assert yaml.safe_load((out / "data.yaml").read_text())["val"] == "train/images"

    (out / "train" / "images" / "someone_elses.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        export_yolo_dataset(user_images, boxes, ["defect"], out, "train")


def test_yolo_export_rejects_bad_input(tmp_path, user_images):
    boxes = pd.DataFrame({"image_id": ["nope"], "class_id": [0], "x1": [1.0], "y1": [2.0], "x2": [3.0], "y2": [4.0]})
    with pytest.raises(ValueError, match="not in records"):
        export_yolo_dataset(user_images, boxes, ["defect"], tmp_path / "e", "train")
    boxes["image_id"] = user_images["image_id"].iloc[0]
    boxes = boxes.drop(columns="class_id").assign(class_name="crack")
    with pytest.raises(ValueError, match="not in class_names"):
        export_yolo_dataset(user_images, boxes, ["defect"], tmp_path / "e", "train")
    missing = user_images.assign(path=str(tmp_path / "gone.jpg"))
    with pytest.raises(FileNotFoundError):
        export_yolo_dataset(missing.iloc[:1], boxes.iloc[:0], ["defect"], tmp_path / "e", "train")


def _write_tables(layout: StorageLayout, user_images: pd.DataFrame) -> None:
    os.makedirs(layout.path("index"), exist_ok=True)
    os.makedirs(layout.path("pseudo_boxes"), exist_ok=True)
    index = user_images.assign(source="src", category="steel", duplicate_of=None)
    index.loc[2, "duplicate_of"] = index.loc[0, "image_id"]
    index.to_parquet(layout.index("src"))
    ids = user_images["image_id"].tolist()
    nan = float("nan")
    table = pd.DataFrame(
        {
            "image_id": [ids[0], ids[0], ids[1], ids[2]],
            "width": [60, 60, 50, 80],
            "height": [40, 40, 50, 30],
            "judged_defective": [True, True, False, True],
            "box_index": pd.array([0, 1, None, 0], dtype="Int32"),
            "x1": [1.0, 30.0, nan, 1.0],
            "y1": [1.0, 20.0, nan, 1.0],
            "x2": [10.0, 40.0, nan, 5.0],
            "y2": [10.0, 35.0, nan, 5.0],
            "score": [0.9, 0.8, nan, 0.7],
        }
    )
    table.to_parquet(layout.pseudo_boxes("src"))
    annotations = pd.DataFrame(
        {"image_id": [ids[1]], "class_name": ["pit"], "x1": [5.0], "y1": [5.0], "x2": [15.0], "y2": [25.0]}
    )
    annotations.to_parquet(layout.annotations("src"))


def test_pseudo_exports_from_parquet_tables(tmp_path, user_images):
    from pycocotools.coco import COCO

    layout = StorageLayout(str(tmp_path / "storage"))
    _write_tables(layout, user_images)
    data_yaml = export_pseudo_yolo(layout, ["src"])
    labels = data_yaml.parent / "train" / "labels"
    # image 0 has two boxes, image 1 is a negative, image 2 is an index duplicate and left out
    assert sorted(p.name for p in labels.iterdir()) == [f"{0:016x}.txt", f"{1:016x}.txt"]
    assert len((labels / f"{0:016x}.txt").read_text().splitlines()) == 2
    assert (labels / f"{1:016x}.txt").read_text() == ""
    assert yaml.safe_load(data_yaml.read_text())["names"] == {0: "defect"}
    no_negatives = export_pseudo_yolo(layout, ["src"], tmp_path / "pos_only", include_negatives=False)
    assert len(list((no_negatives.parent / "train" / "labels").iterdir())) == 1

    coco_path = export_pseudo_coco(layout, ["src"])
    coco = COCO(str(coco_path))
    assert len(coco.getImgIds()) == 2 and len(coco.getAnnIds()) == 2
    annotation = coco.loadAnns(coco.getAnnIds())[1]
    assert annotation["bbox"] == [30.0, 20.0, 10.0, 15.0] and annotation["score"] == pytest.approx(0.8)
    assert export_pseudo_coco(layout, ["src"]).read_bytes() == coco_path.read_bytes()

    gt_yaml = export_ground_truth_yolo(layout, "src", ["pit", "crack"], tmp_path / "gt", "val", [user_images["image_id"][1]])
    assert (gt_yaml.parent / "val" / "labels" / f"{1:016x}.txt").read_text() == "0 0.200000 0.300000 0.200000 0.400000\n"


def test_coco_export_of_ground_truth_classes(tmp_path, user_images):
    boxes = pd.DataFrame({"image_id": [f"{2:016x}"], "class_name": ["b"], "x1": [1.0], "y1": [2.0], "x2": [3.0], "y2": [4.0]})
    path = export_coco_dataset(user_images, boxes, ["a", "b"], tmp_path / "c.json")
    data = json.loads(path.read_text())
    assert [c["name"] for c in data["categories"]] == ["a", "b"]
    assert data["annotations"][0]["category_id"] == 2 and data["annotations"][0]["image_id"] == 3
    assert "score" not in data["annotations"][0]
