"""Dagster assets: training (wiring only; the work lives in ``agssp_pipeline.training``).

``backbone_checkpoint`` is partitioned by backbone name: the dynamic ``backbone`` partitions hold the
names of ``backbone.backbones`` in agssp.yaml that ``agssp_pipeline.training.backbones`` registers
(``assets/partitions.py``), so the UI shows exactly the configured backbones. Each partition pretrains one backbone
with AGBP on all pretraining sources at once, so it depends on *every* partition of ``anomaly_maps``
and ``image_index`` of those sources.

It runs in the ``gpu`` pool and is materialised by hand (or by a schedule a deployment adds): it
deliberately has no automation condition, because a pretraining run costs GPU hours and must not
start on every upstream change; the UI shows it unsynced when the maps or index moved on.
"""

import base64
import json

import dagster as dg

from agssp_pipeline import artifact_io
from agssp_pipeline.training import checkpoint as ckpt
from agssp_pipeline.training.agbp import plot_loss_curves, train_backbone, train_domain_baseline
from agssp_pipeline.training.lineage import file_hash
from agssp_pipeline.training.settings import BackboneSettings
from assets.partitions import backbone_partitions
from assets.resources import PipelineConfigResource

# bump when a change in agssp_pipeline.training changes what a run with the same inputs produces
AGBP_CODE_VERSION = "agbp-2"  # 2: also trains the mode 2 (domain) baseline when finetuned
UPSTREAM_ASSETS = ("anomaly_maps", "image_index")


class BackboneRunConfig(dg.Config):
    """Per-run overrides of the ``backbone`` section of agssp.yaml (unset = the file's value)."""

    epochs: int | None = None
    batch_size: int | None = None
    device: str | None = None  # auto, cpu, cuda, cuda:1
    image_size: int | None = None
    base_loss: str | None = None  # cls, moco, simmim, ssl, none
    max_steps_per_epoch: int | None = None
    resume: bool | None = None  # continue an unfinished run with the same config and data


def run_settings(base: BackboneSettings, overrides: BackboneRunConfig) -> BackboneSettings:
    values = {k: v for k, v in overrides.model_dump().items() if v is not None}
    return BackboneSettings.model_validate({**base.model_dump(), **values})


def _upstream_versions(
    context: dg.AssetExecutionContext, sources: list[str]
) -> dict[str, dict[str, str | None]]:
    """Data versions Dagster recorded for the upstream partitions (None where never materialised here)."""
    versions: dict[str, dict[str, str | None]] = {}
    for asset in UPSTREAM_ASSETS:
        versions[asset] = {}
        for source in sources:
            records = context.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[source]), limit=1
            ).records
            tags = records[0].asset_materialization.tags if records else {}
            versions[asset][source] = (tags or {}).get("dagster/data_version")
    return versions


