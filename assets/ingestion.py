"""Dagster assets: ingestion (wiring only; the work lives in ``agssp_pipeline.sources``).

``plant_images`` (observable source) reports one data version over the fingerprints of all source
folders; ``image_index`` (one partition per source) depends on it, so the UI marks indexes stale as soon
as files land in or leave a folder. The sensor in ``jobs/ingestion.py`` records the same observation
on every tick that sees a change and launches re-ingestion of exactly the changed sources.
"""

import hashlib
import os

import dagster as dg
import pandas as pd

from agssp_pipeline import artifact_io
from agssp_pipeline.sources import (
    ingest_source,
    known_hashes_from,
    previous_probe_cache,
    source_fingerprint,
)
from agssp_pipeline.sources.preview import contact_sheet, jpeg_markdown
from assets.automation import CHEAP_ASSET_AUTOMATION
from assets.partitions import image_source_partitions
from assets.resources import PipelineConfigResource

# bump when a change to agssp_pipeline.sources changes what is written for the same folder
INGESTION_CODE_VERSION = "ingestion-1"
DEFAULT_MAX_QUARANTINE_RATE = 0.05
PREVIEW_ROWS = 10


def combined_fingerprint(fingerprints: dict[str, str]) -> str:
    """One data version over every source folder (sorted by name)."""
    digest = hashlib.sha256()
    for name, fingerprint in sorted(fingerprints.items()):
        digest.update(f"{name}={fingerprint}\n".encode())
    return digest.hexdigest()[:16]


def source_fingerprints(config, log=None) -> dict[str, str]:
    """source name -> folder fingerprint for every source whose root exists (missing roots are logged)."""
    found: dict[str, str] = {}
    for source in config.sources:
        try:
            found[source.name] = source_fingerprint(source)
        except FileNotFoundError as error:
            if log is not None:
                log.warning(f"{error}; skipped until it appears")
    return found


def fingerprint_metadata(fingerprints: dict[str, str]) -> dict[str, dg.MetadataValue]:
    table = pd.DataFrame(sorted(fingerprints.items()), columns=["source", "folder_fingerprint"])
    return {"sources": dg.MetadataValue.int(len(fingerprints)), "fingerprints": dg.MetadataValue.md(_markdown_table(table))}


# Unpartitioned on purpose: Dagster 1.13 accepts DataVersionsByPartition from a partitioned observable
# source, but the provenance of a partitioned downstream only reads upstream *materializations*
# (DataVersionCache._get_partitions_data_version_from_keys: "TODO: this needs to account for
# observations also"), so per-partition staleness would never clear. One combined version marks every
# image_index partition stale when any folder changes; the sensor then re-ingests exactly the changed ones.
@dg.observable_source_asset(
    group_name="ingestion",
    description=(
        "The raw image folders of all configured sources (plant folders change daily, public datasets "
        "rarely). Data version = hash of each folder's fingerprint (relative paths, sizes, mtimes; no file "
        "is read); the per-source fingerprints are in the metadata."
    ),
)
def plant_images(context, pipeline_config: PipelineConfigResource) -> dg.ObserveResult:
    fingerprints = source_fingerprints(pipeline_config.load(), context.log)
    return dg.ObserveResult(data_version=dg.DataVersion(combined_fingerprint(fingerprints)),
                            metadata=fingerprint_metadata(fingerprints))


def _markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_none_"
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    body = "\n".join("| " + " | ".join("" if pd.isna(v) else str(v).replace("|", "\\|") for v in row) + " |"
                     for row in frame.itertuples(index=False))
    return header + body


