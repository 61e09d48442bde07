"""Format adapters end to end: every format on a small fixture, with its bad inputs."""

from __future__ import annotations

import pandas as pd
import pytest
from sources_fixtures import make_coco, make_masks, make_severstal, make_voc, make_yolo, write_image

from agssp_pipeline.config import SourceConfig
from agssp_pipeline.sources import FORMAT_ADAPTERS, ingest_source
from agssp_pipeline.sources.probe import image_id_of
from agssp_pipeline.sources.regions import decode_rle


def reasons(result, action: str | None = None) -> list[str]:
    q = result.quarantine
    return list(q.loc[q.action == action, "reason"] if action else q["reason"])


def by_name(result) -> pd.DataFrame:
    images = result.images.copy()
    images["name"] = images["path"].map(lambda p: p.rsplit("/", 1)[-1])
    return images.set_index("name")


def test_every_configured_format_has_an_adapter():
    from agssp_pipeline.config import SOURCE_FORMATS

    assert set(FORMAT_ADAPTERS) == set(SOURCE_FORMATS)


def test_image_folder_category_from_subfolder(tmp_path):
    write_image(tmp_path / "brushed" / "day1" / "a.jpg", seed=1)
    write_image(tmp_path / "polished" / "b.png", seed=2, fmt="PNG")
    write_image(tmp_path / "loose.jpg", seed=3)
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    source = SourceConfig(name="plant", kind="plant", format="image_folder", root=str(tmp_path), category_from="subfolder")
    result = ingest_source(source)
    images = by_name(result)
    assert images.loc["a.jpg", "category"] == "brushed"
    assert images.loc["b.png", "category"] == "polished"
    assert "loose.jpg" not in images.index  # no subfolder -> no category -> quarantined with a reason
    assert any("directly in" in r for r in reasons(result, "quarantined"))
    assert images["is_normal"].isna().all() and images["mask_path"].isna().all()
    assert images.loc["a.jpg", "image_id"] == image_id_of((tmp_path / "brushed" / "day1" / "a.jpg").read_bytes())
    assert (images["width"] == 32).all() and (images["height"] == 24).all() and (images["channels"] == 3).all()


def test_voc_pairs_splits_duplicates_and_box_problems(tmp_path):
    result = ingest_source(make_voc(tmp_path))
    images = by_name(result)
    assert sorted(images.index) == ["a.jpg", "a_copy.jpg", "b.jpg", "c.jpg", "normal.jpg", "normal.png", "v.jpg"]
    assert pd.isna(images.loc["normal.png", "is_normal"])  # same stem: the XML goes to normal.jpg only, flagged
    assert any("same file stem" in r for r in reasons(result, "flagged"))
    assert images.loc["v.jpg", "split"] == "validation" and pd.isna(images.loc["a.jpg", "split"])
    # duplicate: same image_id, second path in sorted order flagged, both rows kept
    assert images.loc["a_copy.jpg", "image_id"] == images.loc["a.jpg", "image_id"]
    assert images.loc["a_copy.jpg", "duplicate_of"] == images.loc["a.jpg", "image_id"]
    assert pd.isna(images.loc["a.jpg", "duplicate_of"])
    assert result.counts()["duplicates"] == 1
    # normal: XML without objects; unknown: unreadable XML
    assert images.loc["normal.jpg", "is_normal"] == True  # noqa: E712
    assert images.loc["a.jpg", "is_normal"] == False  # noqa: E712
    assert pd.isna(images.loc["c.jpg", "is_normal"])
    # boxes: a.jpg keeps 2 (one clipped to width 32), a_copy 1, b.jpg none (inverted, unknown, outside), v 1
    boxes = result.annotations
    assert len(boxes) == 4
    clipped = boxes[(boxes.class_name == "pit") & (boxes.path.str.endswith("/a.jpg"))].iloc[0]
    assert (clipped.x1, clipped.y1, clipped.x2, clipped.y2) == (20.0, 5.0, 32.0, 20.0)
    assert any("clipped" in r for r in reasons(result, "clipped"))
    bad = " | ".join(reasons(result, "quarantined"))
    for expected in ("inverted", "unknown class 'dent'", "outside", "unreadable VOC XML", "missing image 'ghost"):
        assert expected in bad


