"""Small on-disk datasets for the ingestion tests (every format, every kind of bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from agssp_pipeline.config import SourceConfig


def write_image(path: Path, size: tuple[int, int] = (32, 24), seed: int = 0, mode: str = "RGB", fmt: str | None = None) -> Path:
    """A random-noise image (distinct bytes per seed) of ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    else:
        bands = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
        shape = (height, width) if bands == 1 else (height, width, bands)
        image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def write_mask(path: Path, size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> Path:
    """A 0/255 PNG mask with one filled rectangle per (x1, y1, x2, y2) box (x2/y2 exclusive)."""
    width, height = size
    mask = np.zeros((height, width), dtype=np.uint8)
    for x1, y1, x2, y2 in boxes:
        mask[y1:y2, x1:x2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def voc_xml(filename: str, objects: list[tuple[str, float, float, float, float]], size=(32, 24)) -> str:
    body = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
        "</bndbox></object>"
        for name, x1, y1, x2, y2 in objects
    )
    return (f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size>{body}</annotation>")


def make_voc(root: Path) -> SourceConfig:
    """IMAGES/ANNOTATIONS + Validation_* like NEU-DET, with every annotation problem once."""
    write_image(root / "IMAGES" / "a.jpg", seed=1)
    write_image(root / "IMAGES" / "b.jpg", seed=2)
    write_image(root / "IMAGES" / "c.jpg", seed=3)
    write_image(root / "IMAGES" / "normal.jpg", seed=4)
    (root / "IMAGES" / "a_copy.jpg").write_bytes((root / "IMAGES" / "a.jpg").read_bytes())
    write_image(root / "Validation_Images" / "v.jpg", seed=5)
    write_image(root / "IMAGES" / "normal.png", seed=6, fmt="PNG")  # same stem as normal.jpg
    ann = root / "ANNOTATIONS"
    ann.mkdir(parents=True)
    (ann / "a.xml").write_text(voc_xml("a.jpg", [("scratch", 2, 3, 10, 12), ("pit", 20, 5, 40, 20)]))  # 2nd clipped
    (ann / "a_copy.xml").write_text(voc_xml("a_copy.jpg", [("scratch", 2, 3, 10, 12)]))
    (ann / "b.xml").write_text(voc_xml("b.jpg", [("scratch", 10, 10, 5, 20), ("dent", 1, 1, 5, 5),  # inverted, unknown
                                                 ("pit", 40, 30, 50, 40)]))  # wholly outside
    (ann / "c.xml").write_text("<annotation><object><name>pit</name>")  # truncated XML
    (ann / "normal.xml").write_text(voc_xml("normal.jpg", []))
    (ann / "ghost.xml").write_text(voc_xml("ghost.jpg", [("pit", 1, 1, 4, 4)]))  # no image
    (root / "Validation_Annotations").mkdir()
    (root / "Validation_Annotations" / "v.xml").write_text(voc_xml("v.jpg", [("pit", 1, 1, 4, 4)]))
    return SourceConfig(name="voc_src", format="voc", root=str(root), category="rolled_strip",
                        classes=["scratch", "pit"])


def make_yolo(root: Path) -> SourceConfig:
    write_image(root / "images" / "train" / "x.jpg", size=(100, 50), seed=11)
    write_image(root / "images" / "val" / "y.jpg", size=(100, 50), seed=12)
    write_image(root / "images" / "train" / "unlabelled.jpg", size=(100, 50), seed=13)
    write_image(root / "images" / "train" / "empty.jpg", size=(100, 50), seed=14)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "x.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.95 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\nbad line\n")
    (root / "labels" / "train" / "empty.txt").write_text("")
    (root / "labels" / "val" / "y.txt").write_text("2 0.1 0.1 0.3 0.1 0.3 0.3\n")  # polygon
    (root / "labels" / "val" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # no image
    (root / "data.yaml").write_text("names: [scratch, pit, inclusion]\n")
    return SourceConfig(name="yolo_src", format="yolo", root=str(root), category="rolled_strip", role="downstream")


def make_coco(root: Path) -> SourceConfig:
    write_image(root / "images" / "p.jpg", size=(64, 48), seed=21)
    write_image(root / "images" / "q.jpg", size=(64, 48), seed=22)
    write_image(root / "images" / "stray.jpg", size=(64, 48), seed=23)
    (root / "annotations").mkdir(parents=True)
    data = {
        "images": [{"id": 1, "file_name": "p.jpg"}, {"id": 2, "file_name": "q.jpg"}, {"id": 3, "file_name": "gone.jpg"}],
        "categories": [{"id": 5, "name": "scratch"}, {"id": 6, "name": "pit"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 5, 20, 10]},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]},
            {"id": 3, "image_id": 3, "category_id": 6, "bbox": [1, 1, 2, 2]},
        ],
    }
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    (root / "annotations" / "instances_broken.json").write_text("{not json")
    return SourceConfig(name="coco_src", format="coco", root=str(root), category="cast_billet")


def make_masks(root: Path) -> SourceConfig:
    """MT_<Class>/Imgs/<name>.jpg + <name>.png (magnetic tile layout)."""
    size = (40, 30)
    write_image(root / "MT_Crack" / "Imgs" / "c1.jpg", size=size, seed=31, mode="L")
    write_mask(root / "MT_Crack" / "Imgs" / "c1.png", size, [(2, 2, 8, 6), (20, 10, 30, 25)])
    write_image(root / "MT_Crack" / "Imgs" / "c2.jpg", size=size, seed=32, mode="L")
    write_mask(root / "MT_Crack" / "Imgs" / "c2.png", size, [])  # empty mask in a defect folder
    write_image(root / "MT_Crack" / "Imgs" / "c3.jpg", size=size, seed=33, mode="L")
    write_mask(root / "MT_Crack" / "Imgs" / "c3.png", (10, 10), [(1, 1, 3, 3)])  # wrong size
    write_image(root / "MT_Free" / "Imgs" / "f1.jpg", size=size, seed=34, mode="L")
    write_mask(root / "MT_Free" / "Imgs" / "f1.png", size, [])
    write_image(root / "MT_Free" / "Imgs" / "f2.jpg", size=size, seed=35, mode="L")
    write_mask(root / "MT_Free" / "Imgs" / "f2.png", size, [])
    return SourceConfig(name="mask_src", format="mask_folder", root=str(root), category="magnetic_tile",
                        normal_subfolders=["MT_Free"], options={"class_strip_prefix": "MT_"})


def rle_encode(mask: np.ndarray) -> str:
    """Column-major, 1-indexed run-length encoding (the Severstal convention)."""
    flat = np.concatenate([[0], mask.T.flatten(), [0]])
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    changes[1::2] -= changes[::2]
    return " ".join(str(v) for v in changes)


def make_severstal(root: Path) -> tuple[SourceConfig, np.ndarray]:
    size = (48, 16)
    write_image(root / "train_images" / "s1.jpg", size=size, seed=41)
    write_image(root / "train_images" / "s2.jpg", size=size, seed=42)
    mask = np.zeros((16, 48), dtype=np.uint8)
    mask[2:6, 5:12] = 1
    mask[10:15, 30:40] = 1
    rows = ["ImageId,ClassId,EncodedPixels", f"s1.jpg,3,{rle_encode(mask)}", "s1.jpg,1,1 5 3", "missing.jpg,2,1 3"]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return SourceConfig(name="sev_src", format="severstal_rle", root=str(root), category="rolled_strip",
                        options={"class_names": {3: "scratches"}}), mask