def consumed_inputs_table(lineage: dict, upstream: dict[str, dict[str, str | None]]) -> str:
    """Markdown: which partitions and data versions fed this checkpoint."""
    lines = [
        "| source (partition) | images used | index sha256[:16] | map store version | encoder "
        "| image_index data version | anomaly_maps data version |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, info in sorted(lineage["data"]["sources"].items()):
        encoder = info.get("encoder") or {}
        encoder_text = "/".join(str(encoder[k]) for k in ("encoder", "model", "mode") if k in encoder) or "-"
        lines.append(
            f"| {source} | {info['images_used']} | {info['index_version'] or '-'} | {info['map_store_version'] or '-'} "
            f"| {encoder_text} | {upstream['image_index'].get(source) or '-'} | {upstream['anomaly_maps'].get(source) or '-'} |"
        )
    return "\n".join(lines)


def _loss_table(history: list[dict]) -> str:
    lines = ["| epoch | base | distill | total | images/s |", "|---|---|---|---|---|"]
    for row in history:
        base = "-" if row["base_loss"] is None else f"{row['base_loss']:.4f}"
        lines.append(
            f"| {row['epoch']} | {base} | {row['distill_loss']:.4f} | {row['total_loss']:.4f} | {row['images_per_s']:.1f} |"
        )
    return "\n".join(lines)


@dg.asset(
    partitions_def=backbone_partitions,
    # thresholds are not a training input, but the checkpoint records the table version it was made beside
    deps=[dg.AssetDep(name, partition_mapping=dg.AllPartitionMapping()) for name in UPSTREAM_ASSETS]
    + [dg.AssetDep("category_thresholds")],
    pool="gpu",
    code_version=AGBP_CODE_VERSION,
    group_name="training",
    kinds={"pytorch", "safetensors"},
    description=(
        "AGBP-pretrained backbone (one partition per backbone): attention maps of the last stages distilled "
        "towards the KeAD anomaly maps of all pretraining sources, plus the base loss. Writes "
        "`checkpoints/backbone/<name>/<run_id>/model.safetensors` + `lineage.json` (sources, index and map store "
        "versions, code commit, losses) and moves latest.json. When `finetune.variants` holds `domain`, also the "
        "paper's mode 2 baseline: the same recipe with the distillation weight at 0 (never latest.json). "
        "GPU pool; manual or scheduled, never eager."
    ),
)
def backbone_checkpoint(
    context: dg.AssetExecutionContext, config: BackboneRunConfig, pipeline_config: PipelineConfigResource
) -> dg.MaterializeResult:
    pipeline = pipeline_config.load()
    name = context.partition_key
    settings = run_settings(pipeline.backbone, config)
    sources = [s.name for s in pipeline.pretrain_sources()]
    upstream = _upstream_versions(context, sources)
    # the Dagster view of the inputs goes into the sidecar too (written once, by the trainer), so it
    # survives outside the Dagster instance
    result = train_backbone(
        pipeline,
        name,
        settings=settings,
        extra_lineage={"dagster_upstream_data_versions": upstream},
        log=context.log.info,  # start, every log_every_steps steps, and each epoch with its ETA
    )
    lineage = result.lineage
    plot_path = pipeline.layout().previews("backbone", name, f"{result.run_id}_losses.png")
    png = plot_loss_curves(result.step_history, title=f"AGBP {name} ({result.run_id})")
    artifact_io.write_bytes(plot_path, png)  # local folder or object store, like the checkpoint
    encoded = base64.b64encode(png).decode()
    final = lineage["final_losses"]
    metadata = {
        "checkpoint_path": dg.MetadataValue.path(result.model_path),
        "lineage_path": dg.MetadataValue.path(f"{result.run_dir}/{ckpt.LINEAGE_FILE}"),
        "run_id": dg.MetadataValue.text(result.run_id),
        "device": dg.MetadataValue.text(lineage["device"]),
        "images_per_s": dg.MetadataValue.float(float(result.images_per_s)),
        "epochs": dg.MetadataValue.text(str(int(lineage["epochs_completed"]))),  # text: not a figure to plot
        "resumed_from_epoch": dg.MetadataValue.text(str(result.start_epoch - 1)),
        "final_distill_loss": dg.MetadataValue.float(float(final["distill_loss"])),
        "final_total_loss": dg.MetadataValue.float(float(final["total_loss"])),
        "distill_weight": dg.MetadataValue.float(float(lineage["distill_weight"])),
        "base_loss": dg.MetadataValue.text(lineage["resolved"]["base_loss"]),
        "consumed_inputs": dg.MetadataValue.md(consumed_inputs_table(lineage, upstream)),
        "consumed_inputs_json": dg.MetadataValue.json(
            {"sources": lineage["data"]["sources"], "dagster_upstream_data_versions": upstream}
        ),
        "loss_per_epoch": dg.MetadataValue.md(_loss_table(result.epoch_history)),
        "loss_curves": dg.MetadataValue.md(f"![losses](data:image/png;base64,{encoded})"),
        "loss_curves_path": dg.MetadataValue.path(plot_path),
        "code": dg.MetadataValue.json(lineage["code"]),
        "config_hash": dg.MetadataValue.text(lineage["config_hash"]),
    }
    if final["base_loss"] is not None:
        metadata["final_base_loss"] = dg.MetadataValue.float(float(final["base_loss"]))
    if "domain" in pipeline.finetune.variants:  # the paper's mode 2 baseline; latest.json stays on AGBP
        domain = train_domain_baseline(pipeline, name, settings=settings,
                                       extra_lineage={"dagster_upstream_data_versions": upstream},
                                       log=context.log.info)
        metadata["domain_run_id"] = dg.MetadataValue.text(domain.run_id)
        metadata["domain_checkpoint_path"] = dg.MetadataValue.path(domain.model_path)
        metadata["domain_final_total_loss"] = dg.MetadataValue.float(float(domain.lineage["final_losses"]["total_loss"]))
    return dg.MaterializeResult(
        metadata=metadata, data_version=dg.DataVersion(file_hash(result.model_path) or result.run_id)
    )


@dg.asset_check(
    asset=backbone_checkpoint,
    partitions_def=backbone_partitions,
    description="The latest checkpoint loads without pickle, is complete, has finite losses, and (YOLOv8) fits a detector.",
)
def backbone_checkpoint_loads(
    context: dg.AssetCheckExecutionContext, pipeline_config: PipelineConfigResource
) -> dg.AssetCheckResult:
    import math

    name = context.partition_key
    layout = pipeline_config.layout()
    try:
        state, lineage = ckpt.load_checkpoint(ckpt.latest_checkpoint_dir(layout, name))
    except FileNotFoundError as error:
        return dg.AssetCheckResult(passed=False, description=str(error))
    problems = []
    if lineage.get("status") != "complete":
        problems.append(f"status {lineage.get('status')!r}")
    losses = [v for v in (lineage.get("final_losses") or {}).values() if v is not None]
    if not losses or not all(math.isfinite(v) for v in losses):
        problems.append(f"losses not finite: {losses}")
    loaded = 0
    if lineage.get("detector_compatible"):
        from ultralytics.nn.tasks import DetectionModel

        detector = DetectionModel(f"{name}.yaml", nc=1, verbose=False)
        try:
            weights = ckpt.InitialWeights(name, ckpt.backbone_state_for_detector(state), ckpt.BACKBONE_PREFIXES)
            loaded = len(ckpt.inject_weights(detector, weights).loaded)
        except ValueError as error:
            problems.append(str(error))
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or "ok",
        metadata={
            "tensors": len(state),
            "detector_tensors_loaded": loaded,
            "lineage": json.dumps(lineage.get("data", {}))[:2000],
        },
    )


