"""Throughput and peak memory: KeAD vs WinCLIP mode on the same CLIP encoder and the same images.

Each measurement runs in a fresh child process (same script, ``--child``) so peak memory is its own:
on CPU the peak resident set size during scoring (Linux ``clear_refs`` resets the high-water mark after
the model is loaded; elsewhere ``ru_maxrss``), on CUDA ``torch.cuda.max_memory_allocated``.
Weights are random (seeded): throughput does not depend on them, and no weights are reachable offline.
Timed: ``encoder.score`` on preprocessed batches after one warm-up batch (text embeddings cached);
reported: median images/s over repeats, peak memory, and the KeAD / WinCLIP throughput ratio.
For scale, a third mode times the bare image tower (``visual(images)``: one plain CLIP forward, no
taps, no scoring): KeAD / bare says what KeAD's V-V path, taps and scoring cost on top of one forward,
and the "ceiling" column (WinCLIP GMAC / bare-forward GMAC) is the largest KeAD / WinCLIP ratio that
any method needing one full forward per image could reach on that encoder and grid.

    .venv/bin/python benchmarks/bench_kead.py            # CPU section; GPU section too when CUDA is present
    .venv/bin/python benchmarks/bench_kead.py --quick    # tiny model only
    .venv/bin/python benchmarks/bench_kead.py --large    # also L-14-336 and H-14-378 on CPU (~15 min)
    .venv/bin/python benchmarks/bench_kead.py --cnn      # cnn_fewshot only: kead.input squash vs aspect

``--cnn`` times the offline encoder through ``compute_anomaly_maps`` (decoding, shape-ordered batches,
references, store writes: what ``anomaly_maps`` pays) on ``--cnn-images`` magnetic-tile images of mixed
aspect ratio (1.0 to 2.8; seeded synthetic textures of the same sizes when the dataset is absent), with
the product's KeadSettings and each ``kead.input``; the ratio is the speed cost of aspect input.
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
CPU_LARGE_CASES = [
    ("ViT-L-14-336", 2, [1], 3),
    ("ViT-H-14-378-quickgelu", 1, [1], 2),
]
GPU_CASES = [
    ("ViT-B-16-plus-240", 256, [1, 8, 32, 64], 5),
    ("ViT-L-14-336", 128, [1, 8, 32], 5),
    ("ViT-H-14-378-quickgelu", 64, [1, 8, 16], 3),
]
MODES = ("kead", "winclip", "bare")
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
    encoder = {"kead": ClipKeadEncoder, "winclip": WinClipEncoder, "bare": BareForward}[spec["mode"]](engine)
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


class BareForward:
    """The image tower alone (``visual(images)``), scored as nothing: the cost floor of one forward."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.grid_size = engine.grid_size

    def preprocess(self, image):
        return self.engine.preprocess(image)

    def set_references(self, category, images) -> None:
        pass

    def score(self, images, category):
        import torch

        from agssp_pipeline.kead.base import MapBatch

        with torch.no_grad(), self.engine.autocast():
            embedding = self.engine.visual(self.engine.check_batch(images)).float()
        return MapBatch(maps=embedding[:, :1, None].cpu(), image_score=embedding[:, 0].cpu(),
                        zero_shot_score=embedding[:, 0].cpu())


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
    header = (f"{'model':<24} {'dev':<5} {'prec':<5} {'batch':>5} {'imgs':>5} {'grid':>4} {'GMAC K/W/bare':>20} "
              f"{'KeAD img/s':>11} {'WinCLIP img/s':>14} {'bare img/s':>11} {'KeAD/WinCLIP':>13} {'ceiling':>8} "
              f"{'KeAD/bare':>10} {'KeAD peak (+scoring) MiB':>25} {'WinCLIP peak (+scoring) MiB':>28}")
    print(header)
    print("-" * len(header))
    keyed = {(r["model"], r["device"], r["batch"], r["mode"]): r for r in rows}
    seen = []
    for r in rows:
        key = (r["model"], r["device"], r["batch"])
        if key in seen:
            continue
        seen.append(key)
        kead, win, bare = (keyed.get((*key, mode), {}) for mode in MODES)
        errors = [m.get("error") for m in (kead, win, bare) if "error" in m or not m]
        if errors:
            print(f"{key[0]:<24} {key[1]:<5} error: {errors[0] or 'not measured'}")
            continue
        ratio = kead["images_per_s"] / win["images_per_s"]
        ceiling = win["gmacs_per_image"] / bare["gmacs_per_image"]
        gmacs = "/".join(f"{m['gmacs_per_image']:.3g}" for m in (kead, win, bare))
        print(f"{key[0]:<24} {key[1]:<5} {kead['precision_used']:<5} {key[2]:>5} {kead['images']:>5} "
              f"{kead['grid']:>4} {gmacs:>20} {kead['images_per_s']:>11.3g} {win['images_per_s']:>14.3g} "
              f"{bare['images_per_s']:>11.3g} {ratio:>12.1f}x {ceiling:>7.1f}x "
              f"{kead['images_per_s'] / bare['images_per_s']:>9.2f} "
              f"{kead['peak_mib']:>14.0f} (+{kead['scoring_mib']:>6.0f}) {win['peak_mib']:>17.0f} "
              f"(+{win['scoring_mib']:>6.0f})")
    kinds = sorted({r.get("peak_kind", "") for r in rows if "peak_kind" in r})
    print(f"(images/s: median over repeats; peak memory: {', '.join(kinds)}; (+x): peak minus the memory "
          "held before referencing/scoring (model, text embeddings, inputs); GMAC K/W/bare: estimated "
          "transformer multiply-accumulates per image of KeAD / WinCLIP / one bare forward; ceiling: "
          "WinCLIP GMAC / bare GMAC, the best KeAD/WinCLIP ratio a one-forward method could reach; "
          "KeAD/bare: KeAD throughput as a fraction of one bare forward's)")


