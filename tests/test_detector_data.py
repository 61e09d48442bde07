"""Tiny synthetic YOLO datasets for detector tests (dark/bright rectangles on noise, 64 px)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd


def make_yolo_dataset(root: Path, n_train: int = 8, n_val: int = 4, size: int = 64, seed: int = 0,
                      names: tuple[str, ...] = ("dark", "bright")) -> Path:
    """Write images/{train,val} + labels/{train,val} + data.yaml; returns the data.yaml path."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = (rng.random((size, size, 3)) * 60 + 100).astype(np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 3))):
                c = int(rng.integers(0, len(names)))
                x, y = (int(v) for v in rng.integers(2, size // 2, 2))
                w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
                color = (0, 0, 0) if c == 0 else (255, 255, 255)
                cv2.rectangle(image, (x, y), (x + w, y + h), color, -1)
                lines.append(f"{c} {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
            cv2.imwrite(str(root / "images" / split / f"{split}{i:03d}.png"), image)
            (root / "labels" / split / f"{split}{i:03d}.txt").write_text("\n".join(lines) + "\n")
    names_yaml = "".join(f"  {i}: {name}\n" for i, name in enumerate(names))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names_yaml}")
    return data


def test_synthetic_dataset_is_valid_yolo(tmp_path):
    """The fixture other detector tests train on: labels normalised, one file per image."""
    data = make_yolo_dataset(tmp_path, n_train=3, n_val=2)
    labels = sorted((tmp_path / "labels").rglob("*.txt"))
    assert data.is_file() and len(labels) == 5
    for label in labels:
        for line in label.read_text().splitlines():
            cls, *coords = line.split()
            assert cls in {"0", "1"} and all(0.0 < float(v) <= 1.0 for v in coords)


def _draw_image(path: Path, rng: np.random.Generator, size: int, n_boxes: int, n_classes: int):
    """A noisy image with ``n_boxes`` filled rectangles; returns [(class_index, x1, y1, x2, y2)]."""
    image = (rng.random((size, size, 3)) * 60 + 100).astype(np.uint8)
    boxes = []
    for _ in range(n_boxes):
        c = int(rng.integers(0, n_classes))
        x, y = (int(v) for v in rng.integers(2, size // 2, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
        cv2.rectangle(image, (x, y), (x + w, y + h), (0, 0, 0) if c == 0 else (255, 255, 255), -1)
        boxes.append((c, float(x), float(y), float(x + w + 1), float(y + h + 1)))
    cv2.imwrite(str(path), image)
    return boxes


def _index_rows(source: str, paths: list[Path], ids: list[str], size: int, category: str) -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": ids, "path": [str(p) for p in paths], "source": source, "category": category,
        "width": size, "height": size, "channels": 3, "bytes": 1, "mtime": 0.0, "split": None,
        "mask_path": None, "is_normal": None, "duplicate_of": None,
    })


def make_pipeline_storage(root: Path, size: int = 64, n_pretrain: int = 12, n_downstream: int = 16,
                          seed: int = 0, shared_ids: int = 0):
    """Storage with a pretraining source (index + pseudo boxes) and a labelled downstream source (index +
    annotations), plus the config naming them. ``shared_ids`` copies that many pretraining ids into the
    downstream index (to test the overlap guard). Returns the PipelineConfig."""
    from agssp_pipeline.config import parse_config

    rng = np.random.default_rng(seed)
    storage = root / "storage"
    (storage / "index").mkdir(parents=True)
    (storage / "pseudo_boxes").mkdir(parents=True)
    images = root / "images"
    # pretraining source: 2/3 defective with pseudo boxes, 1/3 judged normal
    pre_dir = images / "plant"
    pre_dir.mkdir(parents=True)
    pre_paths, pre_ids, pseudo_rows = [], [], []
    for i in range(n_pretrain):
        path = pre_dir / f"p{i:03d}.png"
        defective = i % 3 != 2
        boxes = _draw_image(path, rng, size, 2 if defective else 0, 1)
        image_id = f"aa{i:014x}"
        pre_paths.append(path)
        pre_ids.append(image_id)
        base = {"source": "plant", "image_id": image_id, "category": "steel", "width": size, "height": size,
                "judged_defective": defective, "image_score": 0.9 if defective else 0.1, "image_cutoff": 0.5,
                "map_max": 0.9, "threshold": 0.5, "map_store_version": "v1"}
        if not boxes:
            pseudo_rows.append({**base, "box_index": None, "x1": np.nan, "y1": np.nan, "x2": np.nan,
                                "y2": np.nan, "score": np.nan, "area": None})
        for k, (_, x1, y1, x2, y2) in enumerate(boxes):
            pseudo_rows.append({**base, "box_index": k, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": 0.8,
                                "area": int((x2 - x1) * (y2 - y1))})
    _index_rows("plant", pre_paths, pre_ids, size, "steel").to_parquet(storage / "index" / "plant.parquet")
    pseudo = pd.DataFrame(pseudo_rows)
    pseudo["box_index"] = pseudo["box_index"].astype("Int64")
    pseudo["area"] = pseudo["area"].astype("Int64")
    pseudo.to_parquet(storage / "pseudo_boxes" / "plant.parquet")
    # downstream source: two classes, GT boxes
    down_dir = images / "labelled"
    down_dir.mkdir(parents=True)
    down_paths, down_ids, annotation_rows = [], [], []
    names = ("dark", "bright")
    for i in range(n_downstream):
        path = down_dir / f"d{i:03d}.png"
        boxes = _draw_image(path, rng, size, int(rng.integers(1, 3)), 2)
        image_id = pre_ids[i] if i < shared_ids else f"bb{i:014x}"
        down_paths.append(path)
        down_ids.append(image_id)
        annotation_rows += [(image_id, str(path), names[c], x1, y1, x2, y2) for c, x1, y1, x2, y2 in boxes]
    _index_rows("labelled", down_paths, down_ids, size, "steel").to_parquet(storage / "index" / "labelled.parquet")
    pd.DataFrame(annotation_rows, columns=["image_id", "path", "class_name", "x1", "y1", "x2", "y2"]).to_parquet(
        storage / "index" / "labelled.annotations.parquet")
    config = {
        "storage_root": str(storage),
        "sources": [
            {"name": "plant", "kind": "plant", "format": "image_folder", "root": str(pre_dir), "category": "steel"},
            {"name": "labelled", "format": "yolo", "root": str(down_dir), "category": "steel",
             "role": "downstream", "classes": list(names)},
        ],
        "detector": {"model": "yolov8n", "backbone": "yolov8n", "epochs": 1, "image_size": size, "batch_size": 4,
                     "device": "cpu", "workers": 0, "val_fraction": 0.25},
        "finetune": {"epochs": 1, "image_size": size, "batch_size": 4, "device": "cpu", "workers": 0,
                     "val_fraction": 0.25},
    }
    return parse_config(config, root, str(root / "agssp.yaml"))


def save_fake_backbone_checkpoint(config, seed: int = 123, shift: float = 0.25) -> str:
    """A backbone checkpoint in the AGBP layout (the real trainer is tested elsewhere), as latest run."""
    import torch

    from agssp_pipeline.training.checkpoint import save_checkpoint, write_latest_pointer
    from agssp_pipeline.training.detector import BACKBONE_PREFIXES, build_detection_model

    torch.manual_seed(seed)
    model = build_detection_model("yolov8n", num_classes=80)
    state = {k: (v + shift if v.is_floating_point() else v) for k, v in model.state_dict().items()
             if k.startswith(BACKBONE_PREFIXES)}
    layout = config.layout()
    run_dir = layout.checkpoints("backbone", "yolov8n", "run-test")
    save_checkpoint(run_dir, state, {"backbone": "yolov8n", "run_id": "run-test", "sources": ["plant"]})
    write_latest_pointer(layout, "yolov8n", "run-test")
    return run_dir
