"""Dagster assets: KeAD anomaly maps per source and their evaluation (wiring only; work in agssp_pipeline.kead).

``anomaly_maps`` runs in the ``gpu`` pool with a single-run backfill policy, so a backfill over many
sources loads the model once and walks ``context.partition_keys`` in one process. Per-source details go
into one ``AssetObservation`` per partition; the materialization carries the run-level summary.
"""


import base64
import hashlib
import io
import time
from pathlib import Path
from typing import Any

import cv2
import dagster as dg
import numpy as np
import pandas as pd
from pydantic import PrivateAttr

from agssp_pipeline import artifact_io
from agssp_pipeline.boxes.stage import read_annotations
from agssp_pipeline.kead.adaptor import resolve_adaptor_setting, train_and_save_adaptor
from agssp_pipeline.kead.base import AnomalyEncoder
from agssp_pipeline.kead.evaluation import (
    evaluate_maps,
    has_boxes,
    has_masks,
    with_run_columns,
    write_evaluation,
)
from agssp_pipeline.kead.maps import upsample_map
from agssp_pipeline.kead.references import REFERENCE_COLUMNS, select_references
from agssp_pipeline.kead.runner import Progress, RunStats, compute_anomaly_maps, mappable_rows, read_rgb
from agssp_pipeline.kead.settings import KeadSettings
from agssp_pipeline.kead.store import CODE_VERSION, StoreEmptyError, read_map_table
from agssp_pipeline.sources.preview import Tile, ground_truth_mask, jpeg_markdown, labelled_grid, normal_state
from assets.partitions import pretrain_source_partitions
from assets.resources import PipelineConfigResource

KEAD_CODE_VERSION = f"kead-assets-1/{CODE_VERSION}"
EVALUATION_CODE_VERSION = "kead-eval-1"
PREVIEW_IMAGES = 6
PREVIEW_COLUMNS = 3
THUMB_SIDE = 256
MAP_RANGE = (0.0, 2.0)  # CNN: [0, 1); CLIP/WinCLIP: zero-shot probability + few-shot distance, each in [0, 1]
LOG_EVERY_S = 20.0


class KeadModelResource(dg.ConfigurableResource):
    """Encoder and device settings: run-time overrides of the ``kead:`` section of agssp.yaml.

    Unset fields keep the file's value. Dagster builds a fresh copy of the resource for every run, and the
    encoder lives on that copy: a single-run backfill over many sources (a UI backfill, or the headless
    runner, which runs ``anomaly_maps`` as one run over its partitions) loads the weights once, and nothing
    outlives the run (the copy and its model go when the run ends; no teardown hook, which would make the
    resource a generator that sensors could not build outside a context manager). Other settings or a weights file changed on disk
    (size or mtime) within a run is a new key: the encoder is built again, and only the newest is kept.
    """

    encoder: str | None = None
    weights: str | None = None
    device: str | None = None
    image_size: int | None = None
    k_shot: int | None = None
    batch_size: int | None = None
    num_workers: int | None = None  # a count; unset keeps the file's value (default "auto")
    reference_strategy: str | None = None

    _encoders: dict[str, AnomalyEncoder] = PrivateAttr(default_factory=dict)

    def settings(self, base: KeadSettings) -> KeadSettings:
        overrides = {k: v for k, v in self.model_dump().items() if v is not None}
        return KeadSettings.model_validate({**base.model_dump(), **overrides})

    def encoder_for(self, settings: KeadSettings) -> AnomalyEncoder:
        from agssp_pipeline.kead import encoders

        key = settings.model_dump_json() + "|" + _weights_stamp(settings.weights)
        if key not in self._encoders:
            self._encoders.clear()  # one model at a time: a large CLIP model fills a GPU
            self._encoders[key] = encoders.build_encoder(settings)
        return self._encoders[key]


def _weights_stamp(weights: str | None) -> str:
    """Size and mtime of a local weights file (or of every file in a weights folder); '' for tags."""
    if not weights:
        return ""
    path = Path(weights).expanduser()
    if not path.exists():
        return ""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


RESOURCES = {"kead_model": KeadModelResource()}


# -- helpers ------------------------------------------------------------------------------------------
def _index(layout, source: str) -> pd.DataFrame:
    uri = layout.index(source)
    if not artifact_io.exists(uri):
        raise FileNotFoundError(f"no image index for source '{source}' at {uri}: materialize image_index first")
    return artifact_io.read_parquet(uri)