# ---------------------------------------------------------------- attention probe (issue 11, item 6)

ATTENTION_CODE_VERSION = "attention-probe-1"


class AttentionProbeConfig(dg.Config):
    """How many labelled images per source the probe scores (fixed order: the first by image id)."""

    max_images: int = 64


@dg.asset(
    partitions_def=backbone_partitions,
    deps=[dg.AssetDep("backbone_checkpoint"), dg.AssetDep("image_index", partition_mapping=dg.AllPartitionMapping())],
    code_version=ATTENTION_CODE_VERSION,
    group_name="training",
    kinds={"pytorch", "parquet"},
    description=(
        "Does the backbone look at defects? Pixel AUROC of the distilled stages' attention (AGBP's sum over "
        "channels of F^2, upsampled, min-max normalised, averaged) against the masks or box interiors of every "
        "labelled source, for the scratch start, the ImageNet start (where the backbone has one) and every "
        "checkpoint run. Writes `evaluations/attention/<backbone>.parquet`. Seconds, not finetune hours."
    ),
)
def backbone_attention_evaluation(
    context: dg.AssetExecutionContext, config: AttentionProbeConfig, pipeline_config: PipelineConfigResource
) -> dg.MaterializeResult:
    from agssp_pipeline.eval import attention_probe

    pipeline = pipeline_config.load()
    name = context.partition_key
    settings = pipeline.backbone
    frame = attention_probe.evaluate_attention(
        pipeline.layout(), name, list(pipeline.source_names), settings.image_size,
        stages=settings.distill_stages, max_images=config.max_images, seed=settings.seed,
    )
    uri = attention_probe.write_attention_evaluation(frame, pipeline.layout(), name)
    context.log.info(f"attention probe {name}: {len(frame)} rows -> {uri}")
    return dg.MaterializeResult(metadata={
        "table": dg.MetadataValue.md(attention_probe.markdown_table(frame)),
        "pixel_auroc": dg.MetadataValue.json(json.loads(attention_probe.summary_json(frame))),
        "path": dg.MetadataValue.path(uri),
        "sources": dg.MetadataValue.text(", ".join(sorted(set(frame["source"]))) or "-"),
        "image_size": dg.MetadataValue.text(str(settings.image_size)),
        "max_images": dg.MetadataValue.text(str(config.max_images)),
        "rows": dg.MetadataValue.int(len(frame)),
    })
