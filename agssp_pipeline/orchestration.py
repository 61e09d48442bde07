"""Headless, in-process materialisation of the asset graph (what ``agssp materialize`` and cron use).

Dagster's UI and daemon are the normal way to run the pipeline; this module gives scripts and cron
jobs the same assets without a server: it walks the selected assets in dependency order and runs each
with the partitions that apply to it:

- assets partitioned by image source run once per source: ``image_index`` for every source, the
  others only for sources used in pretraining (role ``pretrain`` or ``both``), because maps and pseudo
  boxes of held-apart downstream sets must never feed pretraining;
- assets partitioned by backbone run for the backbones listed in the config;
- unpartitioned assets run once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from agssp_pipeline.config import CONFIG_ENV_VAR, PipelineConfig, load_config

SOURCE_PARTITIONS = "image_source"
# assets partitioned by source that run for every source, not only pretraining ones
ALL_SOURCE_ASSETS = {"image_index"}
# assets partitioned by source that only make sense where ground truth exists are still run; they
# record "no ground truth" in their metadata instead of failing.


@dataclass
class StepOutcome:
    asset: str
    partition: str | None
    success: bool
    seconds: float
    error: str | None = None


@dataclass
class MaterializeReport:
    steps: list[StepOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[StepOutcome]:
        return [s for s in self.steps if not s.success]

    def summary_lines(self) -> list[str]:
        lines = []
        for step in self.steps:
            where = f"[{step.partition}]" if step.partition else ""
            status = "ok" if step.success else f"FAILED: {step.error}"
            lines.append(f"  {step.asset}{where}: {status} ({step.seconds:.1f} s)")
        return lines


def prepare_instance(config: PipelineConfig, config_path: str) -> dg.DagsterInstance:
    """The persistent Dagster instance (DAGSTER_HOME, default ``<config dir>/dagster_home``)."""
    os.environ[CONFIG_ENV_VAR] = str(Path(config_path).resolve())
    if not os.environ.get("DAGSTER_HOME"):
        home = Path(config_path).resolve().parent / "dagster_home"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["DAGSTER_HOME"] = str(home)
    instance = dg.DagsterInstance.get()
    register_sources(instance, config)
    return instance


def register_sources(instance: dg.DagsterInstance, config: PipelineConfig) -> None:
    existing = set(instance.get_dynamic_partitions(SOURCE_PARTITIONS))
    missing = [name for name in config.source_names if name not in existing]
    if missing:
        instance.add_dynamic_partitions(SOURCE_PARTITIONS, missing)


def _partitions_for(
    assets_def: dg.AssetsDefinition, key: dg.AssetKey, config: PipelineConfig, only_source: str | None
) -> list[str | None]:
    partitions_def = assets_def.partitions_def
    if partitions_def is None:
        return [None]
    if isinstance(partitions_def, dg.DynamicPartitionsDefinition) and partitions_def.name == SOURCE_PARTITIONS:
        if key.to_user_string() in ALL_SOURCE_ASSETS:
            names = config.source_names
        else:
            names = [s.name for s in config.pretrain_sources()]
        if only_source is not None:
            if only_source not in config.source_names:
                raise KeyError(f"unknown source '{only_source}' (configured: {', '.join(config.source_names)})")
            names = [n for n in names if n == only_source]
        return list(names)
    if isinstance(partitions_def, dg.StaticPartitionsDefinition):
        keys = partitions_def.get_partition_keys()
        wanted = [b for b in config.backbone.backbones if b in keys]
        return list(wanted)
    raise ValueError(f"asset {key.to_user_string()} has partitions the headless runner does not know")


def materialize_selection(
    defs: dg.Definitions,
    config: PipelineConfig,
    instance: dg.DagsterInstance,
    selection: str | None = None,
    only_source: str | None = None,
    on_step: Callable[[StepOutcome], None] | None = None,
    stop_on_failure: bool = False,
    log_level: str = "INFO",
) -> MaterializeReport:
    """Materialise the selected assets in dependency order, one in-process run per asset partition.

    A failing partition (e.g. a source whose folder is missing) fails alone: the same source's
    downstream steps are skipped, other sources go on, and unpartitioned consumers use what succeeded.
    """
    graph = defs.resolve_asset_graph()
    assets_defs = [a for a in graph.assets_defs if a.is_executable]
    asset_selection = dg.AssetSelection.from_string(selection) if selection else dg.AssetSelection.all()
    selected = asset_selection.resolve(graph)
    report = MaterializeReport()
    failed: dict[dg.AssetKey, set[str | None]] = {}
    attempted: dict[dg.AssetKey, int] = {}
    for key in graph.toposorted_asset_keys:
        if key not in selected or not graph.get(key).is_materializable:
            continue
        parents = graph.get(key).parent_keys
        partitions = _partitions_for(graph.assets_def_for_key(key), key, config, only_source)
        attempted[key] = len(partitions)
        for partition in partitions:
            blocked = [
                p.to_user_string()
                for p in parents
                if None in failed.get(p, set())
                or (partition is not None and partition in failed.get(p, set()))
                or (partition is None and attempted.get(p) and len(failed.get(p, set())) >= attempted[p])
            ]
            start = time.perf_counter()
            if blocked:
                error = f"skipped: upstream {', '.join(blocked)} failed"
            else:
                try:
                    result = dg.materialize(
                        assets_defs,
                        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
                        instance=instance,
                        partition_key=partition,
                        selection=dg.AssetSelection.assets(key),
                        raise_on_error=False,
                    )
                    error = None if result.success else _first_error(result)
                except Exception as exc:  # a definition-level error: report it, go on with the rest
                    error = f"{type(exc).__name__}: {exc}"
            outcome = StepOutcome(key.to_user_string(), partition, error is None, time.perf_counter() - start, error)
            report.steps.append(outcome)
            if on_step:
                on_step(outcome)
            if error is not None:
                failed.setdefault(key, set()).add(partition)
                if stop_on_failure:
                    return report
    return report


def _first_error(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            err = event.step_failure_data.error
            cause = err.cause.message.strip() if err.cause else ""
            return (err.message.strip() + (f" | cause: {cause}" if cause else ""))[:2000]
    return "run failed (see the Dagster run log)"


def iter_config_sources(config_path: str) -> Iterable[str]:
    return load_config(config_path).source_names
