"""Tiny synthetic YOLO datasets for detector tests (dark/bright rectangles on noise, 64 px)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


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