def _relative(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def _preview_metadata(result, root: str, layout, name: str) -> dict[str, dg.MetadataValue]:
    images = result.images.head(PREVIEW_ROWS)
    preview = pd.DataFrame({
        "file": [_relative(p, root) for p in images["path"]], "image_id": images["image_id"],
        "category": images["category"], "size": [f"{w}x{h}" for w, h in zip(images["width"], images["height"], strict=True)],
        "split": images["split"], "is_normal": images["is_normal"], "duplicate_of": images["duplicate_of"],
    })
    quarantine = result.quarantine
    summary = (quarantine.groupby(["kind", "action"]).size().rename("rows").reset_index()
               if not quarantine.empty else quarantine)
    examples = quarantine.head(PREVIEW_ROWS).assign(path=lambda q: [_relative(p, root) for p in q["path"]])
    classes = result.annotations["class_name"].value_counts().rename_axis("class").rename("boxes").reset_index()
    metadata = {
        "preview": dg.MetadataValue.md(_markdown_table(preview)),
        "quarantine_summary": dg.MetadataValue.md(_markdown_table(summary)),
        "quarantine_examples": dg.MetadataValue.md(_markdown_table(examples)),
        "boxes_per_class": dg.MetadataValue.md(_markdown_table(classes)),
    }
    sheet = contact_sheet(result.images, result.annotations)
    if sheet is not None:
        target = layout.previews("ingestion", f"{name}.jpg")
        artifact_io.write_bytes(target, sheet)
        metadata["contact_sheet"] = dg.MetadataValue.md(
            jpeg_markdown(sheet, name, legend="green: ground-truth boxes and mask outlines"))
        metadata["contact_sheet_path"] = dg.MetadataValue.path(target)
    return metadata


class IngestRunConfig(dg.Config):
    """``full_rescan``: hash and decode every file even where size and mtime match the last index."""

    full_rescan: bool = False


def _last_code_version(context: dg.AssetExecutionContext, partition: str) -> str | None:
    """Code version of this partition's latest materialization: probes are reused only from the same code."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[partition]), limit=1).records
    materialization = records[0].asset_materialization if records else None
    return (materialization.tags or {}).get("dagster/code_version") if materialization is not None else None


@dg.asset(
    partitions_def=image_source_partitions,
    deps=[plant_images],
    code_version=INGESTION_CODE_VERSION,
    automation_condition=CHEAP_ASSET_AUTOMATION,
    group_name="ingestion",
    kinds={"parquet"},
    description=(
        "One source's image index (`index/<source>.parquet`: one row per image with image_id = sha256[:16], "
        "size, split, mask, is_normal, duplicate_of), its boxes (`<source>.annotations.parquet`) and every "
        "rejected, clipped, converted or flagged file with the reason (`<source>.quarantine.parquet`). "
        "Sources listed earlier in the config own shared images: later copies get duplicate_of set."
    ),
)
def image_index(context: dg.AssetExecutionContext, config: IngestRunConfig,
                pipeline_config: PipelineConfigResource) -> dg.MaterializeResult:
    pipeline = pipeline_config.load()
    name = context.partition_key
    source = pipeline.source(name)
    layout = pipeline.layout()
    fingerprint = source_fingerprint(source)  # before reading: a change during the run shows on the next tick
    earlier = pipeline.source_names[: pipeline.source_names.index(name)]
    known = known_hashes_from(layout, earlier)
    cache = None
    if not config.full_rescan and _last_code_version(context, name) == INGESTION_CODE_VERSION:
        cache = previous_probe_cache(layout, name)
    result = ingest_source(source, known, cache=cache, derived_masks=layout.derived_masks(name))
    paths = result.write(layout, name)
    counts = result.counts()
    context.log.info(f"source {name}: {counts}")
    metadata: dict[str, dg.MetadataValue] = {
        **{key: dg.MetadataValue.int(value) for key, value in counts.items()},
        "dagster/row_count": dg.MetadataValue.int(counts["images"]),
        "format": dg.MetadataValue.text(source.format),
        "root": dg.MetadataValue.path(source.root),
        "folder_fingerprint": dg.MetadataValue.text(fingerprint),
        "cross_source_hashes_checked": dg.MetadataValue.int(len(known)),
        "files_reused_unread": dg.MetadataValue.int(cache.hits if cache is not None else 0),
        **{f"{key}_path": dg.MetadataValue.path(path) for key, path in paths.items()},
        **_preview_metadata(result, source.root, layout, name),
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(result.content_hash()))


class QuarantineRateConfig(dg.Config):
    """Run-time override of the WARN limit, e.g. run config
    ``ops: {image_index_image_index_quarantine_rate: {config: {max_rate: 0.1}}}``; otherwise the source's
    ``options.max_quarantine_rate``, else 5%."""

    max_rate: float | None = None


def _written_tables(pipeline_config: PipelineConfigResource, name: str) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    layout = pipeline_config.layout()
    if not artifact_io.exists(layout.index(name)):
        return None
    return artifact_io.read_parquet(layout.index(name)), artifact_io.read_parquet(layout.quarantine(name))


@dg.asset_check(asset=image_index, partitions_def=image_source_partitions,
                description="The written index holds at least one image that is not a duplicate.")
def image_index_not_empty(context: dg.AssetCheckExecutionContext,
                          pipeline_config: PipelineConfigResource) -> dg.AssetCheckResult:
    tables = _written_tables(pipeline_config, context.partition_key)
    if tables is None:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "index file missing"})
    index, _ = tables
    unique = int(index["duplicate_of"].isna().sum())
    return dg.AssetCheckResult(passed=unique > 0, metadata={"images": len(index), "unique_images": unique})


@dg.asset_check(asset=image_index, partitions_def=image_source_partitions,
                description="Share of image files quarantined (unreadable, truncated, not images) stays low.")
def image_index_quarantine_rate(context: dg.AssetCheckExecutionContext, config: QuarantineRateConfig,
                                pipeline_config: PipelineConfigResource) -> dg.AssetCheckResult:
    name = context.partition_key
    tables = _written_tables(pipeline_config, name)
    if tables is None:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "index file missing"})
    index, quarantine = tables
    source = pipeline_config.load().source(name)
    limit = config.max_rate if config.max_rate is not None else float(
        source.options.get("max_quarantine_rate", DEFAULT_MAX_QUARANTINE_RATE))
    bad = int(((quarantine["kind"] == "image") & (quarantine["action"] == "quarantined")).sum())
    rate = bad / max(1, bad + len(index))
    reasons = quarantine.loc[quarantine["action"] == "quarantined", "reason"].str.split(":").str[0].value_counts().head(5)
    return dg.AssetCheckResult(
        passed=rate <= limit,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{bad} of {bad + len(index)} image files quarantined ({rate:.1%}, limit {limit:.1%})",
        metadata={"quarantined_images": bad, "rate": float(rate), "limit": limit,
                  "top_reasons": dg.MetadataValue.md(_markdown_table(reasons.rename_axis("reason").reset_index()))},
    )