def reference_pool(config, layout, source: str, index: pd.DataFrame, log=None) -> pd.DataFrame:
    """This source's rows plus those of every other indexed pretraining source sharing one of its categories.

    Downstream-only sources never lend references: their images are held apart from pretraining.
    """
    categories = set(index["category"].dropna().astype(str))
    frames = [index]
    for other in [s.name for s in config.pretrain_sources()]:
        if other == source or not artifact_io.exists(layout.index(other)):
            continue
        rows = artifact_io.read_parquet(layout.index(other))
        rows = rows[rows["category"].astype(str).isin(categories)]
        if len(rows):
            frames.append(rows)
            if log is not None:
                log.info(f"{len(rows)} images of source '{other}' may serve as references")
    return pd.concat(frames, ignore_index=True).drop_duplicates("image_id")


def _previous_zero_shot_scores(store_uri: str) -> pd.Series | None:
    """Zero-shot scores of an earlier run (any encoder with a text path), for 'lowest_zero_shot'."""
    try:
        table = read_map_table(store_uri)
    except (StoreEmptyError, FileNotFoundError):
        return None
    scores = pd.Series(table.zero_shot_score.astype(float), index=table.image_id)
    return None if scores.isna().all() else scores


def _png_markdown(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_none_"
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def anomaly_tile(row: pd.Series, patch_map: np.ndarray, score: float, rank: int) -> Tile:
    """One top-anomalous tile: the image with its map as a JET overlay, its GT mask outlined, a caption."""
    image = cv2.cvtColor(read_rgb(str(row["path"])), cv2.COLOR_RGB2BGR)
    heat = np.clip(upsample_map(patch_map, image.shape[0], image.shape[1]), 0.0, 1.0)
    mask = ground_truth_mask(row.get("mask_path"))
    truth = "GT: mask outlined" if mask is not None and mask.any() else f"GT: {normal_state(row.get('is_normal'))}"
    caption = [Path(str(row["path"])).name, str(row.get("category")), f"#{rank} score {score:.3f}", truth]
    return Tile(image, caption, gt_mask=mask, heat=heat)


def top_anomalous_preview(table, index: pd.DataFrame, count: int = PREVIEW_IMAGES) -> bytes | None:
    """Labelled JPEG grid of the ``count`` highest-scoring images with their maps overlaid."""
    rows = index.drop_duplicates("image_id").set_index("image_id")
    order = np.argsort(-np.nan_to_num(table.image_score, nan=-np.inf))[:count]
    tiles = []
    for rank, position in enumerate(order, start=1):
        image_id = str(table.image_id[position])
        if image_id not in rows.index:
            continue
        try:
            tiles.append(anomaly_tile(rows.loc[image_id], table.maps[position].astype(np.float32),
                                      float(table.image_score[position]), rank))
        except OSError:
            continue
    return labelled_grid(tiles, side=THUMB_SIDE, columns=PREVIEW_COLUMNS)


def score_histogram(scores: np.ndarray) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(3.4, 2.0), dpi=100)
    axis.hist(scores[np.isfinite(scores)], bins=30, color="#5b7fa6")
    axis.set_xlabel("image score")
    axis.set_ylabel("images")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


class _ProgressLogger:
    """done/total, images/s and ETA to the run log, at most every ``LOG_EVERY_S`` seconds."""

    def __init__(self, log, source: str) -> None:
        self.log, self.source, self.last = log, source, 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self.last < LOG_EVERY_S and progress.done < progress.total:
            return
        self.last = now
        self.log.info(f"{self.source}: {progress.done}/{progress.total} images ({progress.category}), "
                      f"{progress.images_per_s:.1f} images/s, ETA {progress.eta_s:.0f} s")