def test_yolo_normalised_boxes_names_splits(tmp_path):
    result = ingest_source(make_yolo(tmp_path))
    images = by_name(result)
    assert images.loc["x.jpg", "split"] == "train" and images.loc["y.jpg", "split"] == "val"
    assert images.loc["empty.jpg", "is_normal"] == True  # noqa: E712  (empty label file)
    assert pd.isna(images.loc["unlabelled.jpg", "is_normal"])  # no label file: unknown
    boxes = result.annotations.set_index("class_name")
    assert tuple(boxes.loc["scratch", ["x1", "y1", "x2", "y2"]]) == pytest.approx((40, 15, 60, 35))
    assert tuple(boxes.loc["pit", ["x1", "x2"]]) == pytest.approx((85, 100))  # clipped at the right edge
    assert tuple(boxes.loc["inclusion", ["x1", "y1", "x2", "y2"]]) == pytest.approx((10, 5, 30, 15))  # polygon
    bad = " | ".join(reasons(result, "quarantined"))
    assert "unknown class index 7" in bad and "non-numeric" in bad and "missing image 'orphan.*'" in bad


def test_coco_boxes_missing_images_and_broken_json(tmp_path):
    result = ingest_source(make_coco(tmp_path))
    images = by_name(result)
    assert sorted(images.index) == ["p.jpg", "q.jpg", "stray.jpg"]
    assert images.loc["p.jpg", "split"] == "train"
    assert images.loc["q.jpg", "is_normal"] == True and images.loc["p.jpg", "is_normal"] == False  # noqa: E712
    assert pd.isna(images.loc["stray.jpg", "is_normal"])
    boxes = result.annotations
    assert len(boxes) == 1 and tuple(boxes.iloc[0][["x1", "y1", "x2", "y2"]]) == (10, 5, 30, 15)
    bad = " | ".join(reasons(result, "quarantined"))
    assert "missing image 'gone.jpg'" in bad and "unknown category id 9" in bad and "unreadable COCO JSON" in bad


def test_mask_folder_components_normal_folders_and_bad_masks(tmp_path):
    result = ingest_source(make_masks(tmp_path))
    images = by_name(result)
    assert len(images) == 5  # masks beside the images are not indexed as images
    assert images.loc["f1.jpg", "is_normal"] == True and images.loc["c1.jpg", "is_normal"] == False  # noqa: E712
    assert pd.isna(images.loc["c2.jpg", "is_normal"])  # empty mask outside normal_subfolders
    assert images.loc["c1.jpg", "mask_path"].endswith("c1.png") and images.loc["c1.jpg", "channels"] == 1
    assert pd.isna(images.loc["c3.jpg", "mask_path"])  # size mismatch: mask unusable
    boxes = result.annotations
    assert set(boxes.class_name) == {"Crack"}
    assert sorted(map(tuple, boxes[["x1", "y1", "x2", "y2"]].to_numpy().tolist())) == [(2, 2, 8, 6), (20, 10, 30, 25)]
    q = result.quarantine
    assert "mask is 10x10 but its image is 40x30" in " ".join(q.reason)
    assert ((q.kind == "mask") & (q.action == "flagged")).sum() == 1


def test_mask_folder_parallel_mask_dir_with_suffix(tmp_path):
    from sources_fixtures import write_mask

    write_image(tmp_path / "images" / "part1.bmp", size=(20, 20), seed=51, fmt="BMP")
    write_mask(tmp_path / "masks" / "part1_label.png", (20, 20), [(5, 5, 9, 9)])
    source = SourceConfig(name="ksdd", format="mask_folder", root=str(tmp_path), category="commutator",
                          options={"images": "images", "mask_dir": "masks", "mask_suffix": "_label", "defect_class": "crack"})
    result = ingest_source(source)
    assert len(result.images) == 1 and result.images.iloc[0]["mask_path"].endswith("part1_label.png")
    assert result.annotations.iloc[0][["class_name", "x1", "y1", "x2", "y2"]].tolist() == ["crack", 5, 5, 9, 9]


