"""The one Dagster entry point: ``agssp_pipeline.definitions:defs``."""

from __future__ import annotations

import dagster as dg

import agssp_pipeline  # noqa: F401  (applies offline defaults before anything loads models)
from assets import ASSET_MODULES
from assets.resources import PipelineConfigResource, default_config_path
from jobs import JOB_MODULES
from jobs.deploy import executor_from_env


def build_resources(config_path: str | None = None) -> dict:
    resources: dict = {"pipeline_config": PipelineConfigResource(config_path=config_path or default_config_path())}
    for module in ASSET_MODULES:
        resources.update(getattr(module, "RESOURCES", {}))
    return resources


def build_definitions(config_path: str | None = None) -> dg.Definitions:
    """Assets, checks, jobs (each module's, among them one named step job per asset: jobs/steps.py) and
    automation. Partition keys are not part of the definitions: they live in the instance, registered
    from the config by the sensors, schedules and ``orchestration.register_sources``."""
    return dg.Definitions(
        assets=dg.load_assets_from_modules(ASSET_MODULES),
        asset_checks=dg.load_asset_checks_from_modules(ASSET_MODULES),
        jobs=[job for module in JOB_MODULES for job in getattr(module, "JOBS", [])],
        schedules=[s for module in JOB_MODULES for s in getattr(module, "SCHEDULES", [])],
        sensors=[s for module in JOB_MODULES for s in getattr(module, "SENSORS", [])],
        resources=build_resources(config_path),
        executor=executor_from_env(),  # AGSSP_EXECUTOR=k8s: one pod per step (docs/deployment.md)
    )


defs = build_definitions()
