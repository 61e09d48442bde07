"""Dagster assets: AGDP detector pretraining and finetune evaluations (wiring only; the work lives in
``agssp_pipeline.training.detector`` / ``finetune``).

- ``detector_checkpoint`` (unpartitioned): one YOLOv8 detector trained on the pseudo boxes of *all* pretraining
  sources, starting from the AGBP backbone named by ``detector.backbone``. It depends on every partition of
  ``pseudo_boxes`` and ``backbone_checkpoint`` (AllPartitionMapping: the backbone to use is a config choice made at
  run time, so the graph cannot name one partition) and records in its metadata exactly what it consumed: the
  backbone run directory and weights digest, the hash and map-store version of each pseudo-box table, and the
  latest Dagster materialization of each upstream partition.
- ``finetune_evaluation`` (unpartitioned, loops over the downstream sources): finetunes every variant (scratch,
  agbp, agssp, user weights) on every downstream dataset and publishes the comparison table.
"""


import hashlib
import json

import dagster as dg
import pandas as pd

from agssp_pipeline import artifact_io
from agssp_pipeline.boxes import plots
from assets.resources import PipelineConfigResource

DETECTOR_CODE_VERSION = "agdp-1"
FINETUNE_CODE_VERSION = "finetune-1"
AGSSP_VARIANTS = ("agbp", "agssp")


class DetectorRunConfig(dg.Config):
    """Per-run overrides of the ``detector:`` config section."""

    epochs: int | None = None
    backbone_checkpoint: str | None = None  # a backbone run dir; default: latest run of detector.backbone


class FinetuneRunConfig(dg.Config):
    """Per-run overrides of the ``finetune:`` config section."""

    epochs: int | None = None
    datasets: list[str] | None = None  # default: every downstream source
    detector_checkpoint: str | None = None  # default: latest detector_checkpoint run
    backbone_checkpoint: str | None = None  # default: latest run of detector.backbone


def _md_table(frame: pd.DataFrame, float_format: str = "{:.4f}") -> str:
    if frame.empty:
        return "_none_"
    def cell(value) -> str:
        if isinstance(value, float):
            return "—" if pd.isna(value) else float_format.format(value)
        return str(value).replace("|", "\\|")
    header = "| " + " | ".join(map(str, frame.columns)) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return header + "\n".join("| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False))


def headline_figures(table: pd.DataFrame, regime: str = "full") -> dict[str, float]:
    """mAP@0.5, mAP@0.5:0.95 and the mAP@0.5 change vs scratch of each variant that ran (mean over datasets and
    seeds, in ``regime``), in percent, as floats: Dagster plots numeric metadata over materialisations, and these
    are the figures worth following (not epochs or image size)."""
    rows = table[table["regime"] == regime] if (table["regime"] == regime).any() else table
    rows = rows[rows["status"] == "ok"] if "status" in rows else rows
    figures: dict[str, float] = {}
    for variant in dict.fromkeys(rows["variant"]):
        mine = rows[rows["variant"] == variant]
        figures[f"{variant}_map50_pct"] = float(mine["map50_pct"].mean())
        figures[f"{variant}_map50_95_pct"] = float(mine["map50_95_pct"].mean())
        if variant != "scratch" and "delta_map50_pct" in mine and mine["delta_map50_pct"].notna().any():
            figures[f"{variant}_delta_map50_pct_vs_scratch"] = float(mine["delta_map50_pct"].mean())
    return figures


def _upstream_records(context, asset: str, partitions: list[str]) -> list[dict]:
    """Latest Dagster materialization of each consumed upstream partition (run id, data version)."""
    records = []
    for partition in partitions:
        found = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
        ).records
        if not found:
            records.append({"asset": asset, "partition": partition, "run_id": None, "data_version": None})
            continue
        materialization = found[0].asset_materialization
        tags = (materialization.tags or {}) if materialization else {}
        records.append({"asset": asset, "partition": partition, "run_id": found[0].run_id,
                        "data_version": tags.get("dagster/data_version")})
    return records


