"""A bad-input corpus per annotation format: every bad file or line gets a row naming it, nothing crashes,
and nothing is fabricated (no doubled boxes, no mask taken from the image itself, no basename match
for a path that leaves the images folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sources_fixtures import rle_encode, write_image, write_mask

from agssp_pipeline.config import SourceConfig
from agssp_pipeline.sources import ingest_source


def _reasons(result, name: str) -> list[str]:
    rows = result.quarantine[result.quarantine["path"].str.endswith(name)]
    return rows["reason"].tolist()


def _boxes_of(result, image_name: str) -> int:
    ids = result.images.loc[result.images["path"].str.endswith(image_name), "image_id"]
    return int(result.annotations["image_id"].isin(ids).sum())


def test_severstal_bad_lines_cost_one_line_each(tmp_path):
    size = (48, 16)
    for index in range(1, 5):
        write_image(tmp_path / "train_images" / f"s{index}.jpg", size=size, seed=40 + index)
    mask = np.zeros((16, 48), dtype=np.uint8)
    mask[2:6, 5:12] = 1
    good = rle_encode(mask)
    rows = [
        "ImageId,ClassId,EncodedPixels",
        f"s1.jpg,1,{good}",
        f"s1.jpg,1,{good}",                      # the same row twice: read once
        "s2.jpg,2,99999999999999999999999 3",     # a number no image can hold
        's3.jpg,1,"1 3',                          # unterminated quote: this line only
        f"s4.jpg,1,{good}",                       # still labelled after the bad lines
        "s4.jpg,1",                               # too few fields
    ]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    source = SourceConfig(name="sev", format="severstal_rle", root=str(tmp_path), category="strip")
    result = ingest_source(source)
    assert len(result.images) == 4
    reasons = " | ".join(_reasons(result, "train.csv"))
    assert "line 3: repeats line 2" in reasons
    assert "line 5:" in reasons and "line 7:" in reasons
    assert _boxes_of(result, "s1.jpg") == _boxes_of(result, "s4.jpg") == 1
    assert "too large" in " ".join(result.quarantine["reason"])
    labelled = result.images.set_index(result.images["path"].str.rsplit("/", n=1).str[-1])["is_normal"]
    assert labelled["s4.jpg"] == False and labelled["s3.jpg"] == True  # noqa: E712 (s3's only line was bad)


def test_yolo_non_finite_class_is_a_row_naming_file_and_line(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", size=(40, 40), seed=1)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\nnan 0.5 0.5 0.1 0.1\ninf 0.1 0.1 0.1 0.1\n"
                                               "0 0.5 inf 0.1 0.1\n")
    source = SourceConfig(name="y", format="yolo", root=str(tmp_path), category="strip", classes=["scratch"])
    result = ingest_source(source)
    reasons = _reasons(result, "a.txt")
    assert [r.split(":")[0] for r in reasons] == ["line 2", "line 3", "line 4"]
    assert all("non-finite" in r for r in reasons)
    assert _boxes_of(result, "a.jpg") == 1


def test_coco_malformed_entries_duplicate_ids_and_escaping_paths(tmp_path):
    for name in ("p.jpg", "q.jpg", "x.jpg"):
        write_image(tmp_path / "images" / name, size=(64, 48), seed=len(name) + ord(name[0]))
    data = {
        "images": [{"id": 1, "file_name": "p.jpg"}, {"id": 2, "file_name": "q.jpg"},
                   {"id": 2, "file_name": "p.jpg"}, {"id": 4, "file_name": "../x.jpg"}, "not an image"],
        "categories": [{"id": 5, "name": "scratch"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 10, 10]},
                        {"id": 2, "image_id": 2, "category_id": 5, "bbox": [1, 1, 10, 10]},
                        {"id": 3, "image_id": 4, "category_id": 5, "bbox": [1, 1, 10, 10]},
                        7, None],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text(json.dumps(data))
    source = SourceConfig(name="c", format="coco", root=str(tmp_path), category="billet")
    result = ingest_source(source)
    reasons = " | ".join(_reasons(result, "train.json"))
    assert "image id 2 is used twice" in reasons
    assert "image entry 5" in reasons
    assert "annotation 4 is not an object" in reasons and "annotation 5 is not an object" in reasons
    assert "missing image '../x.jpg'" in reasons
    assert _boxes_of(result, "p.jpg") == 1  # its own box, not the box of the duplicated id
    assert _boxes_of(result, "q.jpg") == 0 and _boxes_of(result, "x.jpg") == 0
    assert len(result.images) == 3


def test_coco_that_is_not_coco_says_what_was_expected(tmp_path):
    write_image(tmp_path / "images" / "p.jpg", seed=1)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "labels.json").write_text(json.dumps({"images": [{"name": "p.jpg"}], "shapes": []}))
    result = ingest_source(SourceConfig(name="c", format="coco", root=str(tmp_path), category="billet"))
    (reason,) = _reasons(result, "labels.json")
    assert "'file_name'" in reason and "annotations" in reason


def test_lone_png_is_never_its_own_mask(tmp_path):
    size = (40, 30)
    write_image(tmp_path / "Crack" / "c1.jpg", size=size, seed=1, mode="L")
    write_mask(tmp_path / "Crack" / "c1.png", size, [(2, 2, 8, 6)])
    write_mask(tmp_path / "Crack" / "leftover.png", size, [(1, 1, 30, 20), (32, 22, 38, 28)])  # image gone
    write_image(tmp_path / "Plain" / "p1.png", size=size, seed=2, mode="L")  # a folder of PNG images
    source = SourceConfig(name="m", format="mask_folder", root=str(tmp_path), category="tile")
    result = ingest_source(source)
    names = {p.rsplit("/", 1)[-1] for p in result.images["path"]}
    assert names == {"c1.jpg", "p1.png"}
    assert "mask without its image" in _reasons(result, "leftover.png")[0]
    assert result.images.loc[result.images["path"].str.endswith("p1.png"), "mask_path"].isna().all()
    assert _boxes_of(result, "p1.png") == 0 and _boxes_of(result, "c1.jpg") == 1
    # with a mask suffix, a mask whose image was deleted gets a row too
    suffixed = tmp_path / "suffixed"
    write_image(suffixed / "d1.jpg", size=size, seed=3, mode="L")
    write_mask(suffixed / "d1_mask.png", size, [(2, 2, 8, 6)])
    write_mask(suffixed / "gone_mask.png", size, [(2, 2, 8, 6)])
    result = ingest_source(SourceConfig(name="s", format="mask_folder", root=str(suffixed), category="tile",
                                        options={"mask_suffix": "_mask"}))
    assert len(result.images) == 1 and "no image 'gone.*'" in _reasons(result, "gone_mask.png")[0]


def test_unsupported_image_formats_get_a_row(tmp_path):
    write_image(tmp_path / "ok.jpg", seed=1)
    write_image(tmp_path / "anim.gif", seed=2, fmt="GIF")
    (tmp_path / "photo.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (tmp_path / "notes.txt").write_text("not an image, not reported")
    result = ingest_source(SourceConfig(name="p", kind="plant", format="image_folder", root=str(tmp_path),
                                        category="steel"))
    assert len(result.images) == 1
    assert "unsupported image format '.gif'" in _reasons(result, "anim.gif")[0]
    assert "'.heic'" in _reasons(result, "photo.HEIC")[0]
    assert _reasons(result, "notes.txt") == []
    assert set(Path(p).name for p in result.quarantine["path"]) == {"anim.gif", "photo.HEIC"}


def test_symlinks_leaving_the_source_root_are_quarantined_unless_allowed(tmp_path):
    outside = write_image(tmp_path / "elsewhere" / "secret.jpg", seed=3)
    root = tmp_path / "line"
    write_image(root / "own.jpg", seed=4)
    (root / "link_out.jpg").symlink_to(outside)
    (root / "link_in.jpg").symlink_to(root / "own.jpg")
    source = SourceConfig(name="p", kind="plant", format="image_folder", root=str(root), category="steel")
    result = ingest_source(source)
    names = {Path(p).name for p in result.images["path"]}
    assert "link_out.jpg" not in names and {"own.jpg", "link_in.jpg"} <= names
    (reason,) = _reasons(result, "link_out.jpg")
    assert "leaves the source root" in reason and "follow_external_symlinks" in reason
    allowed = ingest_source(source.model_copy(update={"options": {"follow_external_symlinks": True}}))
    assert "link_out.jpg" in {Path(p).name for p in allowed.images["path"]}