def test_severstal_rle_decodes_to_boxes(tmp_path):
    source, mask = make_severstal(tmp_path)
    result = ingest_source(source)
    images = by_name(result)
    assert images.loc["s1.jpg", "is_normal"] == False and images.loc["s2.jpg", "is_normal"] == True  # noqa: E712
    boxes = result.annotations
    assert set(boxes.class_name) == {"scratches"}
    assert sorted(map(tuple, boxes[["x1", "y1", "x2", "y2"]].to_numpy().tolist())) == [(5, 2, 12, 6), (30, 10, 40, 15)]
    bad = " | ".join(reasons(result, "quarantined"))
    assert "invalid run-length encoding" in bad and "missing image 'missing.jpg'" in bad


def test_rle_is_column_major_and_one_indexed():
    mask = decode_rle("1 2 6 1", height=3, width=2)  # pixels 1,2 (col 0 rows 0-1) and 6 (col 1 row 2)
    assert mask.tolist() == [[1, 0], [1, 0], [0, 1]]
    with pytest.raises(ValueError):
        decode_rle("5 10", height=3, width=2)


def test_missing_root_names_source_and_root(tmp_path):
    source = SourceConfig(name="gone", format="voc", root=str(tmp_path / "nowhere"), category="x")
    with pytest.raises(FileNotFoundError, match="source 'gone'.*nowhere"):
        ingest_source(source)
    remote = SourceConfig(name="bucket", format="image_folder", root="s3://plant/line1", category="x")
    with pytest.raises(FileNotFoundError, match="source 'bucket'.*is a URL.*mount"):
        ingest_source(remote)


def test_mask_folder_dagm_label_subdir_and_normal_conventions(tmp_path):
    from sources_fixtures import write_mask

    for number, cls in enumerate(("Class1", "Class2")):
        write_image(tmp_path / cls / "Train" / "0001.PNG", size=(16, 16), seed=2 * number, mode="L", fmt="PNG")
        write_image(tmp_path / cls / "Train" / "0002.PNG", size=(16, 16), seed=2 * number + 1, mode="L", fmt="PNG")
        write_mask(tmp_path / cls / "Train" / "Label" / "0002_label.PNG", (16, 16), [(3, 3, 6, 6)])
    source = SourceConfig(name="dagm", format="mask_folder", root=str(tmp_path), category_from="subfolder",
                          options={"mask_subdir": "Label", "mask_suffix": "_label", "mask_ext": ".PNG",
                                   "defect_class": "defect", "missing_mask_is_normal": True})
    result = ingest_source(source)
    images = result.images
    assert len(images) == 4 and set(images.category) == {"Class1", "Class2"}
    assert images.set_index(images.path.str[-8:]).is_normal.to_dict() == {"0001.PNG": True, "0002.PNG": False}
    assert len(result.annotations) == 2 and result.quarantine.empty


def test_mask_folder_empty_mask_is_normal_option(tmp_path):
    source = make_masks(tmp_path)
    source.options["empty_mask_is_normal"] = True
    images = by_name(ingest_source(source))
    assert images.loc["c2.jpg", "is_normal"] == True  # noqa: E712


def test_boxes_from_mask_components_with_offsets_and_min_area():
    import numpy as np

    from agssp_pipeline.sources.regions import boxes_from_mask

    mask = np.zeros((20, 30), dtype=np.uint8)
    assert boxes_from_mask(mask) == []
    mask[5:8, 10:14] = 1  # 12 px
    mask[15, 25] = 1  # 1 px speck
    mask[8, 14] = 1  # touches the first block diagonally: same 8-connected component
    assert sorted(boxes_from_mask(mask)) == [(10.0, 5.0, 15.0, 9.0), (25.0, 15.0, 26.0, 16.0)]
    assert boxes_from_mask(mask, min_area=5) == [(10.0, 5.0, 15.0, 9.0)]