@dg.asset(
    deps=[
        dg.AssetDep("pseudo_boxes", partition_mapping=dg.AllPartitionMapping()),
        dg.AssetDep("backbone_checkpoint", partition_mapping=dg.AllPartitionMapping()),
    ],
    code_version=DETECTOR_CODE_VERSION,
    pool="gpu",
    group_name="detection",
    kinds={"pytorch", "yolo"},
    description=(
        "AGDP: a single-class ('defect') YOLOv8 trained on the pseudo boxes of every pretraining source, images "
        "judged normal as negatives, backbone initialised from the AGBP checkpoint of detector.backbone (frozen "
        "by default: ultralytics freeze=10). Writes `checkpoints/detector/<model>/<run_id>/model.safetensors` + "
        "`lineage.json` (backbone lineage, pseudo-box table hashes) and keeps ultralytics' best.pt/last.pt."
    ),
)
def detector_checkpoint(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource, config: DetectorRunConfig
) -> dg.MaterializeResult:
    from agssp_pipeline.training.detector import pretrain_detector

    pipeline = pipeline_config.load()
    if config.epochs is not None:
        pipeline = pipeline.model_copy(update={"detector": pipeline.detector.model_copy(update={"epochs": config.epochs})})
    sources = [s.name for s in pipeline.pretrain_sources()]
    result = pretrain_detector(pipeline, backbone_checkpoint=config.backbone_checkpoint, sources=sources,
                               log=context.log.info)
    lineage = result.lineage
    tables = pd.DataFrame([
        {"source": source, "sha256": info["sha256"], "map_store_version": ", ".join(info["map_store_version"]),
         "table": info["path"]}
        for source, info in sorted(lineage["pseudo_boxes"].items())
    ])
    upstream = pd.DataFrame(_upstream_records(context, "pseudo_boxes", sources)
                            + _upstream_records(context, "backbone_checkpoint", [pipeline.detector.backbone]))
    metrics = {k.replace("metrics/", ""): round(v, 4) for k, v in lineage.get("ultralytics_metrics", {}).items()}
    return dg.MaterializeResult(
        metadata={
            "checkpoint": dg.MetadataValue.path(str(result.weights)),
            "run_id": lineage["run_id"],
            "model": lineage["model"],
            "backbone_checkpoint": dg.MetadataValue.path(lineage["backbone"]["checkpoint"]),
            "backbone_weights_digest": lineage["backbone"]["weights_digest"],
            "pseudo_box_tables": dg.MetadataValue.md(_md_table(tables)),
            "consumed_materializations": dg.MetadataValue.md(_md_table(upstream)),
            "training_set": dg.MetadataValue.json(result.counts),
            "frozen_backbone_layers": lineage["settings"].get("freeze_layers") or 0,
            "epochs": dg.MetadataValue.text(str(lineage["settings"]["epochs"])),  # settings: text, not plotted
            "image_size": dg.MetadataValue.text(str(lineage["settings"]["image_size"])),
            **({"pseudo_box_val_map50": float(lineage["ultralytics_metrics"]["metrics/mAP50(B)"])}
               if "metrics/mAP50(B)" in lineage.get("ultralytics_metrics", {}) else {}),
            "tensors_loaded_from_backbone": (lineage.get("injection") or {}).get("loaded", 0),
            "pseudo_box_val_metrics": dg.MetadataValue.json(metrics),
            "ultralytics_best_pt": dg.MetadataValue.path(lineage.get("ultralytics_best_pt") or ""),
            "lineage": dg.MetadataValue.path(artifact_io.join(result.run_dir, "lineage.json")),
        },
        data_version=dg.DataVersion(lineage["weights_digest"]),
    )


