"""`agssp init` on fixture folders of every layout: the recognised format, and a config that loads and validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sources_fixtures import (
    make_coco,
    make_masks,
    make_severstal,
    make_voc,
    make_yolo,
    write_image,
    write_mask,
)

from agssp_pipeline.cli import main
from agssp_pipeline.config import load_config
from agssp_pipeline.init_config import write_init_config
from agssp_pipeline.sources.detect import FORMAT_CLAIMS, recognise
from agssp_pipeline.sources.formats import FORMAT_ADAPTERS, check_options


def _labelme(root: Path) -> None:
    write_image(root / "a.jpg", seed=1)
    shapes = [{"label": "s", "points": [[1, 1], [9, 1], [9, 9]], "shape_type": "polygon"}]
    (root / "a.json").write_text(json.dumps({"shapes": shapes, "imagePath": "a.jpg"}))


def _yolo_seg(root: Path) -> None:
    write_image(root / "images" / "train" / "a.jpg", seed=1)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")


def _class_folders(root: Path) -> None:
    write_image(root / "train" / "ok_front" / "1.jpg", seed=1)
    write_image(root / "train" / "def_front" / "2.jpg", seed=2)


def _csv(root: Path) -> None:
    write_image(root / "a.jpg", seed=1)
    (root / "labels.csv").write_text("file,label\na.jpg,ok\n")


def _instances(root: Path) -> None:
    write_image(root / "images" / "a.png", seed=1, fmt="PNG")
    write_mask(root / "masks" / "a_0.png", (32, 24), [(1, 1, 4, 4)])
    write_mask(root / "masks" / "a_1.png", (32, 24), [(8, 8, 12, 12)])


def _pixel_boxes(root: Path) -> None:
    write_image(root / "a.jpg", seed=1)
    (root / "a.txt").write_text("1 2 10 12 dent\n")


def _split_folders(root: Path) -> None:
    for split in ("train", "test"):
        write_image(root / split / "images" / "a.jpg", seed=1 if split == "train" else 2)
        write_mask(root / split / "masks" / "a.png", (32, 24), [(1, 1, 4, 4)])


def _plain(root: Path) -> None:
    write_image(root / "frame_001.jpg", seed=1)


LAYOUTS = {
    "voc": make_voc, "yolo": make_yolo, "coco": make_coco, "mask_folder": make_masks,
    "severstal_rle": make_severstal, "image_folder": _plain, "yolo_seg": _yolo_seg, "labelme": _labelme,
    "class_folders": _class_folders, "image_labels_csv": _csv, "instance_masks": _instances,
    "pixel_boxes": _pixel_boxes, "split_folders": _split_folders,
}


def test_every_format_has_a_fixture_here_and_a_claim():
    assert set(LAYOUTS) == set(FORMAT_ADAPTERS) == set(FORMAT_CLAIMS)


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_each_layout_is_recognised(tmp_path, fmt):
    LAYOUTS[fmt](tmp_path / fmt)
    claim = recognise(tmp_path / fmt)
    assert claim is not None and claim.format == fmt


def test_init_writes_a_config_that_loads_validates_and_flags_guesses(tmp_path, capsys):
    folders = []
    for fmt, build in LAYOUTS.items():
        build(tmp_path / "data" / fmt.replace("_", " "))  # folder names with spaces -> slugs
        folders.append(str(tmp_path / "data" / fmt.replace("_", " ")))
    out = tmp_path / "agssp.yaml"
    assert main(["init", *folders, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    config = load_config(out)
    assert [s.format for s in config.sources] == list(LAYOUTS)
    for source in config.sources:
        check_options(source)
    roles = {s.format: s.role for s in config.sources}
    assert roles["voc"] == "downstream" and roles["image_folder"] == "pretrain" and roles["class_folders"] == "pretrain"
    text = out.read_text()
    assert text.count("CONFIRM") >= 2 * len(LAYOUTS) and "production-sized" in text
    assert config.finetune.epochs >= 50 and config.finetune.image_size % 32 == 0 and config.finetune.image_size >= 320
    assert config.sources[0].root == str((tmp_path / "data" / "voc").resolve())
    assert main(["validate", "--config", str(out)]) == 0


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    _plain(tmp_path / "frames")
    out = tmp_path / "agssp.yaml"
    out.write_text("# mine\n")
    assert main(["init", str(tmp_path / "frames"), "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err and out.read_text() == "# mine\n"
    assert main(["init", str(tmp_path / "frames"), "--out", str(out), "--force"]) == 0
    assert load_config(out).sources[0].format == "image_folder"


def test_init_names_a_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        write_init_config([tmp_path / "empty"], tmp_path / "a.yaml")
    with pytest.raises(ValueError, match="not a folder"):
        write_init_config([tmp_path / "missing"], tmp_path / "a.yaml")
    assert not (tmp_path / "a.yaml").exists()
