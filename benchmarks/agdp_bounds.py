"""Why does the agssp start (the AGDP detector) finetune worse than agbp (its backbone alone)? Bounds and starts.

    nice .venv/bin/python benchmarks/agdp_bounds.py --config /path/agssp.yaml [--source magnetic_tile]
        [--downstream neu_det] [--agdp gt:on:unfrozen:detector,backbone_neck pseudo:off:frozen ...]
        [--agdp-epochs 3] [--finetune-epochs 8] [--image-size 128] [--train-images 480] [--val-images 160]
        [--seeds 0] [--out /tmp/agdp_bounds]

Reads a materialised pipeline run (``--config``: its storage root must hold the index and annotations of
``--source`` and ``--downstream``, the pseudo boxes of ``--source`` and a completed yolov8n backbone checkpoint);
writes only under ``--out``. Through the product's own functions:

1. AGDP (``detector.train_agdp`` with ``detector_train_settings``: the pipeline's recipe) on the images of the
   pseudo-box training set (``collect_pretrain_set``: positives, capped negatives, its val split) labelled three
   ways: ``gt`` the source's ground-truth boxes (upper bound), ``pseudo`` the pseudo boxes, ``random`` boxes of
   the same count and sizes per image at uniform random positions (lower bound). Each ``--agdp`` item is
   ``boxes:fold:freeze[:inits]``: from the AGBP backbone with (``on``) or without (``off``, the code before this
   fix) the input normalisation folded into layer 0 (``detector.fold_input_normalisation``), with the backbone
   ``frozen`` (``detector.freeze_backbone: true``, the paper) or ``unfrozen``; ``inits`` (comma-separated
   ``finetune.agssp_init`` values, default ``detector``) are the agssp starts finetuned from it.
2. Finetune (``finetune.run_variant``: the same YOLO settings as every variant, last-epoch weights scored with
   COCO mAP) on ``--train-images`` images of the downstream set, scored on ``--val-images`` others, from:
   scratch, agbp (fold off/on), and each AGDP detector as its ``inits``: ``detector`` (the paper), ``backbone_neck``
   (Detect head re-initialised), ``backbone`` (for a frozen AGDP backbone that is the agbp start, tensor for tensor).

``--source`` equal to ``--downstream`` (e.g. ``neu_det``, which has no pseudo boxes) splits that set in two seeded
halves: AGDP on the ground-truth (``gt``) or random boxes of one half, finetune on images of the other half only.

Prints one table (settings in its header) and writes it to ``<out>/agdp_bounds.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import agssp_pipeline  # noqa: E402,F401  (offline defaults)
from agssp_pipeline.config import load_config  # noqa: E402
from agssp_pipeline.storage import StorageLayout  # noqa: E402,TC001
from agssp_pipeline.training import checkpoint as ckpt  # noqa: E402
from agssp_pipeline.training.detector import (  # noqa: E402
    InitialWeights,
    PretrainSet,
    YoloTrainSettings,
    agssp_state,
    backbone_initial_weights,
    collect_pretrain_set,
    detector_train_settings,
    export_splits,
    train_agdp,
)
from agssp_pipeline.training.finetune import EvalSettings, load_labelled_dataset, run_variant  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="agssp.yaml of a materialised run (read only)")
    parser.add_argument("--source", default="magnetic_tile", help="pretraining source with GT boxes and pseudo boxes")
    parser.add_argument("--downstream", default="neu_det")
    parser.add_argument("--agdp", nargs="+", default=[
        "gt:on:unfrozen:detector,backbone_neck", "pseudo:on:unfrozen:detector,backbone_neck,backbone",
        "pseudo:on:frozen", "pseudo:off:frozen", "random:on:unfrozen"],
        help="AGDP runs as boxes:fold:freeze[:inits] (gt|pseudo|random, on|off, frozen|unfrozen, "
             "comma-separated detector|backbone_neck|backbone)")
    parser.add_argument("--agdp-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=480)
    parser.add_argument("--val-images", type=int, default=160)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/agdp_bounds"))
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- AGDP sets


def gt_boxes(layout: StorageLayout, source: str, pretrain: PretrainSet) -> pd.DataFrame:
    """Ground-truth boxes of the pretraining set's images, as the single class "defect"."""
    annotations = pd.read_parquet(layout.annotations(source))
    annotations = annotations[annotations["image_id"].isin(set(pretrain.images["image_id"]))]
    return annotations[["image_id", "x1", "y1", "x2", "y2"]].assign(class_id=0).reset_index(drop=True)


