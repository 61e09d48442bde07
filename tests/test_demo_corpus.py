"""The synthetic demo corpus: deterministic, native layouts, exact ground truth, visible defects."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from agssp_pipeline.config import load_config
from agssp_pipeline.demo import (
    DEMO_SOURCES,
    DemoCorpusConflict,
    find_ground_truth,
    generate_demo,
    ground_truth,
    ground_truth_images,
    image_id_of,
    read_instance_mask,
)
from agssp_pipeline.demo.__main__ import main as demo_main
from agssp_pipeline.demo.defects import DEFECTS, plant_defect
from agssp_pipeline.demo.inspect import contact_sheet, defect_contrast, local_contrast, read_grey
from agssp_pipeline.demo.textures import TEXTURES, make_texture

SMALL = 0.25  # a quarter-size corpus keeps the byte-comparison tests fast


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(demo_corpus):
    return demo_corpus


def test_same_seed_same_bytes_and_other_files_untouched(tmp_path):
    first = generate_demo(tmp_path / "a", seed=3, scale=SMALL)
    second = generate_demo(tmp_path / "b", seed=3, scale=SMALL)
    digest_a, digest_b = _tree_digest(first.root), _tree_digest(second.root)
    assert digest_a == digest_b
    assert any(name.endswith(".jpg") for name in digest_a) and any(name.endswith(".png") for name in digest_a)

    # regenerating in place: identical bytes, untouched mtimes, foreign files and pipeline outputs left alone
    foreign = first.root / "sources" / "demo_plant_line1" / "operator_notes.txt"
    foreign.write_text("keep me")
    (first.storage_root / "index").mkdir(parents=True)
    (first.storage_root / "index" / "demo_plant_line1.parquet").write_bytes(b"pipeline output")
    some_image = next((first.root / "sources" / "demo_rolled_voc" / "IMAGES").glob("*.jpg"))
    mtime = some_image.stat().st_mtime_ns
    again = generate_demo(first.root, seed=3, scale=SMALL)
    assert _tree_digest(again.root) == {**digest_a, **_tree_digest(first.root)}
    assert foreign.read_text() == "keep me"
    assert (first.storage_root / "index" / "demo_plant_line1.parquet").read_bytes() == b"pipeline output"
    assert some_image.stat().st_mtime_ns == mtime


def test_different_seed_different_images(tmp_path):
    a = generate_demo(tmp_path / "a", seed=0, scale=SMALL)
    b = generate_demo(tmp_path / "b", seed=1, scale=SMALL)
    images_a = {k: v for k, v in _tree_digest(a.root / "sources").items() if k.endswith((".jpg", ".png"))}
    images_b = {k: v for k, v in _tree_digest(b.root / "sources").items() if k.endswith((".jpg", ".png"))}
    shared = set(images_a) & set(images_b)
    assert shared
    differing = sum(images_a[k] != images_b[k] for k in shared)
    assert differing >= 0.9 * len(shared)


def test_regenerating_smaller_corpus_in_place_is_refused(tmp_path):
    generate_demo(tmp_path, seed=0, scale=SMALL)
    with pytest.raises(DemoCorpusConflict, match="without ground truth"):
        generate_demo(tmp_path, seed=0, scale=SMALL / 2)
    # another seed at the same scale replaces every file: allowed, and ground truth follows
    corpus = generate_demo(tmp_path, seed=5, scale=SMALL)
    images = ground_truth_images(tmp_path, "demo_downstream")
    assert all(
        image_id_of(Path(path).read_bytes()) == id_
        for path, id_ in zip(images["path"], images["image_id"], strict=True)
    )
    assert corpus.seed == 5


def test_tiny_corpus_still_has_the_out_of_bounds_voc_box(tmp_path):
    # seed 8: none of the 4 regular frames has a defect on the border, so frames are added until one does
    corpus = generate_demo(tmp_path, seed=8, scale=0.05)
    assert corpus.images["demo_rolled_voc"] > 4
    overshooting = 0
    for xml_path in (corpus.source_roots["demo_rolled_voc"] / "ANNOTATIONS").glob("*.xml"):
        for box in ET.parse(xml_path).getroot().iter("bndbox"):
            xmin, ymin, xmax, ymax = (int(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            overshooting += min(xmin, ymin) < 0 or xmax > 160 or ymax > 160
    assert overshooting == 1


def test_scale_changes_image_count(tmp_path):
    small = generate_demo(tmp_path / "s", seed=0, scale=SMALL)
    assert all(small.images[name] < 30 for name in small.sources)
    with pytest.raises(ValueError, match="scale"):
        generate_demo(tmp_path / "bad", seed=0, scale=0)


def test_config_validates_and_points_at_sources(corpus):
    config = load_config(corpus.config_path)
    assert Path(config.storage_root) == corpus.storage_root
    assert config.source_names == corpus.sources == [s.name for s in DEMO_SOURCES]
    by_name = {s.name: s for s in config.sources}
    assert by_name["demo_plant_line1"].kind == "plant"
    assert by_name["demo_plant_line1"].format == "image_folder"
    assert by_name["demo_plant_line1"].category == "brushed_steel"
    assert by_name["demo_rolled_voc"].format == "voc"
    assert by_name["demo_billet_masks"].format == "mask_folder"
    assert by_name["demo_downstream"].format == "yolo"
    assert [s.name for s in config.downstream_sources()] == ["demo_downstream"]
    assert "demo_downstream" not in [s.name for s in config.pretrain_sources()]
    for source in config.sources:
        assert Path(source.root) == corpus.source_roots[source.name]
        assert Path(source.root).is_dir()
        for normal in source.normal_subfolders:
            assert (Path(source.root) / normal).is_dir()
    assert config.kead.encoder == "cnn_fewshot" and config.kead.k_shot == 4
    # relative paths: the config survives moving the corpus folder
    raw = yaml.safe_load(corpus.config_path.read_text())
    assert not Path(raw["storage_root"]).is_absolute()
    assert all(not Path(s["root"]).is_absolute() for s in raw["sources"])
    assert "synthetic" in (corpus.root / "README.txt").read_text().lower()


def test_ground_truth_is_outside_every_source_root(corpus):
    for source_root in corpus.source_roots.values():
        assert not corpus.ground_truth_dir.resolve().is_relative_to(source_root.resolve())
    plant_files = {p.suffix for p in corpus.source_roots["demo_plant_line1"].rglob("*") if p.is_file()}
    assert plant_files <= {".jpg", ".png"}  # no labels of any kind next to the plant images


@pytest.mark.parametrize("source", [s.name for s in DEMO_SOURCES])
def test_boxes_match_masks_and_files(corpus, source):
    images = ground_truth_images(corpus.root, source)
    boxes = ground_truth(corpus.root, source)
    assert len(images) == corpus.images[source] and len(boxes) == corpus.defects[source]
    assert 0 < corpus.normal_images[source] < len(images)
    assert len(boxes) >= 20
    for row in images.itertuples():
        data = Path(row.path).read_bytes()
        assert image_id_of(data) == row.image_id
        with Image.open(row.path) as image:
            assert image.size == (row.width, row.height)
        labels = read_instance_mask(row.mask_path)
        assert labels.shape == (row.height, row.width)
        own = boxes[boxes["file"] == (row.duplicate_of_file or row.file)]
        assert len(own) == row.n_defects
        assert row.is_normal == (row.n_defects == 0)
        assert set(np.unique(labels)) - {0} == set(own["instance"])
        for box in own.itertuples():
            instance = labels == box.instance
            assert instance.sum() == box.mask_area > 0
            assert 0 <= box.x1 < box.x2 <= row.width and 0 <= box.y1 < box.y2 <= row.height
            x, y, w, h = cv2.boundingRect(instance.astype(np.uint8))
            assert (box.x1, box.y1, box.x2, box.y2) == (x, y, x + w, y + h)


def test_defects_visible_but_not_trivial(corpus):
    stats = pd.concat([defect_contrast(corpus.root, source) for source in corpus.sources])
    assert len(stats) > 200 and set(stats["defect_type"]) == set(DEFECTS)
    # visible: almost every defect stands out from its own neighbourhood ...
    assert (stats["contrast"] > 0.5).mean() > 0.9
    # ... but as a rule not a black-on-white blob (NEU-DET-like: a few background standard deviations)
    for defect_type, group in stats.groupby("defect_type"):
        assert 1.0 < group["contrast"].median() < 6.0, defect_type
    assert stats["saturated"].max() < 0.05
    for source in corpus.sources:
        for path in ground_truth_images(corpus.root, source)["path"]:
            grey = read_grey(path)
            assert ((grey == 0) | (grey == 255)).mean() < 0.01


def test_local_contrast_measures_what_it_says():
    rng = np.random.default_rng(0)
    grey = np.clip(rng.normal(120, 10, (64, 64)), 0, 255).astype(np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[30:34, 30:34] = True
    assert local_contrast(grey, mask) < 1.0
    grey[mask] = 80
    assert 3.0 < local_contrast(grey, mask) < 6.0


def test_contact_sheet_and_command_line(corpus, tmp_path, capsys):
    sheet = contact_sheet(corpus.root, "demo_rolled_voc", limit=8, columns=4, tile=96)
    assert sheet.shape == (192, 384, 3)
    red = (sheet[:, :, 2] == 255) & (sheet[:, :, 0] == 0) & (sheet[:, :, 1] == 0)
    assert red.sum() > 20  # outlines of the planted defects
    assert demo_main([str(tmp_path / "cli"), "--scale", "0.25", "--preview"]) == 0
    printed = capsys.readouterr().out
    assert "demo_plant_line1" in printed and "contrast" in printed
    assert (tmp_path / "cli" / "ground_truth" / "previews" / "demo_downstream.png").is_file()


def test_backgrounds_have_texture(corpus):
    for source in corpus.sources:
        normal = ground_truth_images(corpus.root, source).query("is_normal")
        for row in normal.head(3).itertuples():
            grey = read_grey(row.path).astype(np.float32)
            assert 4.0 < grey.std() < 40.0
            assert 40 < grey.mean() < 210


def test_plant_folder_has_bad_and_unusual_files(corpus):
    root = corpus.source_roots["demo_plant_line1"]
    bad = {Path(name).name: root / name for name in corpus.bad_files["demo_plant_line1"]}
    assert len(bad) == 3
    zero = next(p for n, p in bad.items() if "zero" in n)
    assert zero.suffix == ".jpg" and zero.stat().st_size == 0
    truncated = next(p for n, p in bad.items() if "truncated" in n)
    assert cv2.imread(str(truncated)) is None or not truncated.read_bytes().endswith(b"\xff\xd9")
    text = next(p for n, p in bad.items() if p.suffix == ".png")
    assert cv2.imread(str(text)) is None
    with Image.open(next(root.rglob("*_cmyk.jpg"))) as cmyk:
        assert cmyk.mode == "CMYK"
    sixteen = cv2.imread(str(next(root.rglob("*_16bit.png"))), cv2.IMREAD_UNCHANGED)
    assert sixteen.dtype == np.uint16
    images = ground_truth_images(corpus.root, "demo_plant_line1")
    duplicates = images.dropna(subset=["duplicate_of_file"])
    assert len(duplicates) == 1
    original = images[images["file"] == duplicates.iloc[0]["duplicate_of_file"]].iloc[0]
    assert original["image_id"] == duplicates.iloc[0]["image_id"]
    assert len({p.parent.name for p in root.rglob("*.jpg")}) == 2
    manifest = json.loads((corpus.ground_truth_dir / "manifest.json").read_text())
    assert {b["file"] for b in manifest["sources"]["demo_plant_line1"]["bad_files"]} == set(
        corpus.bad_files["demo_plant_line1"]
    )


def test_voc_layout_with_missing_image_and_out_of_bounds_box(corpus):
    root = corpus.source_roots["demo_rolled_voc"]
    boxes = ground_truth(corpus.root, "demo_rolled_voc")
    out_of_bounds, missing = 0, 0
    for xml_path in sorted((root / "ANNOTATIONS").glob("*.xml")):
        tree = ET.parse(xml_path).getroot()
        filename = tree.findtext("filename")
        image_path = root / "IMAGES" / filename
        if not image_path.exists():
            missing += 1
            continue
        width, height = int(tree.findtext("size/width")), int(tree.findtext("size/height"))
        objects = tree.findall("object")
        truth = boxes[boxes["file"] == f"IMAGES/{filename}"].sort_values("instance")
        assert len(objects) == len(truth)
        for obj, box in zip(objects, truth.itertuples(), strict=True):
            assert obj.findtext("name") == box.class_name
            xmin, ymin, xmax, ymax = (
                int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")
            )
            if min(xmin, ymin) < 0 or xmax > width or ymax > height:
                out_of_bounds += 1
            clipped = (max(xmin, 0), max(ymin, 0), min(xmax, width), min(ymax, height))
            assert clipped == (box.x1, box.y1, box.x2, box.y2)
    assert missing == 1 and out_of_bounds == 1
    assert set(boxes["class_name"]) == {"scratch", "pit", "inclusion", "patch"}


def test_mask_folder_layout(corpus):
    root = corpus.source_roots["demo_billet_masks"]
    config = load_config(corpus.config_path).source("demo_billet_masks")
    normals = list((root / config.normal_subfolders[0]).rglob("*.jpg"))
    assert len(normals) >= 8
    images = ground_truth_images(corpus.root, "demo_billet_masks")
    for row in images.itertuples():
        image_path = Path(row.path)
        assert image_path.parent.name == "Imgs"
        mask = cv2.imread(str(image_path.with_suffix(".png")), cv2.IMREAD_GRAYSCALE)
        truth = read_instance_mask(row.mask_path) > 0
        np.testing.assert_array_equal(mask > 127, truth)
        assert row.is_normal == image_path.parents[1].name.startswith("Free")
        with Image.open(image_path) as image:
            assert image.mode == "L"  # single-channel JPEG like the magnetic-tile set


def test_yolo_layout(corpus):
    root = corpus.source_roots["demo_downstream"]
    data = yaml.safe_load((root / "data.yaml").read_text())
    names = data["names"]
    assert len(names) == 3
    from ultralytics.data.utils import check_det_dataset  # the trainer's own reading of data.yaml

    resolved = check_det_dataset(str(root / "data.yaml"))
    assert Path(resolved["train"]) == root / "images" and resolved["names"] == names
    boxes = ground_truth(corpus.root, "demo_downstream")
    for row in ground_truth_images(corpus.root, "demo_downstream").itertuples():
        label = root / "labels" / (Path(row.file).stem + ".txt")
        lines = [line.split() for line in label.read_text().splitlines() if line.strip()]
        truth = boxes[boxes["file"] == row.file].sort_values("instance")
        assert len(lines) == len(truth)
        for (cls, cx, cy, w, h), box in zip(lines, truth.itertuples(), strict=True):
            assert names[int(cls)] == box.class_name
            x1 = (float(cx) - float(w) / 2) * row.width
            y2 = (float(cy) + float(h) / 2) * row.height
            assert abs(x1 - box.x1) < 1e-3 * row.width and abs(y2 - box.y2) < 1e-3 * row.height


def test_find_ground_truth_from_the_config(corpus, tmp_path):
    config = load_config(corpus.config_path)
    plant = config.source("demo_plant_line1")
    found = find_ground_truth(plant.root, plant.name)
    assert found is not None and len(found) == corpus.defects["demo_plant_line1"]
    # real data (any other folder or name) has no hidden ground truth
    assert find_ground_truth(tmp_path / "sources" / "demo_plant_line1", "demo_plant_line1") is None
    assert find_ground_truth(plant.root, "line3_coils") is None
    assert find_ground_truth("s3://bucket/sources/demo_plant_line1", "demo_plant_line1") is None


def test_ground_truth_unknown_source_and_missing_corpus(tmp_path, corpus):
    with pytest.raises(KeyError, match="unknown demo source"):
        ground_truth(corpus.root, "neu_det")
    with pytest.raises(FileNotFoundError, match="generate_demo"):
        ground_truth(tmp_path, "demo_plant_line1")


@pytest.mark.parametrize("texture", sorted(TEXTURES))
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_every_defect_type_plants_on_every_texture(texture, defect):
    rng = np.random.default_rng(7)
    surface = make_texture(texture, rng, 160, 160)
    result = plant_defect(rng, surface, defect, np.zeros(surface.shape, dtype=bool))
    assert result is not None
    changed, planted = result
    assert planted.mask.any() and planted.class_name == defect
    assert np.abs(changed - surface)[planted.mask].mean() > 5.0


def test_ingestion_recovers_planted_ground_truth(corpus):
    """The corpus exercises ingestion as intended: bad files quarantined, labels equal to ground truth."""
    from agssp_pipeline.sources import ingest_source

    config = load_config(corpus.config_path)
    results = {source.name: ingest_source(source, workers=1) for source in config.sources}

    plant = results["demo_plant_line1"]
    quarantined = set(plant.quarantine.loc[plant.quarantine["action"] == "quarantined", "path"])
    root = corpus.source_roots["demo_plant_line1"]
    assert {str(root / name) for name in corpus.bad_files["demo_plant_line1"]} <= quarantined
    assert len(plant.images) == corpus.images["demo_plant_line1"]
    assert plant.images["duplicate_of"].notna().sum() == 1
    assert len(plant.annotations) == 0  # plant data is unlabelled: ground truth stays hidden

    for name in ("demo_rolled_voc", "demo_billet_masks", "demo_downstream"):
        truth = ground_truth(corpus.root, name).sort_values(["image_id", "x1", "y1"]).reset_index(drop=True)
        found = results[name].annotations.sort_values(["image_id", "x1", "y1"]).reset_index(drop=True)
        assert len(found) == len(truth), name
        assert list(found["image_id"]) == list(truth["image_id"])
        assert list(found["class_name"]) == list(truth["class_name"])
        coords = ["x1", "y1", "x2", "y2"]
        np.testing.assert_allclose(found[coords].to_numpy(float), truth[coords].to_numpy(float), atol=0.01)
        images = results[name].images.set_index("image_id")
        normal = ground_truth_images(corpus.root, name).set_index("image_id")["is_normal"]
        assert (images.loc[normal.index, "is_normal"].astype(bool) == normal).all()
    voc_quarantine = results["demo_rolled_voc"].quarantine
    assert (voc_quarantine["action"] == "clipped").sum() == 1
    assert voc_quarantine["reason"].str.contains("missing image").sum() == 1
