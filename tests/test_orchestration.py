"""Partition sets that match the sources' roles, and the headless runner's named, per-asset runs.

A stand-in graph with the pipeline's partition sets (image_source -> pretrain_source, single-run maps)
keeps the runner's tests fast; the registration tests use the project's own partition sets.
"""

# no `from __future__ import annotations`: Dagster inspects the context annotation at runtime
import dagster as dg
import pytest

from agssp_pipeline.config import PipelineConfig
from agssp_pipeline.orchestration import materialize_selection, register_sources, step_job_name
from assets.partitions import (
    BACKBONE_PARTITION,
    IMAGE_SOURCE_PARTITION,
    PRETRAIN_SOURCE_PARTITION,
    image_source_partitions,
    partition_requests,
    pretrain_source_partitions,
)


def _config(tmp_path, roles: dict[str, str], backbones: list[str]) -> PipelineConfig:
    sources = [{"name": name, "format": "image_folder", "root": str(tmp_path / name), "category": "strip",
                "role": role} for name, role in roles.items()]
    return PipelineConfig.model_validate({"storage_root": str(tmp_path / "store"), "sources": sources,
                                          "backbone": {"backbones": backbones}})


def test_pretraining_partitions_hold_only_pretraining_sources_and_backbones_follow_the_config(tmp_path):
    config = _config(tmp_path, {"plant": "pretrain", "customer": "downstream"}, ["yolov8n", "resnet50"])
    with dg.instance_for_test() as instance:
        register_sources(instance, config)
        assert instance.get_dynamic_partitions(IMAGE_SOURCE_PARTITION) == ["plant", "customer"]
        assert instance.get_dynamic_partitions(PRETRAIN_SOURCE_PARTITION) == ["plant"]
        assert instance.get_dynamic_partitions(BACKBONE_PARTITION) == config.backbone.backbones
        assert partition_requests(instance.get_dynamic_partitions, config) == []  # in step: nothing to do

        # the downstream set joins pretraining, the plant leaves it, a backbone is dropped, a typo ignored
        changed = _config(tmp_path, {"plant": "downstream", "customer": "both"}, ["resnet50", "resnet5O"])
        register_sources(instance, changed)
        assert instance.get_dynamic_partitions(PRETRAIN_SOURCE_PARTITION) == ["customer"]
        assert instance.get_dynamic_partitions(BACKBONE_PARTITION) == ["resnet50"]
        # the index history of every source stays addressable
        assert instance.get_dynamic_partitions(IMAGE_SOURCE_PARTITION) == ["plant", "customer"]


def test_project_assets_use_the_partition_set_of_their_role():
    from agssp_pipeline.definitions import build_definitions

    graph = build_definitions("unused.yaml").resolve_asset_graph()
    sets = {key.to_user_string(): getattr(graph.get(key).partitions_def, "name", None)
            for key in graph.get_all_asset_keys() if graph.get(key).is_materializable}
    assert sets["image_index"] == IMAGE_SOURCE_PARTITION
    for name in ("anomaly_maps", "kead_evaluation", "pseudo_boxes", "pseudo_box_quality"):
        assert sets[name] == PRETRAIN_SOURCE_PARTITION, name
    assert sets["backbone_checkpoint"] == BACKBONE_PARTITION
    for check_key in graph.asset_check_keys:
        check = graph.get(check_key)
        if check_key.asset_key.to_user_string() in ("anomaly_maps", "pseudo_boxes"):
            assert check.partitions_def.name == PRETRAIN_SOURCE_PARTITION, check_key


def _stand_in_graph(seen: dict[str, list]):
    """index -> maps (single run) -> boxes -> summary; maps of source 'bad' raise."""

    @dg.asset(partitions_def=image_source_partitions)
    def image_index(context: dg.AssetExecutionContext) -> None:
        seen.setdefault("image_index", []).append(context.partition_key)

    @dg.asset(partitions_def=pretrain_source_partitions, backfill_policy=dg.BackfillPolicy.single_run(),
              deps=[dg.AssetDep(image_index, partition_mapping=dg.IdentityPartitionMapping())])
    def anomaly_maps(context: dg.AssetExecutionContext) -> None:
        keys = list(context.partition_keys)
        seen.setdefault("anomaly_maps", []).append(keys)
        if "bad" in keys:
            raise RuntimeError("maps of 'bad' cannot be computed")

    @dg.asset(partitions_def=pretrain_source_partitions, deps=[anomaly_maps])
    def pseudo_boxes(context: dg.AssetExecutionContext) -> None:
        seen.setdefault("pseudo_boxes", []).append(context.partition_key)

    @dg.asset(deps=[dg.AssetDep(pseudo_boxes, partition_mapping=dg.AllPartitionMapping())])
    def summary() -> None:
        seen.setdefault("summary", []).append(None)

    return dg.Definitions(assets=[image_index, anomaly_maps, pseudo_boxes, summary])


@pytest.fixture
def runner_world(tmp_path):
    config = _config(tmp_path, {"line1": "pretrain", "line2": "both", "customer": "downstream"}, ["yolov8n"])
    with dg.instance_for_test() as instance:
        register_sources(instance, config)
        yield config, instance


def _runs_by_job(instance) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in instance.get_runs():
        counts[run.job_name] = counts.get(run.job_name, 0) + 1
    return counts