def random_boxes(pretrain: PretrainSet, seed: int = 0) -> pd.DataFrame:
    """The pseudo boxes' count and sizes per image, each moved to a uniform random position inside its image."""
    rng = np.random.default_rng(seed)
    sizes = pretrain.images.set_index("image_id")[["width", "height"]]
    boxes = pretrain.boxes.copy()
    width = (boxes["x2"] - boxes["x1"]).to_numpy(float)
    height = (boxes["y2"] - boxes["y1"]).to_numpy(float)
    image_w = sizes.loc[boxes["image_id"], "width"].to_numpy(float)
    image_h = sizes.loc[boxes["image_id"], "height"].to_numpy(float)
    boxes["x1"] = rng.uniform(0, 1, len(boxes)) * np.maximum(image_w - width, 0)
    boxes["y1"] = rng.uniform(0, 1, len(boxes)) * np.maximum(image_h - height, 0)
    boxes["x2"], boxes["y2"] = boxes["x1"] + width, boxes["y1"] + height
    return boxes


def gt_pretrain_set(layout: StorageLayout, source: str, image_ids: set[str], val_fraction: float,
                    seed: int = 0) -> PretrainSet:
    """A pretraining set of a labelled source's ``image_ids`` with its ground-truth boxes (no pseudo boxes needed)."""
    dataset = load_labelled_dataset(layout, source)
    images = dataset.images[dataset.images["image_id"].isin(image_ids)].reset_index(drop=True)
    boxes = dataset.annotations[dataset.annotations["image_id"].isin(image_ids)]
    is_val = np.zeros(len(images), bool)
    is_val[np.random.default_rng(seed).permutation(len(images))[:max(1, round(val_fraction * len(images)))]] = True
    images = images.assign(source=source, split=np.where(is_val, "val", "train"),
                           negative=~images["image_id"].isin(set(boxes["image_id"])))
    return PretrainSet(images, boxes[["image_id", "x1", "y1", "x2", "y2"]].assign(class_id=0), {})


def labelled_as(pretrain: PretrainSet, boxes: pd.DataFrame) -> PretrainSet:
    """The same images and split with other boxes (images without one become negatives)."""
    images = pretrain.images.assign(negative=~pretrain.images["image_id"].isin(set(boxes["image_id"])))
    return replace(pretrain, images=images, boxes=boxes.reset_index(drop=True))


def unfolded_backbone(run_dir: str) -> InitialWeights:
    """The AGBP backbone as the code before the fix injected it: layers 0..9, input normalisation ignored."""
    state, lineage = ckpt.load_checkpoint(run_dir)
    return InitialWeights("agbp", ckpt.backbone_state_for_detector(state), ckpt.BACKBONE_PREFIXES,
                          {**lineage, "checkpoint": run_dir})


# ---------------------------------------------------------------------------------------------------- finetune


