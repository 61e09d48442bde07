"""Measured quality of pseudo boxes on real and demo data with the offline CNN few-shot encoder.

For each dataset: ingest (agssp_pipeline.sources), score every image with the cnn_fewshot encoder
(agssp_pipeline.kead; k normal references per category), compute T_c, pseudo boxes and the quality table
(agssp_pipeline.boxes) and print: box recall/precision at IoU 0.3/0.5 vs a random-box baseline, the
image-level split, and mask IoU over the delta sweep vs the best fixed (oracle) global threshold.
Then compares image-split rules (fixed values vs per-category quantiles) across datasets.

References: the pipeline's ``auto`` strategy (agssp_pipeline.kead.references): images marked normal by
ingestion (MT_Free, the demo's Free folders), else the most typical images of the category (NEU-DET and
the demo plant line have no marked normals; those references may hold defects themselves -- the few-shot
memory then partly "knows" defects, a known weakness reported as such). References are left out of the
evaluation (they score themselves). Maps go to versioned Zarr stores under --work; reruns read them back.

Usage:
  .venv/bin/python benchmarks/box_quality.py --datasets demo,magnetic_tile,neu_det \
      [--image-size 224] [--k-shot 4] [--max-per-class 60] [--work /tmp/agssp_box_quality]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agssp_pipeline.boxes.pseudo import build_pseudo_boxes
from agssp_pipeline.boxes.quality import evaluate_source, ground_truth_boxes, image_split_row
from agssp_pipeline.boxes.settings import BoxesSettings
from agssp_pipeline.boxes.thresholds import compute_category_thresholds, judge_defective, map_statistics
from agssp_pipeline.config import SourceConfig, load_config
from agssp_pipeline.sources.ingest import ingest_source

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


def real_sources(name: str) -> list[SourceConfig]:
    registry = {
        "magnetic_tile": lambda: [SourceConfig(
            name="magnetic_tile", format="mask_folder", root=str(SHARED / "magnetic_tile"), category="magnetic_tile",
            normal_subfolders=["MT_Free"], options={"class_strip_prefix": "MT_"})],
        "neu_det": lambda: [SourceConfig(
            name="neu_det", format="voc", root=str(SHARED / "neu_det"), category="rolled_strip", classes=NEU_CLASSES)],
    }
    return registry[name]()


def demo_sources(work: Path) -> tuple[list[SourceConfig], dict[str, pd.DataFrame]]:
    """Pretraining sources of the demo corpus and, for the unlabelled plant source, its hidden GT boxes."""
    from agssp_pipeline.demo import generate_demo

    corpus = generate_demo(work / "demo", seed=0)
    config = load_config(corpus.config_path)
    hidden = {}
    for source in config.pretrain_sources():
        if source.kind == "plant":
            hidden[source.name] = corpus.ground_truth(source.name)[["image_id", "x1", "y1", "x2", "y2"]]
    return config.pretrain_sources(), hidden


def subsample(index: pd.DataFrame, annotations: pd.DataFrame, max_per_class: int, seed: int) -> pd.DataFrame:
    """At most ``max_per_class`` images per (first GT class or 'normal'/'unknown') group, seeded."""
    if max_per_class <= 0:
        return index
    first_class = annotations.drop_duplicates("image_id").set_index("image_id")["class_name"]
    status = pd.Series(np.where(index["is_normal"].fillna(False).astype(bool), "normal", "unknown"), index=index.index)
    group = index["image_id"].map(first_class).astype(object)
    group = group.where(group.notna(), status)
    parts = [g.sample(min(len(g), max_per_class), random_state=seed) for _, g in index.groupby(group)]
    return pd.concat(parts).sort_values("image_id")


def source_maps(work: Path, source: SourceConfig, index: pd.DataFrame, args):
    """Maps of ``index`` through the pipeline's KeAD path: references chosen by ``kead.references``
    (strategy auto: marked normals, else the most typical images), ``kead.runner.compute_anomaly_maps``
    into a versioned Zarr store under ``work`` (incremental: a rerun only reads it back).

    Returns the evaluated rows (references removed: they score themselves), maps, scores, seconds spent.
    """
    from agssp_pipeline.kead.cnn_encoder import CnnFewShotEncoder
    from agssp_pipeline.kead.references import select_references
    from agssp_pipeline.kead.runner import compute_anomaly_maps
    from agssp_pipeline.kead.store import read_map_table

    references = select_references(index, args.k_shot, "auto", seed=args.seed)
    store = str(work / "maps.zarr" / f"{source.name}_s{args.image_size}_m{args.max_per_class}")
    started = time.perf_counter()
    run = compute_anomaly_maps(index, CnnFewShotEncoder(image_size=args.image_size), store, references,
                               batch_size=16, num_workers=0)
    seconds = time.perf_counter() - started if run.computed else 0.0
    table = read_map_table(store)
    keep = np.isin(table.image_id, index["image_id"]) & ~np.isin(table.image_id, references["image_id"])
    ids = table.image_id[keep].astype(str)
    evaluated = index.drop_duplicates("image_id").set_index("image_id").loc[ids].reset_index()
    print(f"references ({source.name}): " + ", ".join(
        f"{c}: {len(g)} {'/'.join(sorted(set(g['reason'])))}" for c, g in references.groupby("category")))
    return evaluated, table.maps[keep], table.image_score[keep], seconds


def fmt(frame: pd.DataFrame) -> str:
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def split_study(records: list[dict]) -> pd.DataFrame:
    """Image-level F1 / balanced accuracy of each split rule on each dataset."""
    rules = [("fixed", {"image_score_threshold": t}) for t in (0.3, 0.4, 0.5, 0.6)] + [
        ("quantile", {"image_score_quantile": q}) for q in (0.3, 0.5, 0.7)
    ]
    rows = []
    for record in records:
        for name, params in rules:
            settings = BoxesSettings(image_split=name, **params)
            table = compute_category_thresholds(record["stats"], settings)
            cutoff = table.set_index("category").loc[record["stats"]["category"], "image_cutoff"].to_numpy()
            judged = judge_defective(record["stats"]["image_score"].to_numpy(), cutoff)
            row = image_split_row(record["defective_gt"], judged, record["stats"]["image_score"].to_numpy(), name)
            value = next(iter(params.values()))
            rows.append({"dataset": record["name"], "rule": f"{name}={value}", "f1": row["f1"],
                         "balanced_accuracy": row["balanced_accuracy"], "flagged": row["n_pred"] / row["n_images"],
                         "defect_prevalence": row["n_gt"] / row["n_images"]})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="demo,magnetic_tile,neu_det")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--k-shot", type=int, default=4)
    parser.add_argument("--max-per-class", type=int, default=60, help="0 = every image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/agssp_box_quality")
    parser.add_argument("--settings", default="{}", help='JSON overrides of BoxesSettings, e.g. {"delta": 0.05}')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    settings = BoxesSettings.model_validate(json.loads(args.settings))

    study_records, summary = [], []
    for dataset in args.datasets.split(","):
        sources, hidden = demo_sources(work) if dataset == "demo" else (real_sources(dataset), {})
        for source in sources:
            result = ingest_source(source)
            index = result.images[result.images["duplicate_of"].isna()].reset_index(drop=True)
            annotations = hidden.get(source.name, result.annotations)
            index = subsample(index, result.annotations, args.max_per_class, args.seed)
            evaluated, maps, scores, seconds = source_maps(work, source, index, args)
            ids = evaluated["image_id"].to_numpy(str)
            stats = map_statistics(source.name, ids, maps, scores, evaluated["category"].astype(str).to_numpy())
            thresholds = compute_category_thresholds(stats, settings)
            pseudo = build_pseudo_boxes(source.name, ids, maps, scores, evaluated, thresholds, settings, "bench")
            gt = ground_truth_boxes(evaluated, annotations if len(annotations) else None)
            defective_gt = np.isin(ids, gt["image_id"].unique())
            print(f"\n=== {dataset} / {source.name}: {len(ids)} images evaluated "
                  f"({int(defective_gt.sum())} with GT defects), maps {maps.shape[1]}x{maps.shape[2]}"
                  + (f", scored in {seconds:.0f} s" if seconds else " (cached maps)"))
            print(fmt(thresholds[["category", "n_images", "mean_max", "threshold", "image_cutoff", "n_judged_defective"]]))
            if gt.empty and not evaluated.get("mask_path", pd.Series(dtype=object)).notna().any():
                print("no ground truth: skipped")
                continue
            quality = evaluate_source(source.name, ids, maps, evaluated, annotations if len(annotations) else None,
                                      pseudo, thresholds, settings)
            boxes = quality[quality["view"] == "boxes"]
            print(fmt(boxes[["method", "iou_threshold", "n_pred", "n_gt", "tp", "recall", "precision", "f1"]]))
            print(fmt(quality[quality["view"] == "image"][["method", "n_images", "n_gt", "n_pred", "f1",
                                                             "balanced_accuracy", "auroc"]]))
            masks = quality[quality["view"] == "mask"]
            if len(masks):
                adaptive = masks[masks["method"] == "adaptive"][["delta", "mask_iou", "mask_iou_ungated"]]
                print("mask IoU, adaptive T_c = mean max - delta:")
                print(fmt(adaptive))
                best_fixed = masks[(masks["method"] == "fixed") & masks["best"]].iloc[0]
                configured = masks[masks["configured"]].iloc[0]
                print(f"configured delta {settings.delta}: mask IoU {configured['mask_iou']:.3f}; best fixed "
                      f"(oracle) threshold {best_fixed['threshold']:.3f}: mask IoU {best_fixed['mask_iou']:.3f}")
            pseudo_row = boxes[(boxes["method"] == "pseudo") & (boxes["iou_threshold"] == 0.3)].iloc[0]
            random_row = boxes[(boxes["method"] == "random") & (boxes["iou_threshold"] == 0.3)].iloc[0]
            summary.append({"source": source.name, "images": len(ids), "recall@0.3": pseudo_row["recall"],
                            "random recall@0.3": random_row["recall"], "precision@0.3": pseudo_row["precision"],
                            "mask_iou": float(masks[masks["configured"]]["mask_iou"].iloc[0]) if len(masks) else np.nan,
                            "best_fixed_iou": float(masks[(masks["method"] == "fixed") & masks["best"]]["mask_iou"].iloc[0])
                            if len(masks) else np.nan})
            study_records.append({"name": source.name, "stats": stats, "defective_gt": defective_gt})
    print("\n=== summary (default settings: " + json.dumps(
        {k: getattr(settings, k) for k in ("delta", "image_split", "image_score_quantile", "min_area_fraction")}) + ")")
    print(fmt(pd.DataFrame(summary)))
    study = split_study(study_records)
    print("\n=== image-level split rules")
    print(fmt(study.pivot(index="rule", columns="dataset", values="balanced_accuracy").reset_index()))
    print("(balanced accuracy; F1:)")
    print(fmt(study.pivot(index="rule", columns="dataset", values="f1").reset_index()))
    print(fmt(study.groupby("rule")[["f1", "balanced_accuracy"]].mean().reset_index()))


if __name__ == "__main__":
    main()
