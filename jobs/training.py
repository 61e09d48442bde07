"""AGBP backbone pretraining: a job per backbone partition and an opt-in weekly schedule.

Pretraining costs GPU hours, so nothing starts it automatically by default: the schedule ships
STOPPED and, once a user switches it on, requests the backbones listed in ``backbone.backbones`` of
agssp.yaml (those the backbone registry knows: the keys of the dynamic ``backbone`` partitions, which the
schedule registers first, as schedules cannot return partition requests). Each request carries a run
key per (backbone, week), so a restarted daemon does not launch the same week twice.
"""

import dagster as dg

from assets.partitions import backbone_partitions, known_backbones, sync_partitions
from assets.resources import PipelineConfigResource
from assets.training import backbone_checkpoint

backbone_pretraining_job = dg.define_asset_job(
    "backbone_pretraining_job",
    selection=dg.AssetSelection.assets(backbone_checkpoint),
    partitions_def=backbone_partitions,
    description="AGBP pretraining of one backbone (its partition) on all pretraining sources; GPU pool.",
)


def scheduled_backbones(configured: list[str]) -> tuple[list[str], list[str]]:
    """(configured backbones that are partitions, configured names the registry does not know)."""
    return known_backbones(configured)


@dg.schedule(
    job=backbone_pretraining_job,
    cron_schedule="0 2 * * 6",  # Saturday 02:00: plants' GPUs are idlest at the weekend
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Weekly AGBP pretraining of the backbones in agssp.yaml (backbone.backbones); off until enabled.",
)
def weekly_backbone_pretraining(
    context: dg.ScheduleEvaluationContext, pipeline_config: PipelineConfigResource
):
    config = pipeline_config.load()
    sync_partitions(context.instance, config)
    wanted, unknown = scheduled_backbones(config.backbone.backbones)
    if unknown:
        context.log.warning(f"not registered backbones (agssp_pipeline.training.backbones), skipped: {', '.join(unknown)}")
    if not wanted:
        return dg.SkipReason("no configured backbone is a backbone_checkpoint partition")
    week = context.scheduled_execution_time.strftime("%G-W%V")
    return [
        dg.RunRequest(partition_key=name, run_key=f"{name}:{week}", tags={"agssp/backbone": name})
        for name in wanted
    ]


JOBS = [backbone_pretraining_job]
SCHEDULES = [weekly_backbone_pretraining]
