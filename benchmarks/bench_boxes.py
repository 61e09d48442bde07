"""Throughput of the boxes stage: Zarr map store -> thresholds -> pseudo boxes -> Parquet.

Synthetic but realistic maps (15x15 for 200x200 images, the NEU-DET geometry of a ViT-B/16-like grid):
smooth low background with 0-3 hot blobs per map. Every timed repeat reads the store, computes the
category thresholds, extracts the boxes of the images judged defective and writes the Parquet table.

Usage: .venv/bin/python benchmarks/bench_boxes.py [--n 20000] [--repeats 5] [--threads 2] [--settings JSON]
Prints the median maps/s over repeats (goal: >= 2,000 maps/s on 2 cores) for the default box method
(``BoxesSettings()`` or ``--settings``), then the extraction alone for every binarisation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from agssp_pipeline import artifact_io
from agssp_pipeline.boxes.extract import BINARISATIONS, BoxParams, extract_boxes
from agssp_pipeline.boxes.pseudo import build_pseudo_boxes
from agssp_pipeline.boxes.settings import BoxesSettings
from agssp_pipeline.boxes.thresholds import compute_category_thresholds, map_statistics, thresholds_for
from agssp_pipeline.kead.store import MapTable, read_map_table, write_map_table


def synthetic_maps(n: int, grid: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 4, 4)).astype(np.float32) * 0.3
    maps = np.stack([cv2.resize(c, (grid, grid), interpolation=cv2.INTER_CUBIC) for c in coarse])
    yy, xx = np.mgrid[0:grid, 0:grid]
    blobs = rng.integers(0, 4, n)
    for i in np.flatnonzero(blobs):
        for _ in range(blobs[i]):
            cy, cx = rng.random(2) * grid
            sigma = 0.6 + rng.random() * 1.5
            maps[i] += (0.4 + 0.5 * rng.random()) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return np.clip(maps, 0, 1).astype(np.float16)


def run_once(store: str, index: pd.DataFrame, settings: BoxesSettings, out: str) -> tuple[float, int]:
    start = time.perf_counter()
    table = read_map_table(store)
    categories = index.set_index("image_id").loc[table.image_id, "category"].to_numpy()
    stats = map_statistics("bench", table.image_id, table.maps, table.image_score, categories)
    thresholds = compute_category_thresholds(stats, settings, {"bench": str(table.attrs.get("version"))})
    boxes = build_pseudo_boxes(
        "bench", table.image_id, table.maps, table.image_score, index, thresholds, settings,
        str(table.attrs.get("version")),
    )
    artifact_io.write_parquet(out, boxes)
    return time.perf_counter() - start, int(boxes["box_index"].notna().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--grid", type=int, default=15)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default="{}", help="JSON overrides of BoxesSettings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    maps = synthetic_maps(args.n, args.grid)
    ids = np.array([f"{i:016x}" for i in range(args.n)])
    scores = maps.reshape(args.n, -1).max(axis=1).astype(np.float32)
    index = pd.DataFrame({"image_id": ids, "category": "steel", "width": args.size, "height": args.size})
    settings = BoxesSettings.model_validate(json.loads(args.settings))
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "maps.zarr" / "bench")
        write_map_table(
            store,
            MapTable(
                image_id=ids, maps=maps, image_score=scores,
                zero_shot_score=np.full(args.n, np.nan, np.float32), attrs={"encoder": "synthetic"},
            ),
        )
        out = str(Path(tmp) / "pseudo_boxes" / "bench.parquet")
        run_once(store, index, settings, out)  # warm-up (imports, allocator)
        timings, n_boxes = [], 0
        for _ in range(args.repeats):
            seconds, n_boxes = run_once(store, index, settings, out)
            timings.append(seconds)

        # the extraction alone, every image a candidate (worst case: no image-level split)
        table = read_map_table(store)
        threshold, _ = thresholds_for(np.full(args.n, "steel"), compute_category_thresholds(
            map_statistics("bench", ids, maps, scores, np.full(args.n, "steel")), settings))
        extract_times: dict[str, list[float]] = {name: [] for name in BINARISATIONS}
        for name in BINARISATIONS:
            params = BoxParams.from_settings(settings.model_copy(update={"binarisation": name}))
            for _ in range(args.repeats):
                start = time.perf_counter()
                extract_boxes(table.maps, np.full(args.n, args.size), np.full(args.n, args.size), threshold, params)
                extract_times[name].append(time.perf_counter() - start)

    median = statistics.median(timings)
    print(f"maps: {args.n} x {args.grid}x{args.grid} -> {args.size}x{args.size} images, threads={args.threads}, "
          f"rules={settings.rules().as_dict()}, boxes written: {n_boxes}")
    print(f"store -> thresholds -> boxes -> parquet: median {median:.3f} s over {args.repeats} repeats "
          f"= {args.n / median:,.0f} maps/s (min {args.n / max(timings):,.0f}, max {args.n / min(timings):,.0f})")
    for name, times in extract_times.items():
        print(f"extraction only, binarisation {name}, every map a candidate: "
              f"median {args.n / statistics.median(times):,.0f} maps/s")

if __name__ == "__main__":
    main()
