"""One named job per asset (``materialize__<asset>``): what the headless runner runs, step by step.

Runs of these jobs name the asset they ran (an ad-hoc run would be ``__ephemeral_asset_job__``), and the
UI lists them with the other jobs. Built here, once, so sensors that launch a step (the maps that follow
an ingestion run) target the very job object the runner uses.
"""

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from agssp_pipeline.orchestration import define_step_jobs, step_job_name
from assets import ASSET_MODULES

STEP_JOBS: dict[str, UnresolvedAssetJobDefinition] = {
    job.name: job for job in define_step_jobs(dg.load_assets_from_modules(ASSET_MODULES))
}


def step_job(key: dg.AssetKey | str) -> UnresolvedAssetJobDefinition:
    """The step job of one asset."""
    return STEP_JOBS[step_job_name(dg.AssetKey(key) if isinstance(key, str) else key)]


JOBS = list(STEP_JOBS.values())