def _source_metadata(source: str, stats: RunStats, table, index: pd.DataFrame, references: pd.DataFrame,
                     encoder: AnomalyEncoder, layout) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "source": source,
        "images_computed": stats.computed,
        "images_skipped": stats.skipped,
        "images_failed": len(stats.failed),
        "images_in_store": len(table),
        "images_per_s": round(stats.images_per_s, 2),
        "seconds": round(stats.seconds, 1),
        "forward_passes": stats.forward_passes,
        "device": stats.device,
        "encoder": encoder.identity.encoder,
        "weights": encoder.identity.weights,
        "store_version": stats.version,
        "store": dg.MetadataValue.path(layout.maps_store(source)),
        "references": dg.MetadataValue.md(_md_table(references[["category", "image_id", "source", "reason"]])),
    }
    if stats.failed:
        metadata["failed_examples"] = dg.MetadataValue.json(dict(stats.failed[:10]))
    if len(table):
        metadata["image_score_histogram"] = dg.MetadataValue.md(
            _png_markdown(score_histogram(table.image_score.astype(np.float64)), f"image scores {source}"))
        preview = top_anomalous_preview(table, index)
        if preview is not None:
            target = layout.previews("kead", f"{source}_top_anomalous.jpg")
            artifact_io.write_bytes(target, preview)
            metadata["top_anomalous"] = dg.MetadataValue.md(jpeg_markdown(
                preview, f"top anomalous {source}", legend="anomaly map as JET overlay; green: ground-truth mask"))
            metadata["top_anomalous_path"] = dg.MetadataValue.path(target)
    return metadata


