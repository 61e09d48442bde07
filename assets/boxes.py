"""Dagster assets: per-category thresholds, pseudo boxes, and their measured quality (wiring only)."""

import json

import dagster as dg
import numpy as np
import pandas as pd

from agssp_pipeline import artifact_io
from agssp_pipeline.boxes import plots, stage
from agssp_pipeline.boxes.pseudo import boxes_only, image_summary, settings_of
from agssp_pipeline.boxes.settings import BoxesSettings
from agssp_pipeline.sources.preview import jpeg_markdown
from assets.automation import CHEAP_ASSET_AUTOMATION
from assets.partitions import pretrain_source_partitions
from assets.resources import PipelineConfigResource

THRESHOLDS_CODE_VERSION = "2"  # 2: named rules (boxes.method), rule columns in the table
PSEUDO_BOXES_CODE_VERSION = "2"  # 2: binarisations, map_max split
QUALITY_CODE_VERSION = "1"
PREVIEW_IMAGES = 8  # the highest-scoring images with boxes


class BoxesRunConfig(dg.Config):
    """Per-run overrides of the ``boxes:`` section of agssp.yaml (unset = the file's value)."""

    method: str | None = None  # a preset of box rules (boxes.settings.METHODS); validated by BoxesSettings
    delta: float | None = None
    image_split: str | None = None  # a name from IMAGE_SPLIT_RULES; validated by BoxesSettings
    image_score_threshold: float | None = None
    image_score_quantile: float | None = None
    top_k: int | None = None
    nms_iou: float | None = None

    def apply(self, settings: BoxesSettings) -> BoxesSettings:
        overrides = {k: v for k, v in self.model_dump().items() if v is not None}
        return BoxesSettings.model_validate({**settings.model_dump(), **overrides})


def _md_table(frame: pd.DataFrame, floats: str = "{:.4g}") -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    lines = [header, rule]
    for row in frame.itertuples(index=False):
        cells = [floats.format(v) if isinstance(v, float | np.floating) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dg.asset(
    key="category_thresholds",
    deps=[dg.AssetDep("anomaly_maps")],
    code_version=THRESHOLDS_CODE_VERSION,
    automation_condition=CHEAP_ASSET_AUTOMATION,
    group_name="pseudo_labels",
    kinds={"python", "parquet"},
    description=(
        "Per-category adaptive binarisation threshold T_c = mean(max anomaly map) - delta over every "
        "pretraining source of the category, and the image-score cutoff that splits normal/defective."
    ),
)
def category_thresholds(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource, config: BoxesRunConfig
) -> dg.MaterializeResult:
    pipeline = pipeline_config.load()
    settings = config.apply(pipeline.boxes)
    run = stage.compute_thresholds(pipeline, settings)
    if run.missing_sources:
        context.log.warning(f"pretraining sources without anomaly maps (left out): {run.missing_sources}")
    uri = stage.write_thresholds(pipeline, run)
    figures = []
    for row in run.table.itertuples(index=False):
        maxima = run.stats.loc[run.stats["category"] == row.category, "map_max"].to_numpy()
        png = plots.threshold_plot(maxima, row.category, row.threshold, row.mean_max)
        figures.append(plots.png_markdown(png, f"map maxima {row.category}"))
    shown = run.table.drop(columns=["map_store_versions"])
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(uri),
            "thresholds": dg.MetadataValue.md(_md_table(shown)),
            "map_maxima": dg.MetadataValue.md("\n\n".join(figures)),
            "n_categories": len(run.table),
            "n_images": int(run.table["n_images"].sum()),
            "sources": dg.MetadataValue.json(run.sources),
            "sources_without_maps": dg.MetadataValue.json(run.missing_sources),
            "map_store_versions": dg.MetadataValue.json(
                {s: v for row in run.table["map_store_versions"] for s, v in json.loads(row).items()}
            ),
        },
        data_version=dg.DataVersion(stage.table_fingerprint(run.table)),
    )


@dg.asset_check(asset=category_thresholds, description="Every threshold is finite and rests on enough images.")
def thresholds_well_founded(pipeline_config: PipelineConfigResource) -> dg.AssetCheckResult:
    table = stage.read_thresholds(pipeline_config.layout())
    finite = bool(np.isfinite(table[["mean_max", "threshold"]].to_numpy()).all())
    thin = table.loc[table["n_images"] < 10, "category"].tolist()
    return dg.AssetCheckResult(
        passed=finite and not thin,
        severity=dg.AssetCheckSeverity.ERROR if not finite else dg.AssetCheckSeverity.WARN,
        description=None if finite else "non-finite thresholds",
        metadata={"categories_under_10_images": dg.MetadataValue.json(thin)},
    )


