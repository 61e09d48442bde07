"""Measured quality of pseudo boxes on real and demo data, through the product's own KeAD defaults.

For each dataset: ingest (agssp_pipeline.sources), score every image with the encoder that
``KeadSettings()`` builds (what a user's config gets; ``--kead`` JSON overrides it and the run says
where it differs from the product default), compute T_c, pseudo boxes and the quality table
(agssp_pipeline.boxes) and print: box recall/precision at IoU 0.3/0.5 against the random-box baseline
(same number and sizes of boxes per image, placed at random), the image-level split, and mask IoU over
the delta sweep vs the best fixed (oracle) global threshold.

``--sweep`` then re-runs the boxes stage on the same cached maps for every named box method
(``sweep_methods``: threshold rule x image split x binarisation) and prints one comparison table: recall and
precision at IoU 0.3 per dataset, the mean over datasets and the worst case; the default of
``BoxesSettings`` is chosen from it (agssp_pipeline/boxes/__init__.py holds the table).

References: the pipeline's reference strategy (``kead.reference_strategy``, ``auto``): images marked
normal by ingestion (MT_Free, the demo's Free folders), else the most typical images of the category
(NEU-DET has no marked normals). References are left out of the evaluation (they score themselves).
Maps go to versioned Zarr stores under --work (one store per source and KeAD settings digest): reruns
with other box settings only read them back.

Usage:
  nice .venv/bin/python benchmarks/box_quality.py --datasets demo,magnetic_tile,neu_det \
      [--max-per-class 0] [--kead '{"image_size": 224}'] [--settings '{"method": "paper"}'] [--sweep] \
      [--work /tmp/agssp_box_quality]
  nice .venv/bin/python benchmarks/box_quality.py --datasets magnetic_tile --adaptor product   # adapted maps
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agssp_pipeline.boxes.pseudo import build_pseudo_boxes
from agssp_pipeline.boxes.quality import (
    box_quality_rows,
    evaluate_source,
    ground_truth_boxes,
    image_split_row,
)
from agssp_pipeline.boxes.settings import BoxesSettings
from agssp_pipeline.boxes.thresholds import compute_category_thresholds, map_statistics
from agssp_pipeline.config import SourceConfig, load_config
from agssp_pipeline.kead.settings import KeadSettings
from agssp_pipeline.sources.ingest import ingest_source

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]

# named box methods compared by --sweep: BoxesSettings overrides. The paper's rule, the old product rule
# (paper threshold, quantile 0.5 split), then threshold rule x image split x binarisation; "default" is
# whatever BoxesSettings() resolves to. --sweep-extra adds rule parameters around the best combination.
THRESHOLDS = {"paper": {"threshold_rule": "paper"},
              "mad2": {"threshold_rule": "normal_mad", "threshold_k": 2.0},
              "mad3": {"threshold_rule": "normal_mad", "threshold_k": 3.0}}
SPLITS = {split: {"image_split": split} for split in ("map_max", "quantile", "otsu", "gmm")}
BINARISATIONS = {"single": {"binarisation": "single"},
                 "hyst0.5": {"binarisation": "hysteresis", "hysteresis_fraction": 0.5},
                 "rethr0.5": {"binarisation": "rethreshold", "rethreshold_fraction": 0.5}}


def sweep_methods(extra: bool) -> dict[str, dict]:
    """The grid of named box methods (see THRESHOLDS, SPLITS, BINARISATIONS)."""
    methods: dict[str, dict] = {"paper": {"method": "paper"},
                                "old default (paper+quantile0.5)": {"method": "paper", "image_split": "quantile"},
                                "default": {}}
    for t_name, t in THRESHOLDS.items():
        for s_name, split in SPLITS.items():
            for b_name, b in BINARISATIONS.items():
                methods[f"{t_name}/{s_name}/{b_name}"] = {"method": "paper", **t, **split, **b}
    if extra:
        base = dict(BoxesSettings().rules().as_dict())
        for fraction in (0.3, 0.4, 0.6, 0.7):
            methods[f"default rethr{fraction}"] = {**base, "binarisation": "rethreshold", "rethreshold_fraction": fraction}
        for k in (1.5, 2.5, 4.0):
            methods[f"default k{k}"] = {"threshold_k": k}
        for area in (0.0, 0.002, 0.005):
            methods[f"default min_area {area}"] = {"min_area_fraction": area}
        for top_k in (3, 5):
            methods[f"default top_k {top_k}"] = {"top_k": top_k}
    return methods


@dataclass
class Prepared:
    """One evaluated source: its maps (references removed), index rows, ground truth."""

    name: str
    ids: np.ndarray
    maps: np.ndarray
    scores: np.ndarray
    evaluated: pd.DataFrame
    annotations: pd.DataFrame | None
    gt: pd.DataFrame
    defective_gt: np.ndarray
    seconds: float


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


def kead_settings(overrides: dict) -> tuple[KeadSettings, dict]:
    """The product's KeAD settings with ``overrides`` applied, and the fields that differ from the default."""
    default = KeadSettings()
    settings = KeadSettings.model_validate({**default.model_dump(), **overrides})
    mine, product = settings.model_dump(mode="json"), default.model_dump(mode="json")
    return settings, {k: (product[k], mine[k]) for k in mine if mine[k] != product[k]}


