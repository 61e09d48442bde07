"""Map quality on the magnetic tile dataset: image / pixel AUROC per defect class, k normal references.

Every encoder sees the same images through the real pipeline code (``compute_anomaly_maps`` into a
temporary Zarr store, then ``evaluate_maps``):

- ``cnn_fewshot``: the offline encoder with its defaults (EfficientNet-Lite0 ImageNet weights, stages of
  stride 8+16, 3x3 aggregation, flipped references, light blur, leave-one-out normalisation);
- ``patchcore_plain``: the same weights as a plain PatchCore-style map (224 px, stages 8+16, 3x3
  aggregation, no reference augmentation, no blur) - the baseline the defaults must beat;
- ``clip`` / ``winclip`` (``--clip``): the CLIP encoders with RANDOM weights (no CLIP weights offline);
  they only show that the path runs end to end, their numbers mean nothing about the method.

References: k images of MT_Free (seeded sample); test set: up to ``--max-per-class`` images per defect
class (seeded) plus ``--free-test`` other MT_Free images for image AUROC. Per-class pixel AUROC is over
that class's images; the ``all`` row pools every test image (normals included).

    .venv/bin/python benchmarks/bench_kead_eval.py                        # full classes, ~10-20 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_kead_eval.py --max-per-class 20     # quick look
    .venv/bin/python benchmarks/bench_kead_eval.py --adaptor --encoders cnn_fewshot   # plain vs adapted
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import agssp_pipeline  # noqa: E402,F401  (offline defaults)
from agssp_pipeline.kead.cnn_encoder import CnnFewShotEncoder  # noqa: E402
from agssp_pipeline.kead.evaluation import evaluate_maps  # noqa: E402
from agssp_pipeline.kead.runner import compute_anomaly_maps  # noqa: E402
from agssp_pipeline.kead.settings import KeadSettings  # noqa: E402
from agssp_pipeline.kead.store import read_map_table  # noqa: E402

DEFAULT_ROOT = REPO.parent / "shared" / "data" / "magnetic_tile"
CLASSES = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")


def _seeded(paths: list[Path], count: int, seed: int) -> list[Path]:
    ranked = sorted(paths, key=lambda p: hashlib.sha256(f"{seed}:{p.name}".encode()).hexdigest())
    return sorted(ranked[:count])


def build_index(root: Path, k: int, max_per_class: int, free_test: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(test index, reference rows) in the ingestion index schema (the columns the stages read)."""
    rows = []

    def add(path: Path, is_normal: bool) -> None:
        mask = path.with_suffix(".png")
        rows.append({"image_id": hashlib.sha256(path.read_bytes()).hexdigest()[:16], "path": str(path),
                     "source": "magnetic_tile", "category": "magnetic_tile", "duplicate_of": None,
                     "mask_path": str(mask) if mask.is_file() and not is_normal else None, "is_normal": is_normal})

    free = sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))
    chosen = _seeded(free, k + free_test, seed)
    references, free_rows = chosen[:k], chosen[k:]
    for path in references:
        add(path, True)
    reference_rows = pd.DataFrame(rows).assign(reason="normal")
    rows.clear()
    for path in free_rows:
        add(path, True)
    for name in CLASSES:
        for path in _seeded(sorted((root / name / "Imgs").glob("*.jpg")), max_per_class, seed):
            add(path, False)
    index = pd.DataFrame(rows).drop_duplicates("image_id")
    return index, reference_rows


def encoders(names: list[str], image_size: int | None, cnn_kwargs: dict) -> dict:
    def clip(kind: str):
        from agssp_pipeline.kead.encoders import build_encoder

        return build_encoder(KeadSettings(encoder=kind, allow_random_weights=True, device="cpu"))

    table = {
        "cnn_fewshot": lambda: CnnFewShotEncoder(**{"image_size": image_size or 320, **cnn_kwargs}),
        "patchcore_plain": lambda: CnnFewShotEncoder(image_size=224, layers=(2, 3), augment="none", blur_sigma=0.0),
        "clip": lambda: clip("clip"),
        "winclip": lambda: clip("winclip"),
    }
    return {name: table[name] for name in names}


