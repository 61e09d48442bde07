"""Ingestion throughput on the real NEU-DET folder (and magnetic tile when present).

Usage: .venv/bin/python benchmarks/bench_ingest.py [--repeats 3] [--workers N] [--data ../shared/data]
Prints the median images/s over the repeats for the default thread pool and for one worker, for a
re-ingestion of the unchanged folder with the previous index as probe cache (what a sensor-triggered
run does after a few new files), the counts of the last run, and how long a folder fingerprint (the
sensor's change detector) takes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agssp_pipeline.config import SourceConfig  # noqa: E402
from agssp_pipeline.sources import folder_fingerprint, ingest_source, previous_probe_cache  # noqa: E402
from agssp_pipeline.sources.ingest import default_workers  # noqa: E402
from agssp_pipeline.storage import StorageLayout  # noqa: E402

SOURCES = {
    "neu_det": dict(format="voc", category="rolled_strip"),
    "magnetic_tile": dict(format="mask_folder", category="magnetic_tile", normal_subfolders=["MT_Free"],
                          options={"class_strip_prefix": "MT_"}),
}


def bench(source: SourceConfig, repeats: int, workers: int, layout: StorageLayout | None = None) -> tuple[float, dict]:
    rates, counts = [], {}
    for _ in range(repeats):
        cache = previous_probe_cache(layout, source.name) if layout is not None else None
        start = time.perf_counter()
        result = ingest_source(source, workers=workers, cache=cache)
        elapsed = time.perf_counter() - start
        counts = result.counts()
        rates.append((counts["images"] + counts["quarantined_images"]) / elapsed)
    return statistics.median(rates), counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "neu_det").is_dir():
        print(f"SKIP: NEU-DET not found at {data / 'neu_det'} (benchmark needs ../shared/data)")
        return 0
    for name, fields in SOURCES.items():
        root = data / name
        if not root.is_dir():
            print(f"{name}: not found at {root}, skipped")
            continue
        source = SourceConfig(name=name, root=str(root), **fields)
        pooled, counts = bench(source, args.repeats, args.workers)
        single, _ = bench(source, args.repeats, 1)
        with tempfile.TemporaryDirectory() as store:
            layout = StorageLayout(store)
            ingest_source(source).write(layout, name)
            cached, _ = bench(source, args.repeats, args.workers, layout)
        start = time.perf_counter()
        fingerprint = folder_fingerprint(root)
        fingerprint_ms = (time.perf_counter() - start) * 1000
        print(f"{name}: median {pooled:,.0f} images/s with {args.workers} threads, {single:,.0f} images/s with 1 "
              f"(x{pooled / single:.2f}); unchanged re-ingest with probe cache {cached:,.0f} images/s; "
              f"{args.repeats} repeats")
        print(f"{name}: counts {counts}")
        print(f"{name}: folder_fingerprint {fingerprint} in {fingerprint_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
