"""Ingestion automation: a job per source partition, a sensor that watches the source folders, and a
daily schedule that catches whatever the sensor missed (sensor stopped, cursor reset).

Both compare folder fingerprints (paths, sizes, mtimes; no file contents) and launch runs only for
sources whose folder changed. Run keys are ``<source>:<fingerprint>``, so a folder state is ingested
once however many ticks see it. The sensor's index run of a pretraining source is followed by a run of
its ``anomaly_maps`` partition (``maps_after_ingestion_sensor``, on the index run's success; one run can
not hold both, as they belong to different partition sets): the map store is incremental, so only the new
images are encoded; the cheap assets downstream (thresholds, pseudo boxes) then follow through their
automation condition. Downstream-only sources are re-indexed only (they never get maps).

Settling: a source with ``options.settle_seconds`` (or the ``AGSSP_INGEST_SETTLE_SECONDS`` default, 0)
is left for a later tick while its newest file is younger than that, for folders filled in batches
(an operator copying a shift from USB) where a half-written JPEG would otherwise be quarantined for one
run. Keep it 0 for live camera folders, which never stop changing; there the next run heals the
transient quarantine row anyway, because the completed file changes the fingerprint.
"""

import json
import os
import time

import dagster as dg

from agssp_pipeline.config import PipelineConfig
from agssp_pipeline.sources import source_snapshot
from assets.ingestion import combined_fingerprint, fingerprint_metadata, image_index, plant_images
from assets.kead import anomaly_maps
from assets.partitions import image_source_partitions, partition_requests, sync_partitions
from assets.resources import PipelineConfigResource
from jobs.steps import step_job

ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.assets(image_index),
    partitions_def=image_source_partitions,
    description="Re-index one image source (its partition): index, annotations and quarantine Parquet files.",
)


maps_job = step_job(anomaly_maps.key)
# set on the sensor's index runs of pretraining sources: their maps follow once the index is written
MAPS_FOLLOW_TAG = "agssp/maps_follow"

SETTLE_ENV_VAR = "AGSSP_INGEST_SETTLE_SECONDS"
DEFAULT_SETTLE_SECONDS = 0.0


def settled_fingerprints(config: PipelineConfig, log=None, now: float | None = None) -> dict[str, str]:
    """source -> folder fingerprint, for sources whose root exists and whose newest file has settled."""
    default_settle = float(os.environ.get(SETTLE_ENV_VAR, DEFAULT_SETTLE_SECONDS))
    now = time.time() if now is None else now
    found: dict[str, str] = {}
    for source in config.sources:
        try:
            snapshot = source_snapshot(source)
        except FileNotFoundError as error:
            if log is not None:
                log.warning(f"{error}; no run requested until it appears")
            continue
        settle = float(source.options.get("settle_seconds", default_settle))
        age = now - snapshot.newest_mtime
        if 0 <= age < settle:  # a future mtime (clock skew between hosts) does not block ingestion
            if log is not None:
                log.info(f"source '{source.name}': newest file is {age:.0f}s old (< {settle:.0f}s); waiting for copies to finish")
            continue
        found[source.name] = snapshot.fingerprint
    return found


def ingestion_requests(current: dict[str, str], previous: dict[str, str],
                       pretrain_sources: set[str] | None = None) -> list[dg.RunRequest]:
    """One run per source whose fingerprint differs from ``previous`` (new sources included).

    Runs of sources in ``pretrain_sources`` carry ``MAPS_FOLLOW_TAG``: their anomaly maps are brought up
    to date after the index run (``maps_after_ingestion_sensor``).
    """
    pretrain_sources = pretrain_sources or set()
    return [
        dg.RunRequest(partition_key=name, run_key=f"{name}:{fingerprint}", asset_selection=[image_index.key],
                      tags={"agssp/source": name, "agssp/folder_fingerprint": fingerprint,
                            **({MAPS_FOLLOW_TAG: "true"} if name in pretrain_sources else {})})
        for name, fingerprint in sorted(current.items())
        if previous.get(name) != fingerprint
    ]


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=60,
    description="Keeps the source and backbone partitions equal to agssp.yaml and re-ingests sources whose "
                "folder changed.",
)
def new_plant_images_sensor(context: dg.SensorEvaluationContext,
                            pipeline_config: PipelineConfigResource) -> dg.SensorResult:
    config = pipeline_config.load()
    previous: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    current = settled_fingerprints(config, context.log)
    partitions = partition_requests(context.instance.get_dynamic_partitions, config)
    run_requests = ingestion_requests(current, previous, {s.name for s in config.pretrain_sources()})
    state = {name: fp for name, fp in {**previous, **current}.items() if name in config.source_names}
    # a runless observation of plant_images: the UI marks image_index stale right away
    observations = [dg.AssetObservation(asset_key=plant_images.key, metadata=fingerprint_metadata(state),
                                        tags={"dagster/data_version": combined_fingerprint(state)})] if run_requests else []
    cursor = json.dumps(state, sort_keys=True)
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=partitions,
        asset_events=observations,
        cursor=cursor,
        skip_reason=None if run_requests else dg.SkipReason("no source folder changed"),
    )


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[ingest_job],
    request_job=maps_job,
    default_status=dg.DefaultSensorStatus.RUNNING,  # inert unless the ingestion sensor tagged a run
    description="After the ingestion sensor re-indexed a pretraining source: bring its anomaly maps up to date.",
)
def maps_after_ingestion_sensor(context: dg.RunStatusSensorContext):
    run = context.dagster_run
    source = run.tags.get("dagster/partition")
    if run.tags.get(MAPS_FOLLOW_TAG) != "true" or not source:
        return dg.SkipReason(f"run {run.run_id} is not an ingestion-sensor run of a pretraining source")
    return dg.RunRequest(partition_key=source, run_key=f"maps:{run.run_id}",
                         tags={"agssp/source": source, "agssp/after_run": run.run_id,
                               "agssp/folder_fingerprint": run.tags.get("agssp/folder_fingerprint", "")})


def last_ingested_fingerprints(instance: dg.DagsterInstance, names: list[str]) -> dict[str, str]:
    """folder_fingerprint recorded by the latest image_index materialization of each partition."""
    found: dict[str, str] = {}
    for name in names:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=image_index.key, asset_partitions=[name]), limit=1
        ).records
        if records and records[0].asset_materialization is not None:
            value = records[0].asset_materialization.metadata.get("folder_fingerprint")
            if value is not None:
                found[name] = str(value.value)
    return found


@dg.schedule(
    job=ingest_job,
    cron_schedule="0 2 * * *",
    description="Nightly: re-ingests every source whose folder differs from what its index was built from.",
)
def nightly_ingest_schedule(context: dg.ScheduleEvaluationContext,
                            pipeline_config: PipelineConfigResource) -> list[dg.RunRequest] | dg.SkipReason:
    config = pipeline_config.load()
    sync_partitions(context.instance, config)  # schedules cannot return partition requests
    current = settled_fingerprints(config, context.log)
    requests = ingestion_requests(current, last_ingested_fingerprints(context.instance, sorted(current)))
    return requests or dg.SkipReason("every source index matches its folder")


JOBS = [ingest_job]
SENSORS = [new_plant_images_sensor, maps_after_ingestion_sensor]
SCHEDULES = [nightly_ingest_schedule]
