"""Map quality through the product: the encoder a config builds, the code the assets run, per dataset.

Each variant is a ``KeadSettings`` (what ``agssp.yaml``'s ``kead:`` block becomes): the product default
plus the overrides the variant names, and the output says which fields differ from that default. For
every dataset the sources are indexed by ``ingest_source`` (as ``image_index`` does), references chosen by
``select_references`` with the settings' strategy (as ``anomaly_maps`` does), maps computed by
``compute_anomaly_maps`` into a temporary store with the settings' batch size and workers, and scored by
``evaluate_maps`` with the source's boxes (as ``kead_evaluation`` does):

- ``magnetic_tile``: mask_folder, MT_Free the normal folder (references and normal test images); pixel
  AUROC against the masks, per defect class over that class's images;
- ``neu_det``: voc, no normal images (references: the most typical images); pixel AUROC against box
  interiors (a lower bound of a mask AUROC); the class of an image is its boxes' class name here (the
  asset reports the folder), so the per-class rows exist;
- ``demo``: the synthetic corpus ``agssp demo`` writes (seeded), every source with ground truth.

``--max-per-class`` / ``--max-normal`` cap the test images per defect class / the normal test images
(seeded by image id; references are chosen from the whole source first, as the asset does); the
defaults cap nothing: all 1,344 magnetic-tile images. Per-class pixel AUROC only reads the images of
that class, so capping normals changes image AUROC, never pixel AUROC.

    nice .venv/bin/python benchmarks/bench_kead_eval.py                                   # product default, MT
    nice .venv/bin/python benchmarks/bench_kead_eval.py --datasets magnetic_tile,neu_det \\
        --variant input=squash --variant input=aspect --variant image_size=256,cnn_layers=[2,3]
    nice .venv/bin/python benchmarks/bench_kead_eval.py --adaptor --max-per-class 24 --max-normal 8   # plain vs adapted

``--adaptor`` adds, per variant, the same maps scored with an ADPretrain adaptor trained as
``feature_adaptor`` trains it (``kead.adaptor_training`` defaults) on the source's normal images that are
neither test images nor references, with synthetic anomalies only (no real masks: they belong to the test
images); its training time is printed. Sources without normal images (NEU-DET) skip it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import agssp_pipeline  # noqa: E402,F401  (offline defaults)
from agssp_pipeline.config import SourceConfig, load_config  # noqa: E402
from agssp_pipeline.kead.encoders import build_encoder  # noqa: E402
from agssp_pipeline.kead.evaluation import evaluate_maps  # noqa: E402
from agssp_pipeline.kead.references import select_references  # noqa: E402
from agssp_pipeline.kead.runner import compute_anomaly_maps, mappable_rows  # noqa: E402
from agssp_pipeline.kead.settings import KeadSettings  # noqa: E402
from agssp_pipeline.kead.store import read_map_table  # noqa: E402
from agssp_pipeline.sources.ingest import ingest_source  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def magnetic_tile(root: Path, scratch: Path) -> list[SourceConfig]:
    return [SourceConfig(name="magnetic_tile", format="mask_folder", root=str(root / "magnetic_tile"),
                         category="magnetic_tile", normal_subfolders=["MT_Free"])]


def neu_det(root: Path, scratch: Path) -> list[SourceConfig]:
    return [SourceConfig(name="neu_det", format="voc", root=str(root / "neu_det"), category="hot_rolled_strip")]


def demo(root: Path, scratch: Path) -> list[SourceConfig]:
    from agssp_pipeline.demo.corpus import generate_demo

    corpus = generate_demo(scratch / "demo")
    return list(load_config(corpus.config_path).sources)


DATASETS: dict[str, Callable[[Path, Path], list[SourceConfig]]] = {
    "magnetic_tile": magnetic_tile, "neu_det": neu_det, "demo": demo}


def parse_variant(text: str) -> dict:
    """``image_size=256,cnn_layers=[2,3]`` -> overrides of KeadSettings fields (values read as YAML)."""
    parts, depth, start = [], 0, 0
    for position, char in enumerate(text + ","):
        depth += 1 if char in "[{" else -1 if char in "]}" else 0
        if char == "," and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    overrides = {}
    for part in filter(None, parts):
        key, _, value = part.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def differences(settings: KeadSettings) -> str:
    """The fields where ``settings`` differs from the product default (``KeadSettings()``)."""
    default, mine = KeadSettings().model_dump(), settings.model_dump()
    changed = [f"{key}={mine[key]}" for key in mine if mine[key] != default[key]]
    return ", ".join(changed) if changed else "product default"


def _cap(rows: pd.DataFrame, count: int | None, seed: int) -> pd.DataFrame:
    if count is None or len(rows) <= count:
        return rows
    keys = rows["image_id"].map(lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return rows.assign(_key=keys).sort_values("_key").head(count).drop(columns="_key")


def prepare(sources: list[SourceConfig], scratch: Path, settings: KeadSettings, max_per_class: int | None,
            max_normal: int | None, seed: int) -> list[dict]:
    """Per source with ground truth: test index, annotations and references (the assets' choices)."""
    from agssp_pipeline.kead.evaluation import defect_class_of, has_boxes, has_masks

    ingested = {s.name: ingest_source(s, derived_masks=str(scratch / "masks" / s.name)) for s in sources}
    prepared = []
    for source in sources:
        result = ingested[source.name]
        index, annotations = mappable_rows(result.images), result.annotations
        if not has_masks(index) and not has_boxes(annotations):
            continue
        categories = sorted(index["category"].dropna().astype(str).unique())
        pool = pd.concat([index] + [mappable_rows(ingested[s.name].images) for s in sources
                                    if s.name != source.name and s.used_for_pretraining], ignore_index=True)
        pool = pool[pool["category"].astype(str).isin(categories)].drop_duplicates("image_id")
        references = select_references(pool, k=settings.k_shot, strategy=settings.reference_strategy,
                                       explicit=settings.reference_images, categories=categories)
        if has_boxes(annotations):  # the boxes' class (NEU-DET names files, not folders, after classes)
            first = annotations.drop_duplicates("image_id").set_index("image_id")["class_name"]
            index = index.assign(defect_class=index["image_id"].map(first))
        index = index.assign(defect_class=[row["defect_class"] if isinstance(row.get("defect_class"), str)
                                           else defect_class_of(row) for _, row in index.iterrows()])
        index = index[~index["image_id"].isin(set(references["image_id"]))]
        normal = index["is_normal"].fillna(False).astype(bool)
        capped = [_cap(group, max_per_class, seed) for _, group in index[~normal].groupby("defect_class")]
        test = pd.concat(capped + [_cap(index[normal], max_normal, seed)], ignore_index=True)
        # the adaptor learns from normal images that are neither test images nor references, with synthetic
        # anomalies only: the real masks belong to the test images, learning from them would leak
        spare = index[normal & ~index["image_id"].isin(set(test["image_id"]))]
        prepared.append({"source": source.name, "index": test, "annotations": annotations,
                         "references": references, "adaptor_pool": spare.assign(mask_path=None)})
    return prepared


def adapt(encoder, settings: KeadSettings, data: dict) -> float:
    """Train the ADPretrain adaptor as ``feature_adaptor`` does (``settings.adaptor_training``, the product
    default unless overridden) on the source's spare normal images; returns the training seconds."""
    from agssp_pipeline.kead.adaptor import fit_adaptor

    started = time.perf_counter()
    projector, report = fit_adaptor(encoder, data["adaptor_pool"], data["references"], settings.adaptor_training)
    seconds = time.perf_counter() - started
    encoder.set_adaptor(projector, {"run_id": "bench", "encoder_identity": report["encoder_identity"]})
    print(f"  adaptor: {report['patches']} patches from {report['images']} images, {report['steps']} steps, "
          f"trained in {seconds:.0f} s", flush=True)
    return seconds


def measure(settings: KeadSettings, data: dict, store: str, device: str | None,
            adapted: bool = False) -> tuple[pd.DataFrame, float, float]:
    """The maps of one source through ``compute_anomaly_maps`` + ``evaluate_maps``: (rows, images/s, adaptor s)."""
    encoder = build_encoder(settings, device)
    training_seconds = adapt(encoder, settings, data) if adapted else 0.0
    stats = compute_anomaly_maps(data["index"], encoder, store, data["references"], batch_size=settings.batch_size,
                                 num_workers=settings.num_workers, require_references=settings.k_shot > 0)
    if stats.failed:
        print(f"  {len(stats.failed)} images failed, first: {stats.failed[0]}")
    rows = evaluate_maps(data["index"], read_map_table(store), annotations=data["annotations"])
    return rows, stats.images_per_s, training_seconds


def summarise(rows: pd.DataFrame) -> dict:
    classes = rows[rows["level"] == "class"]
    worst = classes.loc[classes["pixel_auroc"].idxmin()] if len(classes) else None
    overall = rows[rows["level"] == "overall"].iloc[0]
    return {"class_pixel_auroc": float(classes["pixel_auroc"].mean()),
            "class_image_auroc": float(classes["image_auroc"].mean()),
            "overall_pixel_auroc": float(overall["pixel_auroc"]),
            "worst_class": f"{worst['name']} {worst['pixel_auroc']:.3f}" if worst is not None else "",
            "classes": {str(r["name"]): round(float(r["pixel_auroc"]), 3) for _, r in classes.iterrows()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding magnetic_tile/ and neu_det/")
    parser.add_argument("--datasets", default="magnetic_tile", help=f"comma list of {', '.join(DATASETS)}")
    parser.add_argument("--variant", action="append", type=parse_variant, default=None,
                        help="KeadSettings overrides, e.g. input=aspect,image_size=256 (repeatable; none: default)")
    parser.add_argument("--max-per-class", type=int, default=None)
    parser.add_argument("--max-normal", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: the settings' device (auto)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write every evaluation row as CSV here")
    parser.add_argument("--adaptor", action="store_true",
                        help="also run each variant with an ADPretrain adaptor trained on the source's spare normal "
                             "images + synthetic anomalies (kead.adaptor_training defaults; skipped without normals)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [KeadSettings.model_validate({**KeadSettings().model_dump(), **o}) for o in (args.variant or [{}])]
    frames, summary = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for dataset in args.datasets.split(","):
            sources = DATASETS[dataset](args.data, Path(scratch))
            missing = [s.root for s in sources if not Path(s.root).is_dir()]
            if missing:
                print(f"{dataset}: skipped, not found: {', '.join(missing)}")
                continue
            started = time.perf_counter()
            prepared = prepare(sources, Path(scratch), variants[0], args.max_per_class, args.max_normal, args.seed)
            for data in prepared:
                print(f"{dataset}/{data['source']}: {len(data['index'])} test images "
                      f"({int((~data['index']['is_normal'].fillna(False).astype(bool)).sum())} defective), "
                      f"{len(data['references'])} references ({', '.join(sorted(set(data['references']['reason'])))})"
                      f", indexed in {time.perf_counter() - started:.0f} s", flush=True)
            runs = [(n, s, False) for n, s in enumerate(variants)]
            runs += [(n, s, True) for n, s in enumerate(variants)] if args.adaptor else []
            for number, settings, adapted in runs:
                for data in prepared:
                    if adapted and data["adaptor_pool"].empty:
                        print(f"  {data['source']}: no spare normal images, adaptor skipped")
                        continue
                    store = str(Path(scratch) / f"maps_{number}_{int(adapted)}_{data['source']}")
                    started = time.perf_counter()
                    rows, rate, training = measure(settings, data, store, args.device, adapted)
                    label = differences(settings) + (" + adaptor" if adapted else "")
                    line = {"dataset": dataset, "source": data["source"], "variant": label, "images_per_s": rate,
                            "adaptor_s": training, "seconds": time.perf_counter() - started, **summarise(rows)}
                    summary.append(line)
                    frames.append(rows.assign(dataset=dataset, variant=line["variant"]))
                    print(f"  [{line['variant']}] {data['source']}: class pixel AUROC {line['class_pixel_auroc']:.3f}"
                          f" (worst {line['worst_class']}), class image AUROC {line['class_image_auroc']:.3f}, "
                          f"{rate:.2f} images/s; {line['classes']}", flush=True)
    if not summary:
        sys.exit("no dataset found")
    table = pd.DataFrame(summary)
    pd.set_option("display.width", 220)
    pd.set_option("display.max_colwidth", 80)
    print(f"\ntorch threads {torch.get_num_threads()}; caps: per class {args.max_per_class}, normal {args.max_normal}")
    print(table.drop(columns=["classes"]).round(3).to_string(index=False))
    means = table.groupby("variant", sort=False)["class_pixel_auroc"].mean()
    print("\nmean per-class pixel AUROC over datasets (variants named by how they differ from the product default)")
    print(means.round(3).to_string())
    if args.out:
        pd.concat(frames, ignore_index=True).to_csv(args.out, index=False)
        print(f"\nwritten {args.out}")
    print(f"\nmedian images/s: {np.median(table['images_per_s']):.2f}")


if __name__ == "__main__":
    main()
