"""Headless, in-process materialisation of the asset graph (what ``agssp materialize`` and cron use).

Dagster's UI and daemon are the normal way to run the pipeline; this module gives scripts and cron
jobs the same assets without a server. It walks the selected assets in dependency order and runs each
as its own named job (``materialize__<asset>``, part of the Definitions, so the UI lists the runs under
the asset they ran) over the partitions that apply to it:

- ``image_index`` runs for every source, assets of the ``pretrain_source`` partitions only for sources
  used in pretraining (role ``pretrain`` or ``both``): their keys are the partition set's keys, so maps
  and pseudo boxes of held-apart downstream sets cannot be run;
- assets partitioned by backbone run for the configured, registered backbones;
- unpartitioned assets run once.

An asset whose ``BackfillPolicy`` is single-run (``anomaly_maps``) runs all its partitions in one run,
like a UI backfill, so the model loads once per run; the others run once per partition. Partition keys
come from ``assets/partitions.py``, the one place that says which keys each set holds.
"""

from __future__ import annotations

import difflib
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from agssp_pipeline import artifact_io
from agssp_pipeline.config import CONFIG_ENV_VAR, PipelineConfig, SelectionError, load_config
from assets.partitions import (
    IMAGE_SOURCE_PARTITION,
    PRETRAIN_SOURCE_PARTITION,
    sync_partitions,
    wanted_partitions,
)

STEP_JOB_PREFIX = "materialize__"
SOURCE_SETS = (IMAGE_SOURCE_PARTITION, PRETRAIN_SOURCE_PARTITION)
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
HOST_TAG, PID_TAG = "agssp/host", "agssp/pid"  # which process runs a headless run (to spot killed ones)


@dataclass
class StepOutcome:
    asset: str
    partition: str | None
    success: bool
    seconds: float  # of the run that materialised it (shared by the partitions of a single run)
    error: str | None = None
    job: str | None = None
    run_id: str | None = None
    checks_failed: list[str] = field(default_factory=list)  # ERROR-severity checks that did not pass
    checks_warned: list[str] = field(default_factory=list)  # WARN-severity checks that did not pass
    images_failed: int = 0  # images the step could not process (e.g. undecodable for anomaly_maps)

    @property
    def ok(self) -> bool:
        """Succeeded, with no ERROR check failed and no image lost: what a script may rely on."""
        return self.success and not self.checks_failed and not self.images_failed

    @property
    def skipped(self) -> bool:
        """Not run because an upstream step failed (the runner's own error text says so)."""
        return not self.success and (self.error or "").startswith("skipped:")

    @property
    def status(self) -> str:
        """One word for tables: ok, FAILED, skipped, or what an ok run still lost."""
        if self.skipped:
            return "skipped"
        if not self.success:
            return "FAILED"
        if self.checks_failed:
            return "CHECK FAILED"
        if self.images_failed:
            return "IMAGES LOST"
        return "warn" if self.checks_warned else "ok"


@dataclass
class RunFindings:
    """What one run said beyond success: its failed checks and the images it could not process."""

    checks_failed: dict[str | None, list[str]] = field(default_factory=dict)  # partition -> check names
    checks_warned: dict[str | None, list[str]] = field(default_factory=dict)
    images_failed: dict[str | None, int] = field(default_factory=dict)

    def for_partition(self, partition: str | None, whole_run: bool) -> dict:
        """StepOutcome fields of one partition; ``whole_run``: the run had only this one partition."""
        def get(mapping: dict) -> list:
            return [v for key, v in mapping.items() if whole_run or key == partition]

        return {"checks_failed": [n for names in get(self.checks_failed) for n in names],
                "checks_warned": [n for names in get(self.checks_warned) for n in names],
                "images_failed": sum(get(self.images_failed))}


