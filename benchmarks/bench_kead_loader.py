"""CPU side of the map runner: decode + squash resize + normalise, in DataLoader workers.

A GPU reaches its KeAD throughput only if the loader keeps up with it. This measures the runner's own
dataset and collate (``kead.runner``) at the three CLIP input sizes (240, 336, 378) with 0, 1 and 2
workers, on two corpora: magnetic-tile JPEGs (small, ~200-400 px; only when ``../shared/data`` is there)
and generated 1600x1200 JPEGs (the size of a typical plant line camera frame). The per-worker rate times
the cores of a GPU machine is what its CPU can feed.

    .venv/bin/python benchmarks/bench_kead_loader.py [--images 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agssp_pipeline.kead.clip_encoder import squash_preprocess  # noqa: E402
from agssp_pipeline.kead.runner import _collate, _ImageDataset  # noqa: E402

SIDES = (240, 336, 378)
WORKERS = (0, 1, 2)
OPENAI_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
OPENAI_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
MAGNETIC_TILE = REPO.parent / "shared" / "data" / "magnetic_tile"


class Preprocess:
    """Picklable for worker processes."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return squash_preprocess(image, self.side, OPENAI_MEAN, OPENAI_STD)


def magnetic_tile_paths(limit: int) -> list[str]:
    if not MAGNETIC_TILE.exists():
        return []
    paths = sorted(str(p) for p in MAGNETIC_TILE.rglob("*.jpg"))
    return paths[:: max(1, len(paths) // limit)][:limit]


def camera_frames(folder: Path, count: int) -> list[str]:
    """Textured 1600x1200 JPEGs (quality 90), written once into ``folder``."""
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 255, (150, 200), dtype=np.uint8), (1600, 1200), interpolation=cv2.INTER_CUBIC)
    paths = []
    for number in range(count):
        noise = rng.normal(0, 12, base.shape)
        frame = np.clip(base.astype(np.float32) + noise, 0, 255).astype(np.uint8)
        path = folder / f"frame_{number:04d}.jpg"
        cv2.imwrite(str(path), cv2.merge([frame, frame, frame]), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(path))
    return paths


def loader_rate(paths: list[str], side: int, workers: int, repeats: int, batch_size: int = 16) -> float:
    rows = pd.DataFrame({"image_id": [f"i{n}" for n in range(len(paths))], "path": paths})
    dataset = _ImageDataset(rows, Preprocess(side), side)
    rates = []
    for _ in range(repeats):
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
        start = time.perf_counter()
        seen = sum(int(np.sum(batch["ok"])) for batch in loader)
        rates.append(seen / (time.perf_counter() - start))
        assert seen == len(paths), f"{len(paths) - seen} images failed to load"
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a worker; the main process only collates
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {"camera 1600x1200 jpg": camera_frames(Path(tmp), args.images)}
        tiles = magnetic_tile_paths(args.images)
        if tiles:
            corpora = {"magnetic tile jpg": tiles, **corpora}
        else:
            print(f"(magnetic tile corpus skipped: {MAGNETIC_TILE} not found)")
        print(f"{'corpus':<22} {'side':>5} " + " ".join(f"{f'{w} workers img/s':>16}" for w in WORKERS))
        for name, paths in corpora.items():
            for side in SIDES:
                rates = [loader_rate(paths, side, workers, args.repeats) for workers in WORKERS]
                print(f"{name:<22} {side:>5} " + " ".join(f"{r:>16.0f}" for r in rates), flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"({args.images} images per corpus, median of {args.repeats} passes, batch 16, {os.cpu_count()} cores, "
          f"load avg {load:.1f}; 0 workers = decoding in the main process)")


if __name__ == "__main__":
    main()