def test_runner_runs_each_asset_as_a_named_job_and_single_run_assets_once(runner_world):
    config, instance = runner_world
    seen: dict[str, list] = {}
    report = materialize_selection(_stand_in_graph(seen), config, instance, log_level="ERROR")
    assert not report.failed, report.summary_lines()
    assert seen["image_index"] == ["line1", "line2", "customer"]
    assert seen["anomaly_maps"] == [["line1", "line2"]], "one run over every pretraining partition"
    assert seen["pseudo_boxes"] == ["line1", "line2"] and seen["summary"] == [None]
    assert _runs_by_job(instance) == {step_job_name(dg.AssetKey("image_index")): 3,
                                      step_job_name(dg.AssetKey("anomaly_maps")): 1,
                                      step_job_name(dg.AssetKey("pseudo_boxes")): 2,
                                      step_job_name(dg.AssetKey("summary")): 1}
    maps_steps = [s for s in report.steps if s.asset == "anomaly_maps"]
    assert [s.partition for s in maps_steps] == ["line1", "line2"]
    assert len({s.run_id for s in maps_steps}) == 1 and maps_steps[0].job == "materialize__anomaly_maps"
    materialized = instance.get_materialized_partitions(dg.AssetKey("anomaly_maps"))
    assert materialized == {"line1", "line2"}


def test_a_failing_source_in_a_single_run_fails_alone(tmp_path):
    config = _config(tmp_path, {"line1": "pretrain", "bad": "pretrain", "line2": "pretrain"}, ["yolov8n"])
    seen: dict[str, list] = {}
    with dg.instance_for_test() as instance:
        register_sources(instance, config)
        report = materialize_selection(_stand_in_graph(seen), config, instance, log_level="CRITICAL")
        outcome = {(s.asset, s.partition): s for s in report.steps}
        assert not outcome[("anomaly_maps", "bad")].success
        assert "cannot be computed" in outcome[("anomaly_maps", "bad")].error
        assert outcome[("anomaly_maps", "line1")].success and outcome[("anomaly_maps", "line2")].success
        assert seen["anomaly_maps"][0] == ["line1", "bad", "line2"]  # the single run, then one per partition
        assert outcome[("pseudo_boxes", "bad")].error == "skipped: upstream anomaly_maps failed"
        assert outcome[("pseudo_boxes", "line1")].success and outcome[("summary", None)].success


def test_only_source_limits_the_runner_to_that_source(runner_world):
    config, instance = runner_world
    seen: dict[str, list] = {}
    report = materialize_selection(_stand_in_graph(seen), config, instance, only_source="customer",
                                   selection="key:image_index or key:anomaly_maps", log_level="ERROR")
    assert [(s.asset, s.partition) for s in report.steps] == [("image_index", "customer")]
    with pytest.raises(KeyError, match="unknown source"):
        materialize_selection(_stand_in_graph(seen), config, instance, only_source="nope")


def _checked_graph():
    """maps report lost images for one source; a non-blocking ERROR check fails, a WARN check fails."""

    @dg.asset(partitions_def=pretrain_source_partitions)
    def anomaly_maps(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        lost = 2 if context.partition_key == "line2" else 0
        return dg.MaterializeResult(metadata={"images_failed": lost})

    @dg.asset(deps=[dg.AssetDep(anomaly_maps, partition_mapping=dg.AllPartitionMapping())])
    def thresholds() -> None:
        return None

    @dg.asset_check(asset=thresholds)
    def thresholds_finite() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR)

    @dg.asset_check(asset=thresholds)
    def thresholds_enough_images() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN)

    return dg.Definitions(assets=[anomaly_maps, thresholds], asset_checks=[thresholds_finite,
                                                                           thresholds_enough_images])


def test_failed_error_checks_and_lost_images_make_the_cli_exit_nonzero(tmp_path, capsys):
    from agssp_pipeline.cli import report_outcome

    config = _config(tmp_path, {"line1": "pretrain", "line2": "pretrain"}, ["yolov8n"])
    with dg.instance_for_test() as instance:
        register_sources(instance, config)
        report = materialize_selection(_checked_graph(), config, instance, log_level="CRITICAL")
    assert not report.failed  # every run succeeded ...
    steps = {(s.asset, s.partition): s for s in report.steps}
    assert steps[("anomaly_maps", "line2")].images_failed == 2 and steps[("anomaly_maps", "line1")].ok
    assert steps[("thresholds", None)].checks_failed == ["thresholds:thresholds_finite"]
    assert steps[("thresholds", None)].checks_warned == ["thresholds:thresholds_enough_images"]
    assert report_outcome(report) == 1  # ... but the run needs attention
    captured = capsys.readouterr()
    assert "2 of 3 steps need attention" in captured.err
    assert "anomaly_maps[line2]: 2 image(s) could not be processed" in captured.err
    assert "ERROR check(s) failed: thresholds:thresholds_finite" in captured.err
    assert "warning: thresholds: check(s) not passed: thresholds:thresholds_enough_images" in captured.out
    clean = type(report)(steps=[s for s in report.steps if s.ok])
    assert report_outcome(clean) == 0


KILLED_RUN = """
import os, signal, sys
import dagster as dg
from agssp_pipeline.config import PipelineConfig
from agssp_pipeline.orchestration import materialize_selection

@dg.asset
def killed_mid_run() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

config = PipelineConfig.model_validate({"storage_root": sys.argv[1], "sources": []})
with dg.DagsterInstance.get() as instance:
    materialize_selection(dg.Definitions(assets=[killed_mid_run]), config, instance)
"""


def test_a_killed_headless_run_is_marked_failed_by_the_next_one(tmp_path):
    import os
    import subprocess
    import sys

    from agssp_pipeline.orchestration import fail_orphaned_runs

    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path / "store")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.STARTED and run.job_name == "materialize__killed_mid_run"
        assert fail_orphaned_runs(instance) == [run.run_id]
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert fail_orphaned_runs(instance) == []