def _data_version(versions: dict[str, tuple[str, int]]) -> str:
    text = ";".join(f"{s}={v}:{n}" for s, (v, n) in sorted(versions.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- assets ---------------------------------------------------------------------------------------------
@dg.asset(
    key="anomaly_maps",
    partitions_def=pretrain_source_partitions,
    # the same source key in image_index (a different partition set: every source, not only pretraining)
    deps=[dg.AssetDep("image_index", partition_mapping=dg.IdentityPartitionMapping())],
    pool="gpu",
    backfill_policy=dg.BackfillPolicy.single_run(),
    code_version=KEAD_CODE_VERSION,
    group_name="kead",
    kinds={"pytorch", "zarr"},
    description=(
        "KeAD anomaly maps of one source: a (G x G) float16 map, image score and zero-shot score per indexed "
        "image in `maps.zarr/<source>` (Zarr v3, versioned by encoder/weights/prompts/references/grid, "
        "incremental: only images not yet in the current version are computed). References: kead."
        "reference_strategy, drawn from every source sharing the category."
    ),
)
def anomaly_maps(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource, kead_model: KeadModelResource
) -> dg.MaterializeResult:
    config = pipeline_config.load()
    layout = config.layout()
    settings = resolve_adaptor_setting(kead_model.settings(config.kead), layout)  # kead.adaptor: latest -> run
    encoder = kead_model.encoder_for(settings)  # once for every partition of this run
    context.log.info(f"encoder {encoder.identity.as_dict()} on {encoder.device}")
    summary_rows, versions = [], {}
    for source in context.partition_keys:
        index = _index(layout, source)
        store_uri = layout.maps_store(source)
        pool = reference_pool(config, layout, source, index, context.log)
        if settings.k_shot == 0 and not settings.reference_images:  # zero-shot only (text path)
            references = pd.DataFrame(columns=REFERENCE_COLUMNS)
        else:
            references = select_references(
                pool, k=settings.k_shot, strategy=settings.reference_strategy,
                explicit=settings.reference_images, zero_shot_scores=_previous_zero_shot_scores(store_uri),
                categories=sorted(index["category"].dropna().astype(str).unique()),
            )
        stats = compute_anomaly_maps(
            index, encoder, store_uri, references, batch_size=settings.batch_size,
            num_workers=settings.num_workers, progress=_ProgressLogger(context.log, source),
            require_references=settings.k_shot > 0,
        )
        table = read_map_table(store_uri)
        context.log.info(f"{source}: computed {stats.computed}, skipped {stats.skipped}, "
                         f"failed {len(stats.failed)}, {stats.images_per_s:.1f} images/s on {stats.device}")
        metadata = _source_metadata(source, stats, table, index, references, encoder, layout)
        context.log_event(dg.AssetObservation(asset_key=context.asset_key, partition=source, metadata=metadata))
        versions[source] = (stats.version, len(table))
        summary_rows.append({k: metadata[k] for k in ("source", "images_computed", "images_skipped",
                                                      "images_failed", "images_per_s", "store_version")})
    single = summary_rows[0] if len(summary_rows) == 1 else None
    run_metadata: dict[str, Any] = {
        "sources": dg.MetadataValue.md(_md_table(pd.DataFrame(summary_rows))),
        "images_computed": sum(r["images_computed"] for r in summary_rows),
        "images_skipped": sum(r["images_skipped"] for r in summary_rows),
        "encoder": encoder.identity.encoder,
        "weights": encoder.identity.weights,
        "device": str(encoder.device),
    }
    if single is not None:  # one partition: surface the full per-source metadata on the materialization
        run_metadata.update(metadata)
    return dg.MaterializeResult(metadata=run_metadata, data_version=dg.DataVersion(_data_version(versions)))


def _checked_sources(context: dg.AssetCheckExecutionContext) -> list[str]:
    """The partition, or every partition of a single-run backfill (one combined result, as Dagster 1.13
    evaluates partitioned checks per run, not per partition, when the run spans a range)."""
    return list(context.partition_keys)


def _range_check(sources: list[str], results: dict[str, tuple[bool, dict[str, Any]]],
                 severity: dg.AssetCheckSeverity) -> dg.AssetCheckResult:
    if len(sources) == 1:
        passed, metadata = results[sources[0]]
        return dg.AssetCheckResult(passed=passed, severity=severity, metadata=metadata)
    failing = [s for s in sources if not results[s][0]]
    return dg.AssetCheckResult(
        passed=not failing, severity=severity,
        metadata={"sources": dg.MetadataValue.json({s: results[s][1] for s in sources}),
                  "failing_sources": dg.MetadataValue.json(failing)},
    )


def maps_sane(store_uri: str) -> tuple[bool, bool, dict[str, Any]]:
    """(finite, in range, metadata) of a store's current version."""
    table = read_map_table(store_uri)
    maps = table.maps.astype(np.float32)
    finite = bool(np.isfinite(maps).all() and np.isfinite(table.image_score).all())
    low, high = (float(np.nanmin(maps)), float(np.nanmax(maps))) if maps.size else (0.0, 0.0)
    in_range = MAP_RANGE[0] - 1e-3 <= low and high <= MAP_RANGE[1] + 1e-3
    return finite, in_range, {"finite": finite, "min": low, "max": high, "images": len(table),
                              "version": str(table.attrs.get("version"))}


@dg.asset_check(asset=anomaly_maps, partitions_def=pretrain_source_partitions,
                description="Every stored map and image score is finite (ERROR otherwise: NaN breaks thresholds) "
                            "and maps lie in [0, 2] (WARN otherwise: thresholds assume that scale).")
def anomaly_maps_finite_and_in_range(context: dg.AssetCheckExecutionContext,
                                     pipeline_config: PipelineConfigResource) -> dg.AssetCheckResult:
    layout = pipeline_config.layout()
    sources = _checked_sources(context)
    results, all_finite = {}, True
    for source in sources:
        finite, in_range, metadata = maps_sane(layout.maps_store(source))
        all_finite &= finite
        results[source] = (finite and in_range, metadata)
    severity = dg.AssetCheckSeverity.WARN if all_finite else dg.AssetCheckSeverity.ERROR
    return _range_check(sources, results, severity)


def maps_cover_index(layout, source: str) -> tuple[bool, dict[str, Any]]:
    expected = set(mappable_rows(_index(layout, source))["image_id"].astype(str))
    stored = read_map_table(layout.maps_store(source)).image_id.tolist()
    missing, extra = expected - set(stored), set(stored) - expected
    duplicates = len(stored) - len(set(stored))
    # rows of images that left the index (deleted, or replaced: new content id) are stale, not wrong:
    # consumers read the current view (boxes.stage.load_maps) without them
    return not missing and duplicates == 0, {
        "indexed": len(expected), "stored": len(stored), "missing": len(missing), "stale_not_in_index": len(extra),
        "duplicates": duplicates, "missing_examples": sorted(missing)[:10]}


@dg.asset_check(asset=anomaly_maps, partitions_def=pretrain_source_partitions,
                description="Exactly one map per indexed image (duplicates excluded; quarantined files are "
                            "not in the index); maps of images that left the index are counted as stale "
                            "(consumers leave them out).")
def anomaly_maps_one_per_image(context: dg.AssetCheckExecutionContext,
                               pipeline_config: PipelineConfigResource) -> dg.AssetCheckResult:
    layout = pipeline_config.layout()
    sources = _checked_sources(context)
    results = {source: maps_cover_index(layout, source) for source in sources}
    return _range_check(sources, results, dg.AssetCheckSeverity.ERROR)


@dg.asset(
    key="kead_evaluation",
    partitions_def=pretrain_source_partitions,
    deps=[dg.AssetDep("anomaly_maps")],
    code_version=EVALUATION_CODE_VERSION,
    group_name="kead",
    kinds={"parquet"},
    description=(
        "Image and pixel AUROC of one source's anomaly maps against its ground-truth masks (or, without masks, "
        "its boxes: box-interior pixels), overall and per defect class and category, the few-shot references "
        "left out (`evaluations/kead/<source>.parquet`, one block of rows per map-store version, so encoders and "
        "plain vs adapted features stay comparable). Sources without masks or boxes are skipped with a note."
    ),
)
def kead_evaluation(context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource) -> dg.MaterializeResult:
    layout = pipeline_config.layout()
    source = context.partition_key
    index = _index(layout, source)
    annotations = read_annotations(layout, source)
    if not has_masks(index) and not has_boxes(annotations):
        context.log.info(f"source '{source}' has no ground-truth masks or boxes: nothing to evaluate")
        return dg.MaterializeResult(metadata={"evaluated": False,
                                              "reason": f"source '{source}' has no ground-truth masks or boxes"})
    table = read_map_table(layout.maps_store(source))
    frame = with_run_columns(evaluate_maps(index, table, annotations=annotations), table)
    uri = layout.evaluations("kead", source)
    history = write_evaluation(frame, uri)
    overall = frame[frame["level"] == "overall"].iloc[0]
    history_columns = ["store_version", "encoder", "weights", "adaptor", "n_images", "image_auroc", "pixel_auroc",
                       "evaluated_at"]
    overall_history = history[history["level"] == "overall"].reindex(columns=history_columns)
    return dg.MaterializeResult(
        metadata={
            "evaluated": True,
            "path": dg.MetadataValue.path(uri),
            "encoder": str(overall["encoder"]),
            "store_version": str(table.attrs.get("version")),
            "n_images": int(overall["n_images"]),
            "image_auroc": float(overall["image_auroc"]),
            "pixel_auroc": float(overall["pixel_auroc"]),
            "ground_truth": str(overall["ground_truth"]),
            "references_excluded": int(overall["references_excluded"]),
            "table": dg.MetadataValue.md(_md_table(frame.drop(columns=["encoder", "store_version", "weights",
                                                                     "adaptor", "evaluated_at"]))),
            "history": dg.MetadataValue.md(_md_table(overall_history)),
            "versions_evaluated": int(overall_history["store_version"].nunique()),
        },
        data_version=dg.DataVersion(f"{table.attrs.get('version')}:{len(table)}"),
    )


ADAPTOR_CODE_VERSION = "feature-adaptor-1"


@dg.asset(
    key="feature_adaptor",
    deps=[dg.AssetDep("image_index", partition_mapping=dg.AllPartitionMapping())],
    pool="gpu",
    code_version=ADAPTOR_CODE_VERSION,
    group_name="kead",
    kinds={"pytorch", "safetensors"},
    description=(
        "ADPretrain feature adaptor for the cnn_fewshot encoder: a projector of residual features (patch minus "
        "nearest normal reference patch) trained with the angle- and norm-oriented losses on real masks and "
        "synthetic anomalies of the pretraining-only sources. Writes `checkpoints/adaptor/<encoder>/<run_id>` "
        "(weights, lineage: sources, references, synthetic recipe) and moves latest.json; `kead.adaptor: latest` "
        "makes anomaly_maps score with it (a new map-store version)."
    ),
)
def feature_adaptor(context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource,
                    kead_model: KeadModelResource) -> dg.MaterializeResult:
    config = pipeline_config.load()
    layout = config.layout()
    settings = kead_model.settings(config.kead)
    summary = train_and_save_adaptor(config, layout, settings, log=context.log.info)
    return dg.MaterializeResult(metadata={
        "run_dir": dg.MetadataValue.path(summary["run_dir"]),
        "sources": dg.MetadataValue.json(summary["sources"]),
        "training_seconds": float(summary["seconds"]),
        "normal_patches": int(summary["patches"]["normal"]),
        "abnormal_patches": int(summary["patches"]["abnormal"]),
        "images": dg.MetadataValue.json(summary["images"]),
        "final_angle_loss": float(summary["final"]["angle"]),
        "final_norm_loss": float(summary["final"]["norm"]),
    })