@dg.asset(
    key="pseudo_boxes",
    partitions_def=pretrain_source_partitions,
    deps=[dg.AssetDep("anomaly_maps"), dg.AssetDep("category_thresholds")],
    code_version=PSEUDO_BOXES_CODE_VERSION,
    automation_condition=CHEAP_ASSET_AUTOMATION,
    group_name="pseudo_labels",
    kinds={"python", "parquet"},
    description=(
        "Pseudo-defect boxes per source: maps of images judged defective are upsampled, binarised at T_c, "
        "split into connected components (size floor), boxed, scored by their map maximum, NMS + top-k. "
        "Images without boxes are kept as manifest rows with null boxes."
    ),
)
def pseudo_boxes(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource, config: BoxesRunConfig
) -> dg.MaterializeResult:
    source = context.partition_key
    pipeline = pipeline_config.load()
    settings = config.apply(pipeline.boxes)
    table = stage.compute_pseudo_boxes(pipeline, source, settings)
    uri = stage.write_pseudo_boxes(pipeline.layout(), source, table)
    summary = image_summary(table)
    defective = summary[summary["judged_defective"]]
    boxes = boxes_only(table)
    metadata = {
        "path": dg.MetadataValue.path(uri),
        "n_images": len(summary),
        "n_judged_defective": len(defective),
        "n_images_with_boxes": int((summary["n_boxes"] > 0).sum()),
        "n_boxes": len(boxes),
        "mean_boxes_per_defective_image": float(defective["n_boxes"].mean()) if len(defective) else 0.0,
        "map_store_version": str(table["map_store_version"].iloc[0]) if len(table) else "",
        "boxes_per_image": dg.MetadataValue.md(
            plots.png_markdown(plots.boxes_per_image_plot(defective["n_boxes"].to_numpy(), settings.top_k), "boxes")
        ),
    }
    if len(boxes):
        layout = pipeline.layout()
        index = stage.read_index(layout, source).drop_duplicates("image_id").set_index("image_id")
        top = boxes.groupby("image_id")["score"].max().sort_values(ascending=False).index[:PREVIEW_IMAGES]
        preview = plots.box_preview(index.loc[list(top)].reset_index(), boxes, stage.read_annotations(layout, source))
        if preview is not None:
            target = layout.previews("pseudo_boxes", f"{source}.jpg")
            artifact_io.write_bytes(target, preview)
            metadata["preview"] = dg.MetadataValue.md(jpeg_markdown(preview, f"pseudo boxes {source}"))
            metadata["preview_path"] = dg.MetadataValue.path(target)
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(stage.table_fingerprint(table)))


MISSING_TABLE = dg.AssetCheckResult(passed=False, metadata={"reason": "pseudo-box table missing"})


def pseudo_box_check(description: str, blocking: bool = False):
    """An asset check of one partition's pseudo-box table: ``rule(table, config) -> AssetCheckResult``.

    The decorated rule gets the table as written (a missing table fails the check) and the pipeline config.
    """

    def decorate(rule):
        @dg.asset_check(asset=pseudo_boxes, name=rule.__name__, partitions_def=pretrain_source_partitions,
                        blocking=blocking, description=description)
        def check(context: dg.AssetCheckExecutionContext,
                  pipeline_config: PipelineConfigResource) -> dg.AssetCheckResult:
            table = stage.read_pseudo_boxes(pipeline_config.layout(), context.partition_key)
            return MISSING_TABLE if table is None else rule(table, pipeline_config.load())

        return check

    return decorate


@pseudo_box_check("Every box lies inside its image and has positive size.", blocking=True)
def pseudo_boxes_inside_images(table, config) -> dg.AssetCheckResult:
    boxes = boxes_only(table)
    outside = (
        (boxes["x1"] < 0) | (boxes["y1"] < 0) | (boxes["x2"] > boxes["width"]) | (boxes["y2"] > boxes["height"])
        | (boxes["x2"] <= boxes["x1"]) | (boxes["y2"] <= boxes["y1"])
    )
    return dg.AssetCheckResult(
        passed=not bool(outside.any()),
        metadata={"n_boxes": len(boxes), "n_outside": int(outside.sum()),
                  "examples": dg.MetadataValue.json(boxes.loc[outside, "image_id"].head(5).astype(str).tolist())},
    )


