"""Throughput and peak memory: KeAD vs WinCLIP mode on the same CLIP encoder and the same images.

Each measurement runs in a fresh child process (same script, ``--child``) so peak memory is its own:
on CPU the peak resident set size during scoring (Linux ``clear_refs`` resets the high-water mark after
the model is loaded; elsewhere ``ru_maxrss``), on CUDA ``torch.cuda.max_memory_allocated``.
Weights are random (seeded): throughput does not depend on them, and no weights are reachable offline.
Timed: ``encoder.score`` on preprocessed batches after one warm-up batch (text embeddings cached);
reported: median images/s over repeats, peak memory, and the KeAD / WinCLIP throughput ratio.

    .venv/bin/python benchmarks/bench_kead.py            # CPU section; GPU section too when CUDA is present
    .venv/bin/python benchmarks/bench_kead.py --quick    # tiny model only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CPU_CASES = [
    # model, images, batch sizes, repeats
    ("agssp-tiny-clip", 32, [8], 5),
    ("ViT-B-16-plus-240", 4, [2], 3),
]
GPU_CASES = [
    ("ViT-B-16-plus-240", 256, [1, 8, 32, 64], 5),
    ("ViT-L-14-336", 128, [1, 8, 32], 5),
    ("ViT-H-14-378-quickgelu", 64, [1, 8, 16], 3),
]
MODES = ("kead", "winclip")
CATEGORY = "steel_strip"


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mib() -> float:
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(spec: dict) -> dict:
    """One (model, mode, device, batch) measurement; returns the figures as a dict."""
    import numpy as np
    import torch

    import agssp_pipeline  # noqa: F401  (offline defaults)
    from agssp_pipeline.kead.clip_encoder import ClipEngine, ClipKeadEncoder
    from agssp_pipeline.kead.settings import KeadSettings
    from agssp_pipeline.kead.winclip import WinClipEncoder

    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    device = torch.device(spec["device"])
    settings = KeadSettings(encoder="clip", clip_model=spec["model"], allow_random_weights=True,
                            batch_size=spec["batch"], precision=spec["precision"])
    engine = ClipEngine.from_settings(settings, device)
    encoder = ClipKeadEncoder(engine) if spec["mode"] == "kead" else WinClipEncoder(engine)
    rng = np.random.default_rng(0)  # the same images for every mode
    raw = [rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8) for _ in range(spec["images"])]
    images = torch.stack([encoder.preprocess(image) for image in raw])
    engine.text_embeddings(CATEGORY)  # cached once per model, not part of per-batch scoring
    batches = list(images.split(spec["batch"]))
    # base = model + text embeddings + input images; the peak above it is what referencing and scoring need
    # (measured from here because allocators keep freed memory resident after the first batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    rss_reset = _reset_peak_rss()
    rss_base = _status_mib("VmRSS") or 0.0
    encoder.set_references(CATEGORY, images[: min(2, len(images))])
    encoder.score(batches[0], CATEGORY)  # warm-up
    rates = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        for batch in batches:
            out = encoder.score(batch, CATEGORY)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(images) / (time.perf_counter() - start))
    assert torch.isfinite(out.maps).all()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak, base = _peak_rss_mib(), rss_base
    return {**spec, "images_per_s": statistics.median(rates), "rates": rates, "peak_mib": peak,
            "scoring_mib": max(peak - base, 0.0) if (rss_reset or device.type == "cuda") else float("nan"),
            "peak_kind": "cuda_max_allocated" if device.type == "cuda" else
            ("peak_rss_during_scoring" if rss_reset else "process_max_rss"),
            "grid": encoder.grid_size, "precision_used": engine.precision,
            "gmacs_per_image": estimated_gmacs(engine, encoder)}


def estimated_gmacs(engine, encoder) -> float:
    """Multiply-accumulates per image of the transformer blocks (machine-independent cost estimate).

    Per block and sequence of T tokens, width d: T * 12 d^2 (qkv, out, MLP) + 2 T^2 d (attention);
    a V-V block adds T * 2 d^2 (value, out projections) + 2 T^2 d. WinCLIP adds its window sequences.
    """
    d, depth = engine.visual.transformer.width, engine.depth
    tokens = 1 + engine.grid_size**2

    def block(t: int) -> float:
        return t * 12 * d * d + 2 * t * t * d

    total = depth * block(tokens)
    if hasattr(encoder, "vv_start_block"):
        total += (depth - encoder.vv_start_block) * (tokens * 2 * d * d + 2 * tokens * tokens * d)
    for size in getattr(encoder, "windows", ()):
        n_windows = (engine.grid_size - size + 1) ** 2
        total += depth * n_windows * block(1 + size * size)
    return total / 1e9


def measure(spec: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=os.environ.copy())
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {**spec, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n## {title}")
    header = f"{'model':<24} {'dev':<5} {'prec':<5} {'batch':>5} {'imgs':>5} {'grid':>4} " \
             f"{'GMAC K/W':>13} {'KeAD img/s':>11} {'WinCLIP img/s':>14} {'KeAD/WinCLIP':>13} {'KeAD peak (+scoring) MiB':>25} " \
             f"{'WinCLIP peak (+scoring) MiB':>28}"
    print(header)
    print("-" * len(header))
    keyed = {(r["model"], r["device"], r["batch"], r["mode"]): r for r in rows}
    seen = []
    for r in rows:
        key = (r["model"], r["device"], r["batch"])
        if key in seen:
            continue
        seen.append(key)
        kead, win = keyed.get((*key, "kead"), {}), keyed.get((*key, "winclip"), {})
        if "error" in kead or "error" in win:
            print(f"{key[0]:<24} {key[1]:<5} error: {kead.get('error') or win.get('error')}")
            continue
        ratio = kead["images_per_s"] / win["images_per_s"]
        print(f"{key[0]:<24} {key[1]:<5} {kead['precision_used']:<5} {key[2]:>5} {kead['images']:>5} "
              f"{kead['grid']:>4} {kead['gmacs_per_image']:>6.2f}/{win['gmacs_per_image']:<6.2f} {kead['images_per_s']:>11.2f} {win['images_per_s']:>14.2f} {ratio:>12.1f}x "
              f"{kead['peak_mib']:>14.0f} (+{kead['scoring_mib']:>6.0f}) {win['peak_mib']:>17.0f} (+{win['scoring_mib']:>6.0f})")
    kinds = sorted({r.get("peak_kind", "") for r in rows if "peak_kind" in r})
    print(f"(images/s: median over repeats; peak memory: {', '.join(kinds)}; (+x): peak minus the memory "
          "held before referencing/scoring (model, text embeddings, inputs); GMAC K/W: estimated transformer "
          "multiply-accumulates per image, KeAD / WinCLIP)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny model only (CPU)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section even when CUDA is present")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    import torch

    cpu_rows = []
    for model, n_images, batch_sizes, repeats in CPU_CASES[:1] if args.quick else CPU_CASES:
        for batch in batch_sizes:
            for mode in MODES:
                spec = {"model": model, "mode": mode, "device": "cpu", "precision": "fp32", "batch": batch,
                        "images": n_images, "repeats": repeats, "threads": args.threads}
                row = measure(spec)
                cpu_rows.append(row)
                print(f"  measured {model} {mode} batch {batch}: "
                      f"{row.get('images_per_s', float('nan')):.2f} img/s {row.get('error', '')}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print_table(cpu_rows, f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores, load avg "
                          f"{load:.1f} at the end), fp32, random weights")

    if torch.cuda.is_available() and not args.no_gpu and not args.quick:
        gpu_rows = []
        for model, n_images, batch_sizes, repeats in GPU_CASES:
            for batch in batch_sizes:
                for mode in MODES:
                    spec = {"model": model, "mode": mode, "device": "cuda", "precision": "bf16", "batch": batch,
                            "images": n_images, "repeats": repeats, "threads": 0}
                    row = measure(spec)
                    gpu_rows.append(row)
                    print(f"  measured {model} {mode} batch {batch}: "
                          f"{row.get('images_per_s', float('nan')):.1f} img/s {row.get('error', '')}", flush=True)
        print_table(gpu_rows, f"GPU {torch.cuda.get_device_name(0)}, bf16 autocast, random weights")
    else:
        print("\n(GPU section skipped: no CUDA device" + (" or --no-gpu/--quick)" if torch.cuda.is_available() else ")"))


if __name__ == "__main__":
    main()