@dataclass
class MaterializeReport:
    steps: list[StepOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[StepOutcome]:
        return [s for s in self.steps if not s.success]

    @property
    def problems(self) -> list[StepOutcome]:
        """Steps that failed, failed an ERROR check or lost images: any of them makes the CLI exit 1."""
        return [s for s in self.steps if not s.ok]

    @property
    def warnings(self) -> list[StepOutcome]:
        return [s for s in self.steps if s.checks_warned]

    def summary_lines(self) -> list[str]:
        lines = []
        for step in self.steps:
            where = f"[{step.partition}]" if step.partition else ""
            status = "ok" if step.success else f"FAILED: {step.error}"
            lines.append(f"  {step.asset}{where}: {status} ({step.seconds:.1f} s)")
        return lines


INSTANCE_YAML = """\
# Dagster instance of this agssp config, written by agssp (edit freely; it is not rewritten).
# Storage defaults to SQLite files in this folder; see docker/dagster.yaml for PostgreSQL.
telemetry:
  enabled: false
"""


def instance_home(config_path: str | os.PathLike[str]) -> Path:
    """``<config dir>/dagster_home``, created with a ``dagster.yaml`` (telemetry off) when it has none.

    The CLI and ``make ui`` both use this folder, so the UI shows the runs the CLI made. Without a
    ``dagster.yaml`` Dagster prints a banner on every run and asks about telemetry.
    """
    home = Path(config_path).resolve().parent / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    if not settings.exists() and not (home / "dagster.yml").exists():
        settings.write_text(INSTANCE_YAML)
    return home


def prepare_instance(config: PipelineConfig, config_path: str) -> dg.DagsterInstance:
    """The persistent Dagster instance (DAGSTER_HOME, default ``<config dir>/dagster_home``)."""
    os.environ[CONFIG_ENV_VAR] = str(Path(config_path).resolve())
    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(instance_home(config_path))
    instance = dg.DagsterInstance.get()
    register_sources(instance, config)
    fail_orphaned_runs(instance)
    return instance


def fail_orphaned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark headless runs of this host whose process is gone (killed, machine rebooted) as failed.

    An in-process run that is killed never reports its end, so it would stay STARTED in the UI forever;
    runs launched by the daemon are watched by Dagster's own run monitoring instead. Returns the run ids.
    """
    import socket

    active = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED]
    host = socket.gethostname()
    failed = []
    for run in instance.get_runs(dg.RunsFilter(statuses=active, tags={HOST_TAG: host})):
        pid = run.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not artifact_io.process_alive(int(pid)):
            instance.report_run_failed(run, f"process {pid} on {host} that ran it ended before the run finished "
                                            "(killed?); marked failed by the next agssp materialize")
            failed.append(run.run_id)
    return failed


def register_sources(instance: dg.DagsterInstance, config: PipelineConfig) -> None:
    """Make the source and backbone partitions match the config (stale role keys removed)."""
    sync_partitions(instance, config)


def step_job_name(key: dg.AssetKey) -> str:
    """The named job that materialises one asset: runs say which asset they ran."""
    return STEP_JOB_PREFIX + key.to_python_identifier()


def define_step_jobs(assets_defs: Iterable[dg.AssetsDefinition]) -> list[UnresolvedAssetJobDefinition]:
    """One job per materialisable asset (with its checks), over the asset's own partitions."""
    jobs = []
    for assets_def in assets_defs:
        if not isinstance(assets_def, dg.AssetsDefinition) or not assets_def.is_executable:
            continue
        for key in assets_def.keys:
            if assets_def.is_materializable:
                jobs.append(dg.define_asset_job(
                    step_job_name(key), selection=dg.AssetSelection.assets(key),
                    description=f"Materialise {key.to_user_string()} (the headless runner's step; "
                                "its checks run with it).",
                ))
    return jobs


def _with_step_jobs(defs: dg.Definitions, keys: Iterable[dg.AssetKey]) -> dg.Definitions:
    """``defs`` plus the step jobs it lacks (Definitions built elsewhere than ``build_definitions``)."""
    have = {job.name for job in defs.jobs or []}
    missing = [key for key in keys if step_job_name(key) not in have]
    if not missing:
        return defs
    extra = [dg.define_asset_job(step_job_name(key), selection=dg.AssetSelection.assets(key)) for key in missing]
    return dg.Definitions.merge(defs, dg.Definitions(jobs=extra))


@dataclass(frozen=True)
class PlannedStep:
    """One (asset, partition) the runner will report an outcome for."""

    asset: str
    partition: str | None


def _closest(word: str, known: Iterable[str]) -> str:
    matches = difflib.get_close_matches(word, sorted(set(known)), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(matches)}?" if matches else ""


SELECTION_WORDS = {"and", "or", "not", "all", "sinks", "roots"}  # operators and functions, not names
SELECTION_TOKEN = re.compile(r'(?:(\w+):)?"?([A-Za-z_][\w/.*=@\-]*)"?')


def _unknown_names(selection: str, graph) -> str | None:
    """A one-line message for the first asset key or group in ``selection`` that the graph lacks."""
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    groups = {graph.get(k).group_name for k in graph.get_all_asset_keys()} - {None}
    for attribute, value in SELECTION_TOKEN.findall(selection):
        if "*" in value or (not attribute and value in SELECTION_WORDS):
            continue
        if attribute in ("", "key") and value not in keys:
            return f"unknown asset '{value}' in --select '{selection}'{_closest(value, keys)}"
        if attribute == "group" and value not in groups:
            return f"unknown asset group '{value}' in --select '{selection}'{_closest(value, groups)}"
    return None


def selected_keys(graph, selection: str | None) -> list[dg.AssetKey]:
    """Materialisable keys of ``selection`` in dependency order; a typo raises SelectionError."""
    if selection:
        unknown = _unknown_names(selection, graph)
        if unknown:
            raise SelectionError(unknown)
        try:
            selected = dg.AssetSelection.from_string(selection).resolve(graph)
        except Exception as error:  # Dagster's parser errors are long; keep the first line
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SelectionError(f"invalid asset selection '{selection}': {first}") from None
    else:
        selected = dg.AssetSelection.all().resolve(graph)
    keys = [k for k in graph.toposorted_asset_keys if k in selected and graph.get(k).is_materializable]
    if selection and not keys:
        names = sorted(k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_materializable)
        raise SelectionError(f"--select '{selection}' matches no asset that can be materialised "
                             f"(assets: {', '.join(names)})")
    return keys


def check_source(config: PipelineConfig, only_source: str | None) -> None:
    """A ``--partition`` that names no configured source raises SelectionError with the closest names."""
    if only_source is not None and only_source not in config.source_names:
        raise SelectionError(f"unknown source '{only_source}'{_closest(only_source, config.source_names)} "
                             f"(configured: {', '.join(config.source_names) or 'none'})")


def plan_selection(defs: dg.Definitions, config: PipelineConfig, selection: str | None = None,
                   only_source: str | None = None) -> list[PlannedStep]:
    """The steps ``materialize_selection`` will report, in order, without running anything.

    One per (asset, partition), skipped ones included, so a progress bar knows its total.
    """
    graph = defs.resolve_asset_graph()
    check_source(config, only_source)
    return [PlannedStep(key.to_user_string(), partition)
            for key in selected_keys(graph, selection)
            for partition in _partitions_for(graph.get(key).partitions_def, key, config, only_source)]


def _partitions_for(
    partitions_def: dg.PartitionsDefinition | None, key: dg.AssetKey, config: PipelineConfig,
    only_source: str | None,
) -> list[str | None]:
    if partitions_def is None:
        return [None]
    wanted = wanted_partitions(config)
    name = getattr(partitions_def, "name", None)
    if not isinstance(partitions_def, dg.DynamicPartitionsDefinition) or name not in wanted:
        raise ValueError(f"asset {key.to_user_string()} has partitions the headless runner does not know")
    names = wanted[name]
    if only_source is not None and name in SOURCE_SETS:
        check_source(config, only_source)
        names = [n for n in names if n == only_source]
    return list(names)


def _batches(
    node, partitions: list[str | None], instance: dg.DagsterInstance
) -> list[list[str | None]]:
    """Partitions per run: contiguous ranges of the partition set for a single-run asset, else one each."""
    if len(partitions) <= 1 or node.backfill_policy != dg.BackfillPolicy.single_run():
        return [[p] for p in partitions]
    order = {k: i for i, k in enumerate(instance.get_dynamic_partitions(node.partitions_def.name))}
    batches: list[list[str | None]] = []
    for partition in sorted(partitions, key=lambda p: order[p]):
        if batches and order[partition] == order[batches[-1][-1]] + 1:
            batches[-1].append(partition)
        else:
            batches.append([partition])
    return batches


def _findings(result: dg.ExecuteInProcessResult) -> RunFindings:
    """Failed checks (by severity) and ``images_failed`` metadata of a run, per partition."""
    findings = RunFindings()
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.passed:
            continue
        name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
        bucket = (findings.checks_failed if evaluation.severity == dg.AssetCheckSeverity.ERROR
                  else findings.checks_warned)
        bucket.setdefault(evaluation.partition, []).append(name)
    for event in result.get_asset_materialization_events():
        materialization = event.materialization
        value = materialization.metadata.get("images_failed")
        count = int(getattr(value, "value", value) or 0)
        if count:
            findings.images_failed[materialization.partition] = count
    return findings


def _execute(job: dg.JobDefinition, instance: dg.DagsterInstance, partitions: Sequence[str | None],
             log_level: str) -> tuple[str | None, str | None, RunFindings]:
    """One in-process run of ``job`` over ``partitions``: (error or None, run id, findings)."""
    import socket

    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    if len(partitions) > 1:
        tags.update({RANGE_START_TAG: partitions[0], RANGE_END_TAG: partitions[-1]})
    try:
        result = job.execute_in_process(
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
            instance=instance, partition_key=partitions[0] if len(partitions) == 1 else None,
            tags=tags, raise_on_error=False,
        )
    except Exception as exc:  # a definition-level error: report it, go on with the rest
        return f"{type(exc).__name__}: {exc}", None, RunFindings()
    return (None if result.success else _first_error(result)), result.run_id, _findings(result)


def _run_batch(job: dg.JobDefinition, key: dg.AssetKey, instance: dg.DagsterInstance,
               batch: list[str | None], log_level: str) -> list[StepOutcome]:
    """Run one batch; a failed run over several partitions is retried per partition, so a failing
    source fails alone (map stores are incremental: sources already done cost a skip)."""
    start = time.perf_counter()
    error, run_id, found = _execute(job, instance, batch, log_level)
    seconds = time.perf_counter() - start
    if error is None or len(batch) == 1:
        return [StepOutcome(key.to_user_string(), p, error is None, seconds, error, job.name, run_id,
                            **found.for_partition(p, whole_run=len(batch) == 1)) for p in batch]
    return [outcome for p in batch for outcome in _run_batch(job, key, instance, [p], log_level)]


def _blocked(parents, partition: str | None, failed: dict, attempted: dict) -> list[str]:
    """Parents whose failure stops this partition: same key, unpartitioned, or every partition failed."""
    return [
        p.to_user_string()
        for p in parents
        if None in failed.get(p, set())
        or (partition is not None and partition in failed.get(p, set()))
        or (partition is None and attempted.get(p) and len(failed.get(p, set())) >= attempted[p])
    ]


def _record(report: MaterializeReport, key: dg.AssetKey, outcome: StepOutcome, failed: dict,
            on_step: Callable[[StepOutcome], None] | None) -> bool:
    """Add ``outcome`` to the report (and tell ``on_step``); True when it failed."""
    report.steps.append(outcome)
    if on_step:
        on_step(outcome)
    if not outcome.success:
        failed.setdefault(key, set()).add(outcome.partition)
    return not outcome.success


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
    """Materialise the selected assets in dependency order, each as its named job (see module docstring).

    A failing partition (e.g. a source whose folder is missing) fails alone: the same source's
    downstream steps are skipped, other sources go on, and unpartitioned consumers use what succeeded.
    """
    graph = defs.resolve_asset_graph()
    check_source(config, only_source)
    keys = selected_keys(graph, selection)
    defs = _with_step_jobs(defs, keys)
    report = MaterializeReport()
    failed: dict[dg.AssetKey, set[str | None]] = {}
    attempted: dict[dg.AssetKey, int] = {}
    for key in keys:
        node = graph.get(key)
        partitions = _partitions_for(node.partitions_def, key, config, only_source)
        attempted[key] = len(partitions)
        runnable = []
        for partition in partitions:
            blocked = _blocked(node.parent_keys, partition, failed, attempted)
            if not blocked:
                runnable.append(partition)
            elif _record(report, key, StepOutcome(key.to_user_string(), partition, False, 0.0,
                                             f"skipped: upstream {', '.join(blocked)} failed"),
                         failed, on_step) and stop_on_failure:
                return report
        job = defs.resolve_job_def(step_job_name(key)) if runnable else None
        for batch in _batches(node, runnable, instance):
            for outcome in _run_batch(job, key, instance, batch, log_level):
                if _record(report, key, outcome, failed, on_step) and stop_on_failure:
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