@pseudo_box_check("No image has more boxes than boxes.top_k.", blocking=True)
def pseudo_boxes_at_most_top_k(table, config) -> dg.AssetCheckResult:
    summary = image_summary(table)
    top_k = settings_of(table, config.boxes).top_k
    most = int(summary["n_boxes"].max()) if len(summary) else 0
    return dg.AssetCheckResult(passed=most <= top_k, metadata={"max_boxes_per_image": most, "top_k": top_k})


@pseudo_box_check(
    "The fraction of images with boxes lies inside boxes.flagged_fraction_band; outside it the maps look "
    "degenerate (everything or nothing flagged)."
)
def pseudo_boxes_flagged_fraction(table, config) -> dg.AssetCheckResult:
    summary = image_summary(table)
    low, high = settings_of(table, config.boxes).flagged_fraction_band
    fraction = float((summary["n_boxes"] > 0).mean()) if len(summary) else 0.0
    return dg.AssetCheckResult(
        passed=low <= fraction <= high,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"fraction_with_boxes": fraction, "band": dg.MetadataValue.json([low, high])},
    )


@dg.asset(
    key="pseudo_box_quality",
    partitions_def=pretrain_source_partitions,
    deps=[dg.AssetDep("pseudo_boxes")],
    code_version=QUALITY_CODE_VERSION,
    group_name="pseudo_labels",
    kinds={"python", "parquet"},
    description=(
        "Pseudo boxes measured against ground truth (where a source has boxes or masks): box recall/precision "
        "at IoU 0.3/0.5 vs a random-box baseline, image-level split quality, mask IoU over a delta sweep and "
        "against the best fixed global threshold."
    ),
)
def pseudo_box_quality(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource, config: BoxesRunConfig
) -> dg.MaterializeResult:
    source = context.partition_key
    pipeline = pipeline_config.load()
    if not stage.source_has_ground_truth(pipeline, source):
        context.log.info(f"source {source} has no ground truth; nothing to measure")
        return dg.MaterializeResult(
            metadata={"evaluated": False, "reason": "no annotation boxes or masks"},
            data_version=dg.DataVersion("no-ground-truth"),
        )
    table = stage.compute_quality(pipeline, source, config.apply(pipeline.boxes))
    uri = stage.write_quality(pipeline.layout(), source, table)
    boxes = table[table["view"] == "boxes"][["method", "iou_threshold", "n_pred", "n_gt", "recall", "precision"]]
    metadata = {
        "evaluated": True,
        "path": dg.MetadataValue.path(uri),
        "boxes": dg.MetadataValue.md(_md_table(boxes)),
        "image_split": dg.MetadataValue.md(
            _md_table(table[table["view"] == "image"][["method", "n_images", "n_gt", "n_pred", "f1",
                                                        "balanced_accuracy", "auroc"]])
        ),
    }
    pseudo = table[(table["view"] == "boxes") & (table["method"] == "pseudo")].set_index("iou_threshold")
    for iou, row in pseudo.iterrows():
        metadata[f"recall@{iou:g}"] = float(row["recall"])
        metadata[f"precision@{iou:g}"] = float(row["precision"])
    masks = table[table["view"] == "mask"]
    if len(masks):
        configured = masks[masks["configured"]].iloc[0]
        best_fixed = masks[(masks["method"] == "fixed") & masks["best"]].iloc[0]
        best_adaptive = masks[(masks["method"] == "adaptive") & masks["best"]].iloc[0]
        metadata["mask_iou"] = float(configured["mask_iou"])
        metadata["mask_iou_best_fixed"] = float(best_fixed["mask_iou"])
        metadata["best_fixed_threshold"] = float(best_fixed["threshold"])
        metadata["best_delta"] = float(best_adaptive["delta"])
        metadata["delta_sweep"] = dg.MetadataValue.md(
            _md_table(masks[masks["method"] == "adaptive"][["delta", "mask_iou", "mask_iou_ungated"]])
        )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(stage.table_fingerprint(table)))