def adapted_encoder(root: Path, index: pd.DataFrame, references: pd.DataFrame, image_size: int | None,
                    cnn_kwargs: dict, overrides: dict, normals: int, seed: int) -> tuple[CnnFewShotEncoder, dict]:
    """The cnn_fewshot encoder with an ADPretrain adaptor trained here (product defaults + ``overrides``).

    Training data: ``normals`` MT_Free images that are neither references nor test images, with synthetic
    anomalies only: the real MT masks belong to the test images, learning from them would leak.
    """
    from agssp_pipeline.kead.adaptor import fit_adaptor

    encoder = CnnFewShotEncoder(**{"image_size": image_size or 320, **cnn_kwargs})
    used = set(index["path"]) | set(references["path"])
    free = [p for p in sorted((root / "MT_Free" / "Imgs").glob("*.jpg")) if str(p) not in used]
    pool = pd.DataFrame([{"image_id": hashlib.sha256(p.read_bytes()).hexdigest()[:16], "path": str(p),
                          "category": "magnetic_tile", "is_normal": True, "mask_path": None, "duplicate_of": None}
                         for p in _seeded(free, normals, seed + 1)])
    training = KeadSettings().adaptor_training.model_copy(update={"max_images_per_category": normals, **overrides})
    started = time.perf_counter()
    projector, report = fit_adaptor(encoder, pool, references, training)
    report["training_seconds"] = time.perf_counter() - started
    encoder.set_adaptor(projector, {"run_id": "bench", "encoder_identity": report["encoder_identity"]})
    print(f"adaptor: {report['patches']} patches from {report['images']} images, "
          f"{report['steps']} steps, trained in {report['training_seconds']:.0f} s "
          f"(final {report['history'][-1]})", flush=True)
    return encoder, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-per-class", type=int, default=1000)
    parser.add_argument("--free-test", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--encoders", default="cnn_fewshot,patchcore_plain")
    parser.add_argument("--clip", action="store_true", help="add the CLIP/WinCLIP rows (random weights)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cnn-kwargs", type=json.loads, default={},
                        help='overrides of CnnFewShotEncoder arguments, e.g. \'{"layers": [2, 3, 4]}\'')
    parser.add_argument("--out", type=Path, default=None, help="write the table as CSV here")
    parser.add_argument("--adaptor", action="store_true",
                        help="add cnn_fewshot+adaptor: an ADPretrain adaptor trained on other MT_Free images with "
                             "synthetic anomalies (no MT masks), settings = the product's kead.adaptor_training")
    parser.add_argument("--adaptor-normals", type=int, default=32, help="MT_Free images the adaptor trains on")
    parser.add_argument("--adaptor-kwargs", type=json.loads, default={},
                        help='overrides of AdaptorTrainingSettings, e.g. \'{"steps": 100}\'')
    args = parser.parse_args()
    if not args.root.is_dir():
        sys.exit(f"magnetic tile dataset not found at {args.root} (expected ../shared/data/magnetic_tile)")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.encoders.split(",") + (["clip", "winclip"] if args.clip else [])
    index, references = build_index(args.root, args.k, args.max_per_class, args.free_test, args.seed)
    print(f"test images: {len(index)} ({int(index['mask_path'].notna().sum())} defective), "
          f"references: {len(references)} from MT_Free, torch threads {torch.get_num_threads()}")
    frames = []
    with tempfile.TemporaryDirectory() as scratch:
        makers = encoders(names, args.image_size, args.cnn_kwargs)
        adaptor_report: dict = {}
        if args.adaptor:
            def make_adapted() -> CnnFewShotEncoder:
                encoder, report = adapted_encoder(args.root, index, references, args.image_size, args.cnn_kwargs,
                                                  args.adaptor_kwargs, args.adaptor_normals, args.seed)
                adaptor_report.update(report)
                return encoder

            makers["cnn_fewshot+adaptor"] = make_adapted
        for name, make in makers.items():
            encoder = make()
            store = str(Path(scratch) / name)
            started = time.perf_counter()
            stats = compute_anomaly_maps(index, encoder, store, references, batch_size=8, num_workers=1)
            evaluation = evaluate_maps(index, read_map_table(store)).assign(
                variant=name, images_per_s=stats.images_per_s, seconds=time.perf_counter() - started)
            frames.append(evaluation)
            print(f"{name}: {stats.computed} maps in {stats.seconds:.0f} s ({stats.images_per_s:.2f} images/s)",
                  flush=True)
    result = pd.concat(frames, ignore_index=True)
    shown = result[result["level"].isin(["overall", "class"])]
    pivot = shown.pivot_table(index="name", columns="variant", values=["pixel_auroc", "image_auroc"],
                              sort=False)
    class_means = shown[shown["level"] == "class"].groupby("variant")[["pixel_auroc", "image_auroc"]].mean()
    pd.set_option("display.width", 200)
    print("\nAUROC per defect class (pixel: that class's images; image: class vs held-out MT_Free)")
    print(pivot.round(3).to_string())
    print("\nmean over the five classes")
    print(class_means.round(3).to_string())
    if args.clip:
        print("\nclip / winclip rows use RANDOM weights (no CLIP weights offline): plumbing check only.")
    if args.out:
        result.to_csv(args.out, index=False)
        print(f"\nwritten {args.out}")
    if adaptor_report:
        print(f"\nadaptor training time: {adaptor_report['training_seconds']:.1f} s "
              f"({adaptor_report['steps']} steps, {torch.get_num_threads()} threads)")
    print("\nmedian images/s: " + ", ".join(
        f"{v}={np.median(g['images_per_s']):.2f}" for v, g in result.groupby("variant")))


if __name__ == "__main__":
    main()