def halves(layout: StorageLayout, name: str, seed: int = 0) -> tuple[set[str], set[str]]:
    """Two seeded, disjoint halves of a labelled source's image ids (AGDP source, downstream)."""
    ids = load_labelled_dataset(layout, name).images["image_id"].to_numpy()
    order = np.random.default_rng(seed + 1).permutation(len(ids))
    return set(ids[order[: len(ids) // 2]]), set(ids[order[len(ids) // 2:]])


def downstream_split(layout: StorageLayout, name: str, n_train: int, n_val: int, seed: int = 0,
                     allowed: set[str] | None = None):
    """A seeded, disjoint train/val subsample of the downstream set (images, boxes, class names)."""
    dataset = load_labelled_dataset(layout, name)
    if allowed is not None:
        dataset.images = dataset.images[dataset.images["image_id"].isin(allowed)].reset_index(drop=True)
    order = np.random.default_rng(seed).permutation(len(dataset.images))
    train = dataset.images.iloc[order[:n_train]].reset_index(drop=True)
    val = dataset.images.iloc[order[n_train:n_train + n_val]].reset_index(drop=True)
    return dataset, train, val


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    layout = config.layout()
    out = args.out.resolve()
    backbone_run = ckpt.latest_checkpoint_dir(layout, config.detector.backbone)
    starts = {"on": backbone_initial_weights(backbone_run), "off": unfolded_backbone(backbone_run)}

    detector = config.detector.model_copy(update={"epochs": args.agdp_epochs, "image_size": args.image_size})
    downstream_ids = None
    if args.source == args.downstream:  # no pseudo boxes: GT and random boxes of one half, finetune on the other
        source_ids, downstream_ids = halves(layout, args.source)
        pretrain = gt_pretrain_set(layout, args.source, source_ids, detector.val_fraction, detector.seed)
        box_sets = {"gt": pretrain.boxes, "random": random_boxes(pretrain, detector.seed)}
    else:
        pretrain = collect_pretrain_set(layout, [args.source], detector.val_fraction, detector.seed,
                                        detector.max_negative_ratio)
        box_sets = {"pseudo": pretrain.boxes, "gt": gt_boxes(layout, args.source, pretrain),
                    "random": random_boxes(pretrain, detector.seed)}
    print(f"AGDP images {pretrain.counts()}; boxes: " + ", ".join(f"{k} {len(v)}" for k, v in box_sets.items()),
          flush=True)
    detectors: dict[tuple[str, str, str], tuple[dict, float, list[str]]] = {}
    for item in args.agdp:
        kind, fold, freeze, *inits = item.split(":")
        agdp_settings = detector_train_settings(detector.model_copy(update={"freeze_backbone": freeze == "frozen"}))
        started = time.perf_counter()
        result, _ = train_agdp(labelled_as(pretrain, box_sets[kind]), starts[fold], agdp_settings,
                               out / "exports" / f"agdp_{kind}", out / "agdp" / f"{kind}_{fold}_{freeze}")
        agdp_map = 100 * result.ultralytics_metrics.get("metrics/mAP50(B)", float("nan"))
        detectors[(kind, fold, freeze)] = (result.final_state_dict, agdp_map, (inits or ["detector"])[0].split(","))
        print(f"AGDP {kind:6s} fold {fold:3s} {freeze:8s}: val mAP50 on its own boxes {agdp_map:.1f} % "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    dataset, train, val = downstream_split(layout, args.downstream, args.train_images, args.val_images,
                                           allowed=downstream_ids)
    val_boxes = dataset.annotations[dataset.annotations["image_id"].isin(set(val["image_id"]))]
    data_yaml = export_splits({"train": train, "val": val}, dataset.annotations, dataset.class_names,
                              out / "exports" / "finetune")
    settings = YoloTrainSettings(model=config.detector.model, backbone=config.detector.backbone,
                                 epochs=args.finetune_epochs, image_size=args.image_size,
                                 batch_size=config.finetune.batch_size, device=config.finetune.device,
                                 workers=config.finetune.workers, val=False, plots=False,
                                 extra_args=dict(config.finetune.train_args))
    runs: list[tuple[str, str, str, str, str, InitialWeights | None, float]] = [
        ("scratch", "-", "-", "-", "-", None, float("nan"))]
    runs += [("agbp", "-", fold, "-", "-", starts[fold], float("nan")) for fold in ("off", "on")]
    for (kind, fold, freeze), (state, agdp_map, inits) in detectors.items():
        for init in inits:
            initial = InitialWeights("agssp", agssp_state(state, init), ckpt.BACKBONE_PREFIXES, {"agssp_init": init})
            runs.append(("agssp", kind, fold, freeze, init, initial, agdp_map))
    rows = []
    for seed in args.seeds:
        for variant, kind, fold, freeze, init, initial, agdp_map in runs:
            name = "_".join(x for x in (variant, kind, fold, freeze, init, f"s{seed}") if x != "-")
            row = run_variant(dataset, "bounds", data_yaml, val, val_boxes, variant, initial,
                              replace(settings, seed=seed), EvalSettings(), out / "runs",
                              str(out / "published" / name), run_name=name).row
            rows.append({"start": variant, "agdp_boxes": kind, "fold": fold, "agdp_backbone": freeze,
                         "agssp_init": init, "seed": seed,
                         "agdp_val_map50_pct": round(agdp_map, 1), "map50_pct": round(row["map50_pct"], 1),
                         "map50_95_pct": round(row["map50_95_pct"], 1),
                         "tensors_loaded": row.get("tensors_loaded"), "seconds": round(row["train_seconds"])})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    header = (f"AGDP on {args.source} ({pretrain.counts()['images_train']} train images, {args.agdp_epochs} epochs, "
              f"{args.image_size} px); finetune on {args.downstream}: {len(train)} train / "
              f"{len(val)} val images, {args.finetune_epochs} epochs, {args.image_size} px, batch "
              f"{settings.batch_size}, seeds {args.seeds}; backbone {backbone_run}")
    markdown = header + "\n\n" + table.to_markdown(index=False)
    print("\n" + markdown)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agdp_bounds.md").write_text(markdown + "\n")
    table.to_csv(out / "agdp_bounds.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