def adapted_settings(work: Path, source: str, index: pd.DataFrame, references: pd.DataFrame,
                     settings: KeadSettings, mode: str) -> KeadSettings:
    """``settings`` pointing at an ADPretrain adaptor trained as ``feature_adaptor`` trains it
    (``kead.adaptor_training``) on this source: ``product`` = its normal images with synthetic anomalies and
    its real masks (the product's recipe for a pretraining source, so the box figures of a mask source are
    in-sample for the adaptor); ``synthetic`` = normal images and synthetic anomalies only. Trained once per
    (source, mode, settings) under ``work/adaptors`` and reused; the training time is printed."""
    from agssp_pipeline.kead.adaptor import ADAPTOR_KIND, fit_adaptor, save_adaptor
    from agssp_pipeline.kead.encoders import build_encoder
    from agssp_pipeline.storage import StorageLayout
    from agssp_pipeline.training import checkpoint as ckpt

    layout = StorageLayout(str(work / "adaptors"))
    digest = hashlib.sha256(json.dumps(settings.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:8]
    run_id = f"{source}-{mode}-{digest}"
    target = ckpt.run_dir(layout, settings.encoder, run_id, kind=ADAPTOR_KIND)
    if not Path(target, ckpt.LINEAGE_FILE).exists():
        pool = index if mode == "product" else index.assign(mask_path=None)
        started = time.perf_counter()
        projector, report = fit_adaptor(build_encoder(settings, "cpu"), pool, references, settings.adaptor_training)
        report["training_seconds"] = round(time.perf_counter() - started, 1)
        save_adaptor(layout, settings.encoder, projector, {**report, "run_id": run_id})
    lineage = ckpt.read_lineage(target)
    print(f"adaptor ({source}, {mode}): {lineage['images']} images, {lineage['patches']} patches, "
          f"{lineage['steps']} steps, trained in {lineage.get('training_seconds', '?')} s")
    return settings.model_copy(update={"adaptor": target})


def source_maps(work: Path, source: SourceConfig, index: pd.DataFrame, settings: KeadSettings, args):
    """Maps of ``index`` through the pipeline's KeAD path (``kead.references`` strategy, the encoder the
    settings build, ``kead.runner.compute_anomaly_maps``) into a versioned Zarr store under ``work``
    (incremental: a rerun only reads it back).

    Returns the evaluated rows (references removed: they score themselves), maps, scores, seconds spent.
    """
    from agssp_pipeline.kead.encoders import build_encoder
    from agssp_pipeline.kead.references import select_references
    from agssp_pipeline.kead.runner import compute_anomaly_maps
    from agssp_pipeline.kead.store import read_map_table

    references = select_references(index, settings.k_shot, settings.reference_strategy, seed=args.seed)
    if args.adaptor:
        settings = adapted_settings(work, source.name, index, references, settings, args.adaptor)
    digest = hashlib.sha256(json.dumps(settings.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:8]
    store = str(work / "maps.zarr" / f"{source.name}_k{digest}_m{args.max_per_class}")
    started = time.perf_counter()
    run = compute_anomaly_maps(index, build_encoder(settings, "cpu"), store, references,
                               batch_size=settings.batch_size, num_workers=0)
    seconds = time.perf_counter() - started if run.computed else 0.0
    table = read_map_table(store)
    keep = np.isin(table.image_id, index["image_id"]) & ~np.isin(table.image_id, references["image_id"])
    ids = table.image_id[keep].astype(str)
    evaluated = index.drop_duplicates("image_id").set_index("image_id").loc[ids].reset_index()
    print(f"references ({source.name}): " + ", ".join(
        f"{c}: {len(g)} {'/'.join(sorted(set(g['reason'])))}" for c, g in references.groupby("category")))
    return evaluated, table.maps[keep], table.image_score[keep], seconds


def prepare(dataset: str, work: Path, kead: KeadSettings, args) -> list[Prepared]:
    """Ingest, map (or read cached maps) and load the ground truth of every source of ``dataset``."""
    sources, hidden = demo_sources(work) if dataset == "demo" else (real_sources(dataset), {})
    prepared = []
    for source in sources:
        result = ingest_source(source)
        index = result.images[result.images["duplicate_of"].isna()].reset_index(drop=True)
        annotations = hidden.get(source.name, result.annotations)
        annotations = annotations if len(annotations) else None
        index = subsample(index, result.annotations, args.max_per_class, args.seed)
        evaluated, maps, scores, seconds = source_maps(work, source, index, kead, args)
        ids = evaluated["image_id"].to_numpy(str)
        gt = ground_truth_boxes(evaluated, annotations)
        prepared.append(Prepared(source.name, ids, maps, scores, evaluated, annotations, gt,
                                 np.isin(ids, gt["image_id"].unique()), seconds))
    return prepared


def boxes_for(record: Prepared, settings: BoxesSettings) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Thresholds table, map statistics and pseudo-box table of one source under ``settings``."""
    stats = map_statistics(record.name, record.ids, record.maps, record.scores,
                           record.evaluated["category"].astype(str).to_numpy())
    thresholds = compute_category_thresholds(stats, settings)
    pseudo = build_pseudo_boxes(record.name, record.ids, record.maps, record.scores, record.evaluated,
                                thresholds, settings, "bench")
    return thresholds, stats, pseudo


def fmt(frame: pd.DataFrame) -> str:
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def box_summary(record: Prepared, pseudo: pd.DataFrame) -> dict:
    """Recall/precision at IoU 0.3 and 0.5 (pseudo and random), images flagged, box size vs GT size."""
    boxes = pseudo[pseudo["box_index"].notna()]
    rows = pd.DataFrame(box_quality_rows(boxes, record.gt, record.evaluated[["image_id", "width", "height"]]))
    out = {"source": record.name, "images": len(record.ids)}
    for method, prefix in (("pseudo", ""), ("random", "random ")):
        for iou in (0.3, 0.5):
            row = rows[(rows["method"] == method) & (rows["iou_threshold"] == iou)].iloc[0]
            out[f"{prefix}R@{iou}"] = row["recall"]
            if method == "pseudo":
                out[f"P@{iou}"] = row["precision"]
    flagged = pseudo.drop_duplicates("image_id")["judged_defective"].to_numpy(bool)
    out["flagged"] = float(flagged.mean())
    out["boxes/img"] = len(boxes) / max(1, int(flagged.sum()))
    gt_area = ((record.gt["x2"] - record.gt["x1"]) * (record.gt["y2"] - record.gt["y1"])).median()
    box_area = ((boxes["x2"] - boxes["x1"]) * (boxes["y2"] - boxes["y1"])).median() if len(boxes) else np.nan
    out["area/GT"] = float(box_area / gt_area) if gt_area else np.nan
    split = image_split_row(record.defective_gt, pseudo.drop_duplicates("image_id").set_index("image_id")
                            .loc[record.ids, "judged_defective"].to_numpy(bool), record.scores, "")
    out["img F1"], out["img BA"] = split["f1"], split["balanced_accuracy"]
    return out


def report(record: Prepared, settings: BoxesSettings) -> dict:
    """Per-source printout of the configured settings (the product's quality table); its summary row."""
    thresholds, _, pseudo = boxes_for(record, settings)
    print(f"\n=== {record.name}: {len(record.ids)} images evaluated ({int(record.defective_gt.sum())} with GT "
          f"defects), maps {record.maps.shape[1]}x{record.maps.shape[2]}"
          + (f", scored in {record.seconds:.0f} s" if record.seconds else " (cached maps)"))
    print(fmt(thresholds[["category", "n_images", "mean_max", "threshold_rule", "threshold", "image_split",
                          "image_cutoff", "n_judged_defective", "binarisation"]]))
    quality = evaluate_source(record.name, record.ids, record.maps, record.evaluated, record.annotations,
                              pseudo, thresholds, settings)
    boxes = quality[quality["view"] == "boxes"]
    print(fmt(boxes[["method", "iou_threshold", "n_pred", "n_gt", "tp", "recall", "precision", "f1"]]))
    print(fmt(quality[quality["view"] == "image"][["method", "n_images", "n_gt", "n_pred", "f1",
                                                     "balanced_accuracy", "auroc"]]))
    masks = quality[quality["view"] == "mask"]
    if len(masks):
        best_fixed = masks[(masks["method"] == "fixed") & masks["best"]].iloc[0]
        configured = masks[masks["configured"]].iloc[0]
        print(f"mask IoU at T_c (paper rule, delta {settings.delta}): {configured['mask_iou']:.3f}; best fixed "
              f"(oracle) threshold {best_fixed['threshold']:.3f}: {best_fixed['mask_iou']:.3f}")
    return box_summary(record, pseudo)


def sweep(records: list[Prepared], methods: dict[str, dict]) -> pd.DataFrame:
    """Recall/precision at IoU 0.3 (and 0.5) of every named method on every source, long format."""
    rows = []
    for name, overrides in methods.items():
        settings = BoxesSettings.model_validate(overrides)
        for record in records:
            _, _, pseudo = boxes_for(record, settings)
            rows.append({"method": name, **box_summary(record, pseudo)})
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
    return pd.DataFrame(rows)


def sweep_table(long: pd.DataFrame) -> pd.DataFrame:
    """One row per method: R@0.3 / P@0.3 per source, mean and worst over sources, ratio to random."""
    long = long.assign(lift=long["R@0.3"] / long["random R@0.3"].where(long["random R@0.3"] > 0))
    wide = long.pivot(index="method", columns="source", values=["R@0.3", "P@0.3"])
    wide.columns = [f"{metric} {source}" for metric, source in wide.columns]
    grouped = long.groupby("method")
    wide["mean R@0.3"] = grouped["R@0.3"].mean()
    wide["worst R@0.3"] = grouped["R@0.3"].min()
    wide["mean P@0.3"] = grouped["P@0.3"].mean()
    wide["worst lift"] = grouped["lift"].min()
    return wide.sort_values("mean R@0.3", ascending=False).reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="demo,magnetic_tile,neu_det")
    parser.add_argument("--kead", default="{}", help='JSON overrides of KeadSettings, e.g. {"image_size": 224}')
    parser.add_argument("--max-per-class", type=int, default=0, help="0 = every image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/agssp_box_quality")
    parser.add_argument("--settings", default="{}", help='JSON overrides of BoxesSettings, e.g. {"method": "paper"}')
    parser.add_argument("--sweep", action="store_true", help="compare every method of SWEEP on the cached maps")
    parser.add_argument("--sweep-extra", action="store_true", help="also vary the default's rule parameters")
    parser.add_argument("--methods", default="", help="comma-separated names of sweep methods to run (default all)")
    parser.add_argument("--adaptor", choices=["product", "synthetic"], default=None,
                        help="score with an ADPretrain adaptor trained on each source (see adapted_settings)")
    parser.add_argument("--maps-only", action="store_true", help="compute / refresh the map stores and stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    kead, differs = kead_settings(json.loads(args.kead))
    settings = BoxesSettings.model_validate(json.loads(args.settings))
    print("KeAD settings: " + json.dumps(kead.model_dump(mode="json"), sort_keys=True))
    print("differs from the product default: " + (json.dumps(differs) if differs else "nothing"))
    records = [r for dataset in args.datasets.split(",") for r in prepare(dataset, work, kead, args)]
    if args.maps_only:
        print("maps: " + ", ".join(f"{r.name} {len(r.ids)} ({r.seconds:.0f} s)" for r in records))
        return
    print("boxes settings: " + json.dumps(settings.model_dump(mode="json"), sort_keys=True))
    records = [r for r in records if len(r.gt) or r.evaluated.get("mask_path", pd.Series(dtype=object)).notna().any()]
    summary = pd.DataFrame([report(record, settings) for record in records])
    print(f"\n=== summary, boxes method {settings.rules()}")
    print(fmt(summary))
    if args.sweep:
        methods = sweep_methods(args.sweep_extra)
        if args.methods:
            wanted = args.methods.split(",")
            methods = {name: m for name, m in methods.items() if name in wanted}
        long = sweep(records, methods)
        long.to_csv(work / f"sweep_{args.datasets.replace(',', '_')}.csv", index=False)
        print("\n=== box methods on the same maps (R = recall, P = precision at IoU 0.3; lift = R / random R)")
        print(fmt(long))
        print(fmt(sweep_table(long)))


if __name__ == "__main__":
    main()
