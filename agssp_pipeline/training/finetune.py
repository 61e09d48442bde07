"""Finetune evaluations: does AGSSP pretraining help on small labelled sets? (the paper's Table 2).

For every downstream dataset (sources with role downstream/both) and every variant of initial weights
(``scratch``; ``agbp``: the AGBP backbone only; ``agssp``: the full AGDP detector; plus user files named in
``finetune.extra_weights``) we finetune the same YOLOv8 with the same epochs, image size, seed, batch and
augmentation on a fixed stored split (``training/splits.py``), then measure COCO mAP@0.5 and mAP@0.5:0.95 on the
val split with faster-coco-eval, and ultralytics' own figures beside them.

Choices that keep the comparison honest:
- the weights evaluated are those of the *last* epoch (``last.pt``), not ``best.pt``: ultralytics picks best.pt on
  the same val split we report, which would let each variant select its own lucky epoch on the test data;
- pretraining and downstream image ids must not overlap (content hashes: copies across sources are caught too);
- duplicate images inside a dataset are dropped before splitting, so a copy cannot sit in train and val at once.

Outputs (one writer, ``write_evaluation_tables``): ``storage_root/evaluations/finetune/<dataset>.parquet`` (one
row per regime x variant), ``<dataset>.per_class.parquet`` (AP per class) and ``<dataset>.md`` (the comparison).
ultralytics needs local folders: the YOLO export is ``layout.export_dir("finetune", <dataset>, <regime>)`` and the
runs train in ``layout.scratch("runs", "finetune", <dataset>)``; the files of a run worth keeping (``RUN_FILES``:
last-epoch weights, results.csv, plots, COCO JSON) are published to ``runs/finetune/<dataset>/<regime>/<variant>/``
under the storage root, and the table's paths name those published copies.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agssp_pipeline import artifact_io
from agssp_pipeline.eval.coco_map import evaluate_detections, write_coco_files
from agssp_pipeline.eval.comparison_chart import variant_chart
from agssp_pipeline.eval.intervals import match_run
from agssp_pipeline.records import STALE, Input, Record, plain
from agssp_pipeline.storage import StorageLayout
from agssp_pipeline.training.checkpoint import BACKBONE, DETECTOR, checkpoint_kind
from agssp_pipeline.training.detector import (
    InitialWeights,
    YoloTrainSettings,
    export_splits,
    resolve_device,
    train_yolo,
)
from agssp_pipeline.training.finetune_table import (  # noqa: F401  (re-exported)
    add_deltas,
    comparison_markdown,
    not_applicable_row,
    summarise,
    worse_than_scratch,
)
from agssp_pipeline.training.splits import (
    SplitParams,
    few_shot_column,
    first_copies,
    labelled_set_fingerprint,
    load_or_create_split,
    read_split,
    split_path,
    split_summary,
)
from agssp_pipeline.training.variants import (  # noqa: F401  (re-exported: the variant API of this stage)
    VARIANTS,
    VariantContext,
    VariantNotApplicable,
    describe,
    initial_weights_for,
    latest_backbone_runs,
)

LOGGER = logging.getLogger(__name__)
BASELINE_VARIANT = "scratch"
FULL_REGIME = "full"
# files of an ultralytics run folder published beside the evaluation (relative glob patterns)
# ultralytics' figures: results.png and curves of the training run (top level), and of our own val of the
# evaluated last-epoch weights (val/: PR curve, confusion matrix, a few prediction and label images)
RUN_FILES = ("weights/last.pt", "results.csv", "args.yaml", "*.png", "coco/*.json", "val/*.png",
             "val/val_batch*_pred.jpg", "val/val_batch*_labels.jpg")


class DataOverlapError(ValueError):
    """Pretraining and downstream sources share images: the evaluation would measure memorisation."""


# ---------------------------------------------------------------------------------------------------------------
# data


@dataclass
class LabelledDataset:
    """A downstream dataset as the evaluation sees it: deduplicated images and their GT boxes."""

    name: str
    images: pd.DataFrame  # image_id, path, width, height
    annotations: pd.DataFrame  # image_id, class_name, x1, y1, x2, y2
    class_names: list[str]
    dropped_duplicates: int = 0


def _read_index_ids(layout: StorageLayout, source: str) -> pd.Series:
    path = layout.index(source)
    if not artifact_io.exists(path):
        raise FileNotFoundError(f"image index of source '{source}' missing at {path}: materialize image_index first")
    return artifact_io.read_parquet(path, columns=["image_id"])["image_id"].astype(str)


def check_no_overlap(layout: StorageLayout, pretrain_sources: Sequence[str], downstream_sources: Sequence[str]) -> None:
    """Refuse image ids present both in a pretraining source and in a downstream source."""
    pretrain: dict[str, str] = {}
    for source in pretrain_sources:
        for image_id in _read_index_ids(layout, source):
            pretrain.setdefault(image_id, source)
    problems = []
    for source in downstream_sources:
        ids = set(_read_index_ids(layout, source))
        shared = sorted(ids & set(pretrain))
        if shared:
            examples = ", ".join(f"{i} (also in {pretrain[i]})" for i in shared[:3])
            problems.append(f"downstream source '{source}' shares {len(shared)} of its {len(ids)} images with "
                            f"pretraining sources, e.g. {examples}")
    if problems:
        raise DataOverlapError(
            "pretraining and downstream images overlap, which would inflate the AGSSP rows: "
            + "; ".join(problems)
            + ". Give downstream datasets role 'downstream' only and keep their images out of pretraining sources."
        )


def kead_reference_overlap(layout: StorageLayout, pretrain_sources: Sequence[str],
                           downstream_ids: set[str]) -> dict[str, int]:
    """Downstream images used as KeAD normal references for a pretraining source's maps (source -> count).

    Weaker than an image overlap (references only shape the anomaly maps that become pseudo boxes), so it is
    reported rather than refused; the clean fix is a reference pool without downstream sources.
    """
    from agssp_pipeline.kead.store import LazyMaps

    found: dict[str, int] = {}
    for source in pretrain_sources:
        try:
            attrs = LazyMaps(layout.maps_store(source)).attrs
        except (FileNotFoundError, KeyError, ValueError, OSError):
            continue  # no maps (yet): nothing to compare
        references = {str(i) for ids in (attrs.get("references") or {}).values() for i in ids}
        shared = len(references & downstream_ids)
        if shared:
            found[source] = shared
    return found


def load_labelled_dataset(layout: StorageLayout, source: str, classes: Sequence[str] = ()) -> LabelledDataset:
    """Index + annotations of a downstream source, first copies only (duplicates dropped with their boxes)."""
    index_path, annotation_path = layout.index(source), layout.annotations(source)
    for path, what in ((index_path, "image index"), (annotation_path, "annotations")):
        if not artifact_io.exists(path):
            raise FileNotFoundError(f"{what} of downstream source '{source}' missing at {path}")
    index = artifact_io.read_parquet(index_path)
    annotations = artifact_io.read_parquet(annotation_path)
    kept, annotations = first_copies(index, annotations)
    dropped = len(index) - len(kept)
    names = list(classes) or sorted(annotations["class_name"].astype(str).unique())
    if not names:
        raise ValueError(f"downstream source '{source}' has no annotated boxes: nothing to evaluate")
    unknown = set(annotations["class_name"]) - set(names)
    if unknown:
        raise ValueError(f"annotations of '{source}' use classes {sorted(unknown)} missing from its classes list")
    images = kept[["image_id", "path", "width", "height"]].reset_index(drop=True)
    boxes = annotations[["image_id", "class_name", "x1", "y1", "x2", "y2"]].reset_index(drop=True)
    return LabelledDataset(source, images, boxes, names, dropped)


# ---------------------------------------------------------------------------------------------------------------
# variants: the one registry lives in ``variants.py`` (re-exported here for callers of this module)

# ---------------------------------------------------------------------------------------------------------------
# one variant: train, predict, score


@dataclass
class EvalSettings:
    """Prediction settings of the COCO evaluation (the COCO protocol: low conf, 100 detections)."""

    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 100
    coco_backend: str = "faster_coco_eval"


def predict_detections(weights: Path, images: pd.DataFrame, class_names: Sequence[str], image_size: int,
                       device: str, evaluation: EvalSettings, batch: int = 16) -> pd.DataFrame:
    """Detection rows (image_id, class_name, score, x1..y2 in original pixels) of a trained model."""
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    rows: list[tuple] = []
    paths = images["path"].tolist()
    ids = images["image_id"].tolist()
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        results = model.predict(chunk, imgsz=image_size, conf=evaluation.conf, iou=evaluation.iou,
                                max_det=evaluation.max_det, device=resolve_device(device), batch=len(chunk),
                                verbose=False)
        for image_id, result in zip(ids[start:start + batch], results, strict=True):
            boxes = result.boxes
            if boxes is None or len(boxes) == 0:
                continue
            xyxy = boxes.xyxy.cpu().numpy().astype(float)
            scores = boxes.conf.cpu().numpy().astype(float)
            classes = boxes.cls.cpu().numpy().astype(int)
            for (x1, y1, x2, y2), score, cls in zip(xyxy, scores, classes, strict=True):
                rows.append((image_id, class_names[cls], score, x1, y1, x2, y2))
    return pd.DataFrame(rows, columns=["image_id", "class_name", "score", "x1", "y1", "x2", "y2"])


def ultralytics_val(weights: Path, data_yaml: Path, image_size: int, batch: int, device: str,
                    evaluation: EvalSettings, project: Path, plots: bool = True) -> dict[str, float]:
    """ultralytics' own mAP on the same val split (its matching and 101-point interpolation); its figures
    (PR curve, confusion matrix, val batch predictions) land in ``project/val``."""
    from ultralytics import YOLO

    metrics = YOLO(str(weights), task="detect").val(
        data=str(data_yaml), split="val", imgsz=image_size, batch=batch, conf=evaluation.conf, iou=evaluation.iou,
        max_det=evaluation.max_det, device=resolve_device(device), plots=plots, verbose=False,
        project=str(project), name="val", exist_ok=True, workers=0,
    )
    return {"map50": float(metrics.box.map50), "map50_95": float(metrics.box.map)}


def starts_from(variant: str, lineage: dict[str, Any]) -> str:
    """What a variant's run started from, in words: the mode's description and the run or file behind it."""
    description = describe(variant)[1]
    if lineage.get("agssp_init") not in (None, "detector"):  # finetune.agssp_init: only part of the detector
        description += f" [{lineage['agssp_init']} only, the rest re-initialised]"
    if lineage.get("run_id"):
        return f"{description}, run {lineage['run_id']}"
    source = lineage.get("checkpoint")
    return f"{description} {artifact_io.name(str(source))}" if source else description


@dataclass
class VariantResult:
    row: dict[str, Any]
    per_class: pd.DataFrame
    lineage: dict[str, Any]
    detections: pd.DataFrame | None = None  # the val predictions scored (for the bootstrap intervals)


def publish_run(run_dir: Path, uri: str) -> dict[str, str]:
    """Copy the kept files of a local run folder (``RUN_FILES``) to ``uri``; relative name -> published address.

    The run folder itself is scratch (ultralytics writes there); these copies are what the table points at.
    """
    published: dict[str, str] = {}
    for pattern in RUN_FILES:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_file():
                relative = path.relative_to(run_dir).as_posix()
                published[relative] = artifact_io.write_bytes(artifact_io.join(uri, relative), path.read_bytes())
    return published


def run_variant(
    dataset: LabelledDataset,
    regime: str,
    data_yaml: Path,
    val_images: pd.DataFrame,
    val_boxes: pd.DataFrame,
    variant: str,
    initial: InitialWeights | None,
    train_settings: YoloTrainSettings,
    evaluation: EvalSettings,
    run_root: Path,
    publish_uri: str,
    log: Callable[[str], None] | None = None,
    run_name: str | None = None,
) -> VariantResult:
    """Train one variant in ``run_root/regime/<run_name or variant>`` (local), score it, publish its kept files to
    ``publish_uri``. ``log`` gets one line per epoch (epoch/total, losses, ETA)."""
    started = time.perf_counter()
    run_name = run_name or variant
    result = train_yolo(data_yaml, train_settings, run_root / regime, run_name, initial=initial, log=log,
                        log_label=f"finetune {dataset.name}/{regime}/{run_name}")
    train_seconds = time.perf_counter() - started
    detections = predict_detections(result.last_pt, val_images, dataset.class_names, train_settings.image_size,
                                    train_settings.device, evaluation, batch=train_settings.batch_size)
    metrics = evaluate_detections(val_images, val_boxes, detections, dataset.class_names,
                                  backend=evaluation.coco_backend)
    write_coco_files(val_images, val_boxes, detections, dataset.class_names, str(result.run_dir / "coco"))
    ultra = ultralytics_val(result.last_pt, data_yaml, train_settings.image_size, train_settings.batch_size,
                            train_settings.device, evaluation, result.run_dir, train_settings.plots)
    published = publish_run(result.run_dir, publish_uri)
    lineage = dict(initial.lineage) if initial is not None else {}
    row = {
        "dataset": dataset.name,
        "regime": regime,
        "variant": variant,
        "mode": describe(variant)[0],
        "status": "ok",
        "note": "",
        "map50_pct": 100 * metrics.map50,
        "map50_95_pct": 100 * metrics.map50_95,
        "ultralytics_map50_pct": 100 * ultra["map50"],
        "ultralytics_map50_95_pct": 100 * ultra["map50_95"],
        "model": train_settings.model,
        "backbone": train_settings.backbone or train_settings.model,
        "epochs": train_settings.epochs,
        "imgsz": train_settings.image_size,
        "batch": train_settings.batch_size,
        "seed": int(result.train_args.get("seed", train_settings.seed)),  # what ultralytics trained with
        "val_images": len(val_images),
        "val_boxes": len(val_boxes),
        "detections": metrics.num_detections,
        "initial_weights": initial.name if initial is not None else "random init",
        "starts_from": starts_from(variant, lineage),
        "initial_digest": result.initial_digest,
        "tensors_loaded": len(result.injection.loaded) if result.injection else 0,
        "checkpoint": lineage.get("checkpoint"),
        "checkpoint_run_id": lineage.get("run_id"),
        "checkpoint_lineage": json.dumps(lineage, default=str, sort_keys=True) if lineage else None,
        "evaluated_weights": published["weights/last.pt"],
        "coco_results": published["coco/coco_results.json"],
        "coco_ground_truth": published["coco/coco_ground_truth.json"],
        "train_seconds": round(train_seconds, 1),
    }
    per_class = pd.DataFrame({
        "dataset": dataset.name, "regime": regime, "variant": variant, "seed": row["seed"],
        "class_name": dataset.class_names,
        "ap50": [metrics.per_class_ap50.get(n, np.nan) for n in dataset.class_names],
        "ap50_95": [metrics.per_class_ap50_95.get(n, np.nan) for n in dataset.class_names],
    })
    return VariantResult(row, per_class, lineage, detections)


# ---------------------------------------------------------------------------------------------------------------
# one dataset, all variants


@dataclass
class DatasetEvaluation:
    dataset: str
    table: pd.DataFrame
    per_class: pd.DataFrame
    split_meta: dict[str, Any]
    split_counts: pd.DataFrame
    lineage: dict[str, dict[str, Any]]  # variant -> checkpoint lineage
    table_path: str
    per_class_path: str
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)  # per variant: mean/std over seeds, intervals
    summary_path: str | None = None


def _regimes(split: pd.DataFrame, few_shot: int | Sequence[int] | None) -> dict[str, pd.Series]:
    """full (the train split) and ``few<N>`` per few-shot size, each evaluated on the same val images."""
    regimes = {FULL_REGIME: split["split"] == "train"}
    for size in SplitParams(0.5, 0, few_shot).few_shot_sizes():
        column = few_shot_column(size) if few_shot_column(size) in split else "few_shot"
        regimes[f"few{size}"] = split[column].astype(bool)
    return regimes


def _initial_or_reason(variants: Sequence[str], context: VariantContext) -> dict[str, InitialWeights | str | None]:
    """Initial weights per variant, or the reason it is not applicable; other errors raise before any training."""
    initial: dict[str, InitialWeights | str | None] = {}
    for variant in variants:
        try:
            initial[variant] = initial_weights_for(variant, context)
        except VariantNotApplicable as reason:
            initial[variant] = str(reason)
    return initial


def evaluate_dataset(
    layout: StorageLayout,
    dataset: LabelledDataset,
    variants: Sequence[str],
    context: VariantContext,
    train_settings: YoloTrainSettings,
    split_params: SplitParams,
    evaluation: EvalSettings,
    log: Callable[[str], None] = LOGGER.info,
    pretrain_sources: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
    replicates: int = 500,
    few_shot_epochs: int | None = None,
) -> DatasetEvaluation:
    """Split (stored, one split for every seed), export, and run every variant x seed on every regime.

    Few-shot regimes train ``few_shot_epochs`` epochs (None: the full regime's)."""
    split, split_meta = load_or_create_split(layout, dataset.name, dataset.images, dataset.annotations, split_params)
    references = kead_reference_overlap(layout, pretrain_sources, set(dataset.images["image_id"]))
    if references:
        log(f"WARNING: images of {dataset.name} served as KeAD normal references for pretraining maps: {references}")
    split_meta = {**split_meta, "kead_reference_overlap": references}
    few_columns = [c for c in split.columns if c.startswith("few_shot")]
    images = dataset.images.merge(split[["image_id", "split", *few_columns]], on="image_id", validate="one_to_one")
    val_images = images[images["split"] == "val"].reset_index(drop=True)
    val_boxes = dataset.annotations[dataset.annotations["image_id"].isin(set(val_images["image_id"]))]
    initial = _initial_or_reason(variants, context)  # fail before training
    seeds = list(seeds) if seeds else [train_settings.seed]
    rows, per_class, lineage, matches = [], [], {}, {}
    run_root = layout.scratch("runs", "finetune", dataset.name)
    for regime, train_mask in _regimes(images, split_params.few_shot_train_images).items():
        export_dir = layout.export_dir("finetune", dataset.name, regime)
        data_yaml = export_splits(
            {"train": images[train_mask.to_numpy()], "val": val_images}, dataset.annotations,
            dataset.class_names, export_dir,
        )
        counts = {"train_images": int(train_mask.sum()), "val_images": len(val_images)}
        epochs = train_settings.epochs if regime == FULL_REGIME or few_shot_epochs is None else few_shot_epochs
        for variant in variants:
            if isinstance(initial[variant], str):
                log(f"finetune {dataset.name}/{regime}/{variant}: not applicable ({initial[variant]})")
                rows.append(not_applicable_row(dataset.name, regime, variant, describe(variant)[0], initial[variant],
                                               {"model": train_settings.model, **counts}))
                continue
            for seed in seeds:
                name = variant if len(seeds) == 1 else f"{variant}_seed{seed}"
                settings = replace(train_settings, seed=seed, epochs=epochs)
                log(f"finetune {dataset.name}/{regime}: variant {variant}, seed {seed} ({settings.epochs} epochs)")
                result = run_variant(dataset, regime, data_yaml, val_images, val_boxes, variant, initial[variant],
                                     settings, evaluation, run_root,
                                     layout.path("runs", "finetune", dataset.name, regime, name), log, name)
                log(f"finetune {dataset.name}/{regime}/{name}: mAP@0.5 {result.row['map50_pct']:.1f} %, "
                    f"mAP@0.5:0.95 {result.row['map50_95_pct']:.1f} % ({result.row['train_seconds']:.0f} s)")
                result.row.update(counts)
                rows.append(result.row)
                per_class.append(result.per_class)
                lineage[variant] = result.lineage
                matches[(regime, variant, result.row["seed"])] = match_run(
                    val_images["image_id"].tolist(), val_boxes, result.detections, dataset.class_names)
    table = add_deltas(pd.DataFrame(rows))
    summary = summarise(table, matches, replicates)
    per_class_table = pd.concat(per_class, ignore_index=True) if per_class else pd.DataFrame()
    table_path, per_class_path, summary_path = write_evaluation_tables(layout, dataset.name, table,
                                                                       per_class_table, summary, replicates)
    return DatasetEvaluation(dataset.name, table, per_class_table, split_meta, split_summary(split), lineage,
                             table_path, per_class_path, summary, summary_path)


def write_evaluation_tables(layout: StorageLayout, dataset: str, table: pd.DataFrame, per_class: pd.DataFrame,
                            summary: pd.DataFrame, replicates: int | None = None) -> tuple[str, str, str]:
    """The one writer of ``evaluations/finetune/<dataset>{.parquet,.per_class.parquet,.summary.parquet,.md,.png}``."""
    table_path = artifact_io.write_parquet(layout.evaluations("finetune", dataset), table)
    per_class_path = artifact_io.write_parquet(layout.evaluations("finetune", f"{dataset}.per_class"), per_class)
    summary_path = artifact_io.write_parquet(layout.evaluations("finetune", f"{dataset}.summary"), summary)
    artifact_io.write_text(layout.evaluations("finetune", dataset, ".md"),
                           comparison_markdown(summary, table, replicates) + "\n")
    if not summary.empty:
        artifact_io.write_bytes(layout.evaluations("finetune", dataset, ".png"), variant_chart(summary, dataset))
    return table_path, per_class_path, summary_path


def evaluation_record(uri: str, layout: StorageLayout) -> Record:
    """What an evaluation table used: per variant the initial checkpoint (its digest and lineage) and the split.

    The table does not record the index version of its dataset; the stored split's fingerprint of the
    labelled set is compared with the same fingerprint of the index now (``labelled_set_fingerprint``).
    """
    table = artifact_io.read_parquet(uri)
    dataset = str(table["dataset"].iloc[0]) if "dataset" in table and len(table) else artifact_io.name(uri)
    record = Record(f"evaluation {dataset}", label=f"dataset {dataset}")
    columns = [c for c in ("regime", "variant", "seed", "map50_pct", "map50_95_pct", "delta_map50_95_pct",
                           "status", "checkpoint_run_id") if c in table]
    record.fields["rows"] = {
        f"{r.get('regime', '-')}/{r.get('variant', '-')}" + (f"/seed {plain(r['seed'])}" if not pd.isna(
            r.get("seed", np.nan)) else ""): {k: plain(r[k]) for k in columns[3:] if not pd.isna(r[k])}
        for r in table[columns].to_dict("records")}
    record.fields.update({k: plain(table[k].iloc[0]) for k in ("model", "epochs", "imgsz", "seed")
                          if k in table and len(table)})
    written = datetime.fromtimestamp(artifact_io.modified_time(uri) or 0, UTC)
    record.fields["written"] = written.isoformat(timespec="seconds")
    _check_split(record, layout, dataset)
    record.notes.append(("index", f"evaluation tables do not record the index version of their dataset "
                                  f"({dataset}); the stored split's fingerprint is compared instead (stage 7)"))
    record.inputs = [Input("index", dataset)]
    for row in table.drop_duplicates("checkpoint").to_dict("records") if "checkpoint" in table else []:
        checkpoint = row.get("checkpoint")
        if not isinstance(checkpoint, str) or not checkpoint:
            continue
        lineage = json.loads(row["checkpoint_lineage"]) if row.get("checkpoint_lineage") else {}
        kind = checkpoint_kind(lineage)
        if kind not in (BACKBONE, DETECTOR):
            record.notes.append(("evaluation", f"variant {row.get('variant')} started from {checkpoint}: "
                                               "not a pipeline checkpoint, no lineage beyond the file"))
            continue
        digest = row.get("initial_digest") if isinstance(row.get("initial_digest"), str) else None
        record.inputs.append(Input(kind, artifact_io.canonical(checkpoint), checkpoint, digest, lineage=lineage))
    variants = set(table.get("variant", pd.Series(dtype=str)))
    if "agssp" not in variants:
        record.notes.append(("detector", f"evaluation {dataset} has no agssp variant (no detector checkpoint used)"))
    if not variants & {"agbp", "agssp"}:
        record.notes.append(("backbone", f"evaluation {dataset} used no pipeline checkpoint"))
    return record


def evaluations_using(layout: StorageLayout, run_dirs: Sequence[str]) -> list[str]:
    """The evaluation tables under ``layout`` with a variant that started from a checkpoint in ``run_dirs``."""
    found = []
    for uri in artifact_io.glob(layout.evaluations("finetune", "*")):
        table = artifact_io.read_parquet(uri) if not uri.endswith(".per_class.parquet") else pd.DataFrame()
        named = table["checkpoint"].dropna().astype(str) if "checkpoint" in table else []
        if any(artifact_io.same_location(c, run) for c in named for run in run_dirs):
            found.append(artifact_io.canonical(uri))
    return found


def _check_split(record: Record, layout: StorageLayout, dataset: str) -> None:
    """The stored split's fingerprint of the labelled set vs the same fingerprint of the index as it is now."""
    uri = split_path(layout, dataset)
    stored = read_split(uri)
    if stored is None:
        record.fields["split"] = "no stored split found"
        return
    meta = stored[1]
    record.fields["split"] = {"path": uri, "fingerprint": meta.get("fingerprint"), "params": meta.get("params")}
    index_uri, annotations_uri = layout.index(dataset), layout.annotations(dataset)
    if meta.get("fingerprint") and artifact_io.is_file(index_uri) and artifact_io.is_file(annotations_uri):
        now = labelled_set_fingerprint(artifact_io.read_parquet(index_uri), artifact_io.read_parquet(annotations_uri))
        record.fields["labelled set fingerprint now"] = now
        if now != meta["fingerprint"]:
            record.flags.append((STALE, f"the labelled set of {dataset} changed since it was split and evaluated "
                                        f"(split fingerprint {meta['fingerprint']}, now {now})"))


# ---------------------------------------------------------------------------------------------------------------
# the whole stage from a pipeline config


def train_settings_from(config) -> YoloTrainSettings:
    """The recipe every variant and seed shares; the detector's backbone is ``detector.backbone``."""
    finetune = config.finetune
    if "seed" in finetune.train_args:
        raise ValueError("finetune.train_args.seed would override the seed of every run (and the table would not "
                         "know it): set finetune.seed (first seed) and finetune.seeds (how many) instead")
    return YoloTrainSettings(
        model=config.detector.model, backbone=config.detector.backbone, epochs=finetune.epochs,
        image_size=finetune.image_size,
        batch_size=finetune.batch_size, device=finetune.device, seed=finetune.seed, workers=finetune.workers,
        # no per-epoch validation: we evaluate the last epoch, so ultralytics' epoch selection would only cost time
        freeze_layers=None, val=False, plots=finetune.plots, extra_args=dict(finetune.train_args),
    )


def variant_context_from(config, backbone_checkpoint: str | None = None,
                         detector_checkpoint: str | None = None) -> VariantContext:
    """Checkpoints to use: the given ones, else the latest completed runs of the configured names (for
    ``domain`` and ``agbp``: the newest backbone runs with distillation off / on, told apart by their lineage)."""
    from agssp_pipeline.training.checkpoint import DETECTOR, latest_checkpoint_dir

    layout = config.layout()
    variants = set(config.finetune.variants)
    backbone = config.detector.backbone
    agbp_run, domain_run = latest_backbone_runs(layout, backbone) if variants & {"agbp", "domain"} else (None, None)
    if backbone_checkpoint is None and "agbp" in variants:
        backbone_checkpoint = agbp_run or latest_checkpoint_dir(layout, backbone)
    if detector_checkpoint is None and "agssp" in variants:
        detector_checkpoint = latest_checkpoint_dir(layout, config.detector.model, kind=DETECTOR)
    return VariantContext(backbone_checkpoint, detector_checkpoint, dict(config.finetune.extra_weights),
                          domain_run, backbone, config.finetune.image_size, config.finetune.agssp_init)


def run_finetune_evaluation(
    config,
    datasets: Sequence[str] | None = None,
    backbone_checkpoint: str | None = None,
    detector_checkpoint: str | None = None,
    log: Callable[[str], None] = LOGGER.info,
) -> list[DatasetEvaluation]:
    """Evaluate every variant on every downstream dataset of ``config`` (after the overlap guard)."""
    layout = config.layout()
    downstream = [s for s in config.downstream_sources() if datasets is None or s.name in datasets]
    if not downstream:
        raise ValueError("no downstream sources configured (role: downstream) to evaluate on")
    pretrain = [s.name for s in config.pretrain_sources()]
    check_no_overlap(layout, pretrain, [s.name for s in downstream])
    finetune = config.finetune
    settings = train_settings_from(config)  # refuses a recipe it cannot report before looking for checkpoints
    variants = list(dict.fromkeys([*finetune.variants, *finetune.extra_weights]))
    context = variant_context_from(config, backbone_checkpoint, detector_checkpoint)
    split_params = SplitParams(finetune.val_fraction, finetune.seed, finetune.few_shot_train_images)
    evaluation = EvalSettings(finetune.conf, finetune.iou, finetune.max_det, finetune.coco_backend)
    return [
        evaluate_dataset(layout, load_labelled_dataset(layout, source.name, source.classes), variants, context,
                         settings, split_params, evaluation, log, pretrain,
                         seeds=[finetune.seed + k for k in range(finetune.seeds)],
                         replicates=finetune.bootstrap_replicates, few_shot_epochs=finetune.few_shot_epochs)
        for source in downstream
    ]