@dg.asset(
    deps=[
        detector_checkpoint,
        dg.AssetDep("backbone_checkpoint", partition_mapping=dg.AllPartitionMapping()),
        dg.AssetDep("image_index", partition_mapping=dg.AllPartitionMapping()),
    ],
    code_version=FINETUNE_CODE_VERSION,
    pool="gpu",
    group_name="detection",
    kinds={"pytorch", "yolo"},
    description=(
        "Finetune evaluations (the paper's Table 2): for every downstream source, YOLOv8 finetuned from scratch, "
        "from the AGBP backbone (agbp), from the AGDP detector (agssp) and from any finetune.extra_weights file, "
        "with the same recipe on a fixed stored stratified split; COCO mAP@0.5 / @0.5:0.95 (faster-coco-eval) and "
        "ultralytics' figures of the last-epoch weights on the val split. Refuses pretraining/downstream overlap. "
        "Writes `evaluations/finetune/<dataset>.parquet`, `<dataset>.per_class.parquet` and `<dataset>.md`; "
        "ultralytics' figures under `runs/finetune/<dataset>/<regime>/<variant>/`."
    ),
)
def finetune_evaluation(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource, config: FinetuneRunConfig
) -> dg.MaterializeResult:
    from agssp_pipeline.training.finetune import (
        comparison_markdown,
        run_finetune_evaluation,
        worse_than_scratch,
    )

    pipeline = pipeline_config.load()
    if config.epochs is not None:
        pipeline = pipeline.model_copy(update={"finetune": pipeline.finetune.model_copy(update={"epochs": config.epochs})})
    evaluations = run_finetune_evaluation(pipeline, datasets=config.datasets,
                                          backbone_checkpoint=config.backbone_checkpoint,
                                          detector_checkpoint=config.detector_checkpoint, log=context.log.info)
    table = pd.concat([e.table for e in evaluations], ignore_index=True)
    summary = pd.concat([e.summary for e in evaluations], ignore_index=True)
    per_class = pd.concat([e.per_class for e in evaluations], ignore_index=True)
    replicates = pipeline.finetune.bootstrap_replicates
    markdown = comparison_markdown(summary, table, replicates)  # per-dataset .md files: written by the library
    per_class_wide = per_class.pivot_table(index=["dataset", "regime", "variant", "seed"], columns="class_name",
                                           values="ap50_95", dropna=False).reset_index()
    lineage_rows = pd.DataFrame([
        {"dataset": e.dataset, "variant": variant, "checkpoint": lin.get("checkpoint", "—"),
         "run_id": lin.get("run_id", "—"), "weights_digest": lin.get("weights_digest", "—")}
        for e in evaluations for variant, lin in e.lineage.items()
    ])
    splits = pd.DataFrame([
        {"dataset": e.dataset, "split_file": e.split_meta["path"], "reused": e.split_meta["reused"],
         "fingerprint": e.split_meta["fingerprint"], **{f"{k}": v for k, v in e.split_meta["params"].items()},
         "kead_reference_overlap": json.dumps(e.split_meta.get("kead_reference_overlap", {}))}
        for e in evaluations
    ])
    worse = worse_than_scratch(summary, AGSSP_VARIANTS)
    first = table[table["status"] == "ok"].iloc[0]
    charts = {e.dataset: pipeline.layout().evaluations("finetune", e.dataset, ".png") for e in evaluations}
    return dg.MaterializeResult(
        metadata={
            "comparison": dg.MetadataValue.md(markdown),
            "comparison_chart": dg.MetadataValue.md("\n\n".join(
                plots.png_markdown(artifact_io.read_bytes(uri), f"{name}: variants with 95 % intervals")
                for name, uri in charts.items() if artifact_io.exists(uri))),
            "comparison_chart_files": dg.MetadataValue.json(charts),
            "per_class_ap50_95": dg.MetadataValue.md(_md_table(per_class_wide)),
            "checkpoint_lineage": dg.MetadataValue.md(_md_table(lineage_rows)),
            "splits": dg.MetadataValue.md(_md_table(splits)),
            **headline_figures(table),  # the numbers Dagster plots over materialisations
            "datasets": dg.MetadataValue.text(", ".join(e.dataset for e in evaluations)),
            "variants": ", ".join(dict.fromkeys(table["variant"])),
            "epochs": dg.MetadataValue.text(str(int(first["epochs"]))),  # settings: text, not plotted
            "image_size": dg.MetadataValue.text(str(int(first["imgsz"]))),
            "seeds": dg.MetadataValue.text(", ".join(str(int(s)) for s in sorted(set(table["seed"].dropna())))),
            "model": str(first["model"]),
            "agssp_rows_worse_than_scratch": len(worse),
            "not_applicable": dg.MetadataValue.text(", ".join(sorted(set(
                summary.loc[summary["status"] != "ok", "variant"]))) or "none"),
            "tables": dg.MetadataValue.json({e.dataset: [e.table_path, e.per_class_path, e.summary_path]
                                             for e in evaluations}),
        },
        data_version=dg.DataVersion(hashlib.sha256(json.dumps(
            table[["dataset", "regime", "variant", "seed", "map50_95_pct"]].round(6).to_dict("list"), sort_keys=True
        ).encode()).hexdigest()[:16]),
    )


@dg.asset_check(
    asset=finetune_evaluation,
    description="WARN when a pretrained AGSSP variant (agbp, agssp) is below scratch beyond noise: the whole 95 % "
                "paired bootstrap interval (over seeds and val images) of its mAP@0.5 or mAP@0.5:0.95 difference "
                "lies under zero.",
)
def agssp_not_worse_than_scratch(pipeline_config: PipelineConfigResource) -> dg.AssetCheckResult:
    from agssp_pipeline.training.finetune import worse_than_scratch

    config = pipeline_config.load()
    layout = config.layout()
    uris = [layout.evaluations("finetune", f"{s.name}.summary") for s in config.downstream_sources()]
    tables = [artifact_io.read_parquet(uri) for uri in uris if artifact_io.exists(uri)]
    if not tables:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"reason": "no evaluation summaries found (evaluations/finetune/"
                                                       "<dataset>.summary.parquet): materialize finetune_evaluation"})
    summary = pd.concat(tables, ignore_index=True)
    worse = worse_than_scratch(summary, AGSSP_VARIANTS)
    columns = ["dataset", "regime", "variant", "seeds", "map50_pct_vs_scratch", "map50_pct_vs_scratch_low",
               "map50_pct_vs_scratch_high", "map50_95_pct_vs_scratch", "map50_95_pct_vs_scratch_low",
               "map50_95_pct_vs_scratch_high"]
    shown = worse[[c for c in columns if c in worse]]
    return dg.AssetCheckResult(
        passed=worse.empty,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"rows_worse_than_scratch": len(worse), "rows": dg.MetadataValue.md(_md_table(shown, "{:+.1f}")),
                  "rows_checked": int((summary["variant"].isin(AGSSP_VARIANTS) & (summary["status"] == "ok")).sum()),
                  "rule": "worse = the 95 % interval of (variant - scratch) is entirely below 0 (percentage points)"},
    )
