"""The native adapters on fixture folders the tests write: boxes, derived masks, is_normal, bad input rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as coco_mask
from sources_fixtures import write_image, write_mask

from agssp_pipeline.config import SourceConfig
from agssp_pipeline.sources import ingest_source
from agssp_pipeline.sources.formats import FORMAT_ADAPTERS, FORMAT_OPTIONS, check_options
from agssp_pipeline.sources.regions import read_mask
from agssp_pipeline.storage import StorageLayout

SIZE = (40, 30)  # width, height


def ingest(tmp_path: Path, source: SourceConfig):
    layout = StorageLayout(str(tmp_path / "store"))
    check_options(source)
    return ingest_source(source, derived_masks=layout.derived_masks(source.name), workers=2), layout


def row(result, name: str):
    return result.images[result.images.path.str.endswith("/" + name)].iloc[0]


def boxes_of(result, name: str) -> list[tuple]:
    ann = result.annotations[result.annotations.path.str.endswith("/" + name)]
    return [(r.class_name, *(round(v, 6) for v in (r.x1, r.y1, r.x2, r.y2))) for r in ann.itertuples()]


def reasons(result) -> str:
    return "\n".join(f"{r.path} {r.reason}" for r in result.quarantine.itertuples())


def test_every_format_has_options_registered():
    assert set(FORMAT_ADAPTERS) == set(FORMAT_OPTIONS)


def test_labelme_polygons_and_rectangles_become_boxes_and_a_mask(tmp_path):
    root = tmp_path / "lm"
    write_image(root / "a.jpg", SIZE, seed=1)
    write_image(root / "empty.jpg", SIZE, seed=2)
    write_image(root / "unlabelled.jpg", SIZE, seed=3)
    shapes = [{"label": "scratch", "points": [[2, 2], [12, 2], [12, 10], [2, 10]], "shape_type": "polygon"},
              {"label": "pit", "points": [[30, 25], [20, 15]], "shape_type": "rectangle"},
              {"label": "line", "points": [[0, 0], [5, 5]], "shape_type": "line"}]
    (root / "a.json").write_text(json.dumps({"shapes": shapes, "imagePath": "a.jpg", "imageData": None}))
    (root / "empty.json").write_text(json.dumps({"shapes": [], "imagePath": "empty.jpg"}))
    (root / "orphan.json").write_text(json.dumps({"shapes": [], "imagePath": "gone.jpg"}))
    (root / "broken.json").write_text("{not json")
    source = SourceConfig(name="lm", format="labelme", root=str(root), category="plate")
    result, layout = ingest(tmp_path, source)
    assert sorted(boxes_of(result, "a.jpg")) == [("pit", 20, 15, 30, 25), ("scratch", 2, 2, 12, 10)]
    a = row(result, "a.jpg")
    assert a.is_normal == False and a.mask_path.startswith(layout.derived_masks("lm"))  # noqa: E712
    mask = read_mask(a.mask_path)
    assert mask.shape == (30, 40) and mask[5, 5] == 1 and mask[20, 25] == 1 and mask[27, 2] == 0
    assert row(result, "empty.jpg").is_normal == True  # noqa: E712
    assert row(result, "unlabelled.jpg").is_normal is None
    text = reasons(result)
    assert "shape_type 'line'" in text and "gone.jpg" in text and "broken.json" in text
    assert not (root / "a.jpg.png").exists() and sorted(p.name for p in root.iterdir()) == sorted(
        ["a.jpg", "empty.jpg", "unlabelled.jpg", "a.json", "empty.json", "orphan.json", "broken.json"])


def test_yolo_seg_polygons_give_masks_and_plain_yolo_does_not(tmp_path):
    root = tmp_path / "ys"
    write_image(root / "images" / "train" / "a.png", SIZE, seed=1, fmt="PNG")
    labels = root / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5\n1 0.8 0.8 0.2 0.2\n0 0.1 nan 0.2 0.2\n")
    (root / "data.yaml").write_text("names: [crack, hole]\n")
    seg, layout = ingest(tmp_path, SourceConfig(name="ys", format="yolo_seg", root=str(root), category="tile"))
    assert sorted(boxes_of(seg, "a.png")) == [("crack", 4, 3, 20, 15), ("hole", 28, 21, 36, 27)]
    mask = read_mask(row(seg, "a.png").mask_path)
    assert mask[8, 10] == 1 and mask[24, 32] == 1 and mask[2, 2] == 0
    assert row(seg, "a.png").split == "train" and "non-finite" in reasons(seg)
    plain, _ = ingest(tmp_path, SourceConfig(name="yb", format="yolo", root=str(root), category="tile"))
    assert boxes_of(plain, "a.png") == boxes_of(seg, "a.png") and pd.isna(row(plain, "a.png").mask_path)


def test_coco_polygon_and_rle_segmentations_become_one_mask(tmp_path):
    root = tmp_path / "coco"
    write_image(root / "images" / "a.jpg", SIZE, seed=1)
    write_image(root / "images" / "b.jpg", SIZE, seed=2)
    rle_source = np.zeros((30, 40), dtype=np.uint8, order="F")
    rle_source[20:26, 30:36] = 1
    compressed = coco_mask.encode(rle_source)
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "categories": [{"id": 1, "name": "dent"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 20, 6, 6],
             "segmentation": {"size": [30, 40], "counts": compressed["counts"].decode()}},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "segmentation": {"size": [10, 10], "counts": [100]}},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "segmentation": "oops"},
        ],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    result, _ = ingest(tmp_path, SourceConfig(name="coco", format="coco", root=str(root), category="strip"))
    a = row(result, "a.jpg")
    mask = read_mask(a.mask_path)
    assert mask[5, 5] == 1 and mask[22, 32] == 1 and mask[15, 20] == 0
    assert len(boxes_of(result, "a.jpg")) == 4  # boxes are the annotations' own bboxes
    assert row(result, "b.jpg").is_normal == True and pd.isna(row(result, "b.jpg").mask_path)  # noqa: E712
    text = reasons(result)
    assert "RLE size 10x10 but the image is 40x30" in text and "segmentation must be polygons" in text


@pytest.mark.parametrize("folder_is", ["class", "category"])
def test_class_folders_with_spaces_splits_and_ok_folders(tmp_path, folder_is):
    root = tmp_path / "cf"
    write_image(root / "train" / "ok_front" / "1.jpg", seed=1)
    write_image(root / "train" / "def_front" / "2.jpg", seed=2)
    write_image(root / "test" / "red iron" / "3.jpg", seed=3)
    write_image(root / "loose.jpg", seed=4)
    kwargs = {"category": "impeller"} if folder_is == "class" else {"category_from": "subfolder"}
    source = SourceConfig(name="cf", format="class_folders", root=str(root), options={"folder_is": folder_is}, **kwargs)
    result, _ = ingest(tmp_path, source)
    assert row(result, "1.jpg").is_normal == True and row(result, "1.jpg").split == "train"  # noqa: E712
    assert row(result, "2.jpg").is_normal == False and row(result, "3.jpg").split == "test"  # noqa: E712
    expected = {"impeller"} if folder_is == "class" else {"ok_front", "def_front", "red iron"}
    assert set(result.images.category) == expected
    assert "loose.jpg" in reasons(result) and len(result.images) == 3


def test_class_folders_normal_folder_names_are_configurable(tmp_path):
    root = tmp_path / "cf"
    write_image(root / "GOOD PARTS" / "1.jpg", seed=1)
    write_image(root / "ok" / "2.jpg", seed=2)
    source = SourceConfig(name="cf", format="class_folders", root=str(root), category="x",
                          options={"normal_folders": ["good parts"]})
    result, _ = ingest(tmp_path, source)
    assert row(result, "1.jpg").is_normal == True and row(result, "2.jpg").is_normal == False  # noqa: E712


def test_image_labels_csv_labels_probabilities_and_bad_rows(tmp_path):
    root = tmp_path / "csv"
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "sub/e.jpg"]):
        write_image(root / name, seed=i)
    (root / "labels.csv").write_text("path,label,probability\na.jpg,OK,\nb.jpg,scratch,\nc.jpg,,0.9\n"
                                     "sub/e.jpg,,0.1\nmissing.jpg,OK,\nd.jpg,,1.7\n\"broken,OK\n")
    result, _ = ingest(tmp_path, SourceConfig(name="csv", format="image_labels_csv", root=str(root), category="x"))
    assert row(result, "a.jpg").is_normal == True and row(result, "b.jpg").is_normal == False  # noqa: E712
    assert row(result, "c.jpg").is_normal == False and row(result, "e.jpg").is_normal == True  # noqa: E712
    assert row(result, "d.jpg").is_normal is None
    text = reasons(result)
    assert "line 6: path 'missing.jpg'" in text and "line 7 (d.jpg): probability 1.7 is outside" in text
    assert "line 8" in text


def test_image_labels_csv_without_usable_columns_says_what_it_expects(tmp_path):
    root = tmp_path / "csv"
    write_image(root / "a.jpg")
    (root / "x.csv").write_text("foo,bar\na.jpg,1\n")
    with pytest.raises(ValueError, match="needs a path column"):
        ingest(tmp_path, SourceConfig(name="csv", format="image_labels_csv", root=str(root), category="x"))


def test_instance_masks_one_box_per_file_and_a_union_mask(tmp_path):
    root = tmp_path / "inst"
    write_image(root / "images" / "img_1.png", SIZE, seed=1, fmt="PNG")
    write_image(root / "images" / "clean.png", SIZE, seed=2, fmt="PNG")
    write_mask(root / "masks" / "img_1_scratch_0.png", SIZE, [(2, 2, 8, 6)])
    write_mask(root / "masks" / "img_1_scratch_1.png", SIZE, [(20, 10, 30, 20)])
    write_mask(root / "masks" / "img_1" / "7.png", SIZE, [(35, 25, 38, 28)])
    write_mask(root / "masks" / "stray_0.png", SIZE, [(1, 1, 2, 2)])
    write_mask(root / "masks" / "img_1_small_2.png", (10, 10), [(1, 1, 2, 2)])
    result, _ = ingest(tmp_path, SourceConfig(name="inst", format="instance_masks", root=str(root), category="slab"))
    assert sorted(boxes_of(result, "img_1.png")) == [("scratch", 2, 2, 8, 6), ("scratch", 20, 10, 30, 20),
                                                      ("slab", 35, 25, 38, 28)]
    mask = read_mask(row(result, "img_1.png").mask_path)
    assert mask.sum() == 24 + 100 + 9 and row(result, "img_1.png").is_normal == False  # noqa: E712
    assert row(result, "clean.png").is_normal is None and pd.isna(row(result, "clean.png").mask_path)
    text = reasons(result)
    assert "stray_0.png instance mask matches no image" in text and "instance mask is 10x10" in text


def test_pixel_boxes_text_beside_each_image(tmp_path):
    root = tmp_path / "pb"
    write_image(root / "a.jpg", SIZE, seed=1)
    write_image(root / "b.jpg", SIZE, seed=2)
    write_image(root / "c.jpg", SIZE, seed=3)
    (root / "a.txt").write_text("# x1 y1 x2 y2 class\n1 2 10 12 rolled in scale\n5 5 9\nx 1 2 3 dent\n")
    (root / "b.txt").write_text("")
    (root / "gone.txt").write_text("1 1 2 2 pit\n")
    result, _ = ingest(tmp_path, SourceConfig(name="pb", format="pixel_boxes", root=str(root), category="plate"))
    assert boxes_of(result, "a.jpg") == [("rolled in scale", 1, 2, 10, 12)]
    assert row(result, "b.jpg").is_normal == True and row(result, "c.jpg").is_normal is None  # noqa: E712
    text = reasons(result)
    assert "line 3: expected 'x1 y1 x2 y2 class'" in text and "line 4: x1 y1 x2 y2 must be numbers" in text
    assert "gone.txt box file references a missing image" in text


def test_split_folders_images_and_masks_per_split(tmp_path):
    root = tmp_path / "sf"
    for split, seed in (("train", 1), ("val", 2)):
        write_image(root / split / "images" / f"{split}_a.jpg", SIZE, seed=seed)
        write_mask(root / split / "masks" / f"{split}_a.png", SIZE, [(3, 3, 9, 9)])
    write_image(root / "val" / "images" / "nomask.jpg", SIZE, seed=3)
    write_mask(root / "val" / "masks" / "orphan.png", SIZE, [(1, 1, 3, 3)])
    source = SourceConfig(name="sf", format="split_folders", root=str(root), category="rail",
                          options={"defect_class": "defect"})
    result, _ = ingest(tmp_path, source)
    assert dict(zip(result.images.path.map(lambda p: Path(p).name), result.images.split, strict=True)) == {
        "train_a.jpg": "train", "val_a.jpg": "val", "nomask.jpg": "val"}
    assert boxes_of(result, "train_a.jpg") == [("defect", 3, 3, 9, 9)]
    assert row(result, "val_a.jpg").mask_path.endswith("val/masks/val_a.png")
    text = reasons(result)
    assert "orphan.png mask without its image" in text and "nomask.jpg no mask found" in text


def test_split_folders_without_splits_names_the_layout(tmp_path):
    write_image(tmp_path / "x" / "a.jpg")
    with pytest.raises(FileNotFoundError, match="no <split>/images folder"):
        ingest(tmp_path, SourceConfig(name="sf", format="split_folders", root=str(tmp_path / "x"), category="r"))


def test_derived_masks_are_rewritten_identically_and_without_them_boxes_stay(tmp_path):
    root = tmp_path / "lm"
    write_image(root / "a.jpg", SIZE, seed=1)
    shapes = [{"label": "s", "points": [[2, 2], [12, 2], [12, 10]], "shape_type": "polygon"}]
    (root / "a.json").write_text(json.dumps({"shapes": shapes, "imagePath": "a.jpg"}))
    source = SourceConfig(name="lm", format="labelme", root=str(root), category="plate")
    first, _ = ingest(tmp_path, source)
    second, _ = ingest(tmp_path, source)
    assert first.content_hash() == second.content_hash()
    bare = ingest_source(source)
    assert bare.images.mask_path.isna().all() and len(bare.annotations) == 1