def run_cases(cases, device: str, precision: str, threads: int) -> list[dict]:
    rows = []
    for model, n_images, batch_sizes, repeats in cases:
        for batch in batch_sizes:
            for mode in MODES:
                spec = {"model": model, "mode": mode, "device": device, "precision": precision, "batch": batch,
                        "images": n_images, "repeats": repeats, "threads": threads}
                row = measure(spec)
                rows.append(row)
                print(f"  measured {model} {mode} batch {batch}: "
                      f"{row.get('images_per_s', float('nan')):.2f} img/s {row.get('error', '')}", flush=True)
    return rows


def cnn_input_cost(count: int, image_size: int | None) -> None:
    """cnn_fewshot images/s through the runner, squash vs aspect input, on images of mixed aspect ratio."""
    import tempfile

    import cv2
    import numpy as np
    import pandas as pd
    import torch

    import agssp_pipeline  # noqa: F401  (offline defaults)
    from agssp_pipeline.kead.encoders import build_encoder
    from agssp_pipeline.kead.runner import compute_anomaly_maps
    from agssp_pipeline.kead.settings import KeadSettings

    root = REPO.parent / "shared" / "data" / "magnetic_tile"
    with tempfile.TemporaryDirectory() as scratch:
        paths = sorted(root.glob("MT_*/Imgs/*.jpg"))[:: max(1, len(sorted(root.glob("MT_*/Imgs/*.jpg"))) // count)]
        if not paths:  # synthetic stand-ins with magnetic tile's spread of sizes
            rng = np.random.default_rng(0)
            for number in range(count):
                height = int(rng.integers(200, 400))
                image = rng.integers(0, 256, (height, int(height * rng.uniform(1.0, 2.8)), 3), dtype=np.uint8)
                cv2.imwrite(str(Path(scratch) / f"{number}.png"), image)
            paths = sorted(Path(scratch).glob("*.png"))
        sizes = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).shape for p in paths[:count]]
        index = pd.DataFrame({"image_id": [f"i{n}" for n in range(len(sizes))], "path": [str(p) for p in paths[:count]],
                              "category": "tile", "height": [h for h, _ in sizes], "width": [w for _, w in sizes],
                              "duplicate_of": None})
        references = index.head(4).assign(source="bench", reason="normal")
        base = KeadSettings(**({"image_size": image_size} if image_size else {}))
        rates = {}
        for mode in ("squash", "aspect"):
            settings = base.model_copy(update={"input": mode})
            encoder = build_encoder(settings)
            compute_anomaly_maps(index.head(4), encoder, str(Path(scratch) / f"warm_{mode}"), references,
                                 batch_size=settings.batch_size, num_workers=0)
            stats = compute_anomaly_maps(index, encoder, str(Path(scratch) / mode), references,
                                         batch_size=settings.batch_size, num_workers=settings.num_workers)
            rates[mode] = stats.images_per_s
            print(f"  cnn_fewshot input={mode} image_size={encoder.image_size}: {stats.computed} images "
                  f"in {stats.seconds:.1f} s, {stats.images_per_s:.2f} images/s, {stats.forward_passes} batches "
                  f"on {stats.device}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"aspect / squash throughput: {rates['aspect'] / rates['squash']:.2f} ({len(sizes)} images, aspect "
          f"{min(max(s) / min(s) for s in sizes):.1f}-{max(max(s) / min(s) for s in sizes):.1f}, "
          f"{torch.get_num_threads()} threads, load avg {load:.1f}; includes building the references)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny model only (CPU)")
    parser.add_argument("--large", action="store_true", help="also ViT-L-14-336 and ViT-H-14-378 on CPU (slow)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section even when CUDA is present")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--cnn", action="store_true", help="cnn_fewshot only: squash vs aspect input speed")
    parser.add_argument("--cnn-images", type=int, default=64)
    parser.add_argument("--cnn-image-size", type=int, default=None, help="default: the product's kead.image_size")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    if args.cnn:
        cnn_input_cost(args.cnn_images, args.cnn_image_size)
        return

    import torch

    cases = CPU_CASES[:1] if args.quick else CPU_CASES + (CPU_LARGE_CASES if args.large else [])
    cpu_rows = run_cases(cases, "cpu", "fp32", args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print_table(cpu_rows, f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores, load avg "
                          f"{load:.1f} at the end), fp32, random weights")

    if torch.cuda.is_available() and not args.no_gpu and not args.quick:
        gpu_rows = run_cases(GPU_CASES, "cuda", "bf16", 0)
        print_table(gpu_rows, f"GPU {torch.cuda.get_device_name(0)}, bf16 autocast, random weights")
    else:
        print("\n(GPU section skipped: no CUDA device" + (" or --no-gpu/--quick)" if torch.cuda.is_available() else ")"))


if __name__ == "__main__":
    main()
