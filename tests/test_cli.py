"""The command line says what happened and nothing else: typo messages, summaries, quiet output, --help.

Runner tests use a stand-in graph (the real asset names, trivial bodies that write real-format result
tables), so a whole `agssp materialize` with its summary takes seconds.
"""

# no `from __future__ import annotations`: Dagster inspects the context annotation at runtime
import os
import subprocess
import sys
import warnings
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from agssp_pipeline import artifact_io, cli
from agssp_pipeline.config import load_config
from agssp_pipeline.orchestration import materialize_selection, plan_selection, register_sources
from agssp_pipeline.run_summary import render_summary
from assets.partitions import image_source_partitions, pretrain_source_partitions

REPO = Path(__file__).resolve().parents[1]


def _write_config(tmp_path: Path, **extra) -> Path:
    sources = [
        {"name": "line1", "format": "image_folder", "root": "line1", "category": "strip", "role": "pretrain"},
        {"name": "customer", "format": "image_folder", "root": "customer", "category": "strip",
         "role": "downstream"},
    ]
    path = tmp_path / "agssp.yaml"
    path.write_text(yaml.safe_dump({"storage_root": "store", "sources": sources, **extra}))
    return path


@pytest.fixture
def clean_env(monkeypatch):
    """The CLI sets DAGSTER_HOME and AGSSP_CONFIG for its process: undo that after each test."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("AGSSP_CONFIG", raising=False)


def _agssp(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "AGSSP_CONFIG")}
    return subprocess.run([sys.executable, "-m", "agssp_pipeline.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**clean, **(env or {})}, **kwargs)


# ----------------------------------------------------------------------------------------------- mistakes


def test_asset_and_source_typos_give_one_line_with_the_closest_names_and_exit_2(tmp_path):
    config = _write_config(tmp_path)
    asset = _agssp("materialize", "--config", str(config), "--select", "anomaly_map")
    assert asset.returncode == 2, asset.stderr
    # one line, nothing else: no traceback, no Dagster preview warning, no telemetry or instance banner
    assert asset.stderr.strip().splitlines() == [
        "agssp: unknown asset 'anomaly_map' in --select 'anomaly_map'; did you mean anomaly_maps?"]
    source = _agssp("materialize", "--config", str(config), "--partition", "line_1")
    assert source.returncode == 2
    (line,) = source.stderr.strip().splitlines()
    assert line.startswith("agssp: unknown source 'line_1'; did you mean line1?") and "configured: line1" in line
    home = tmp_path / "dagster_home"
    assert yaml.safe_load((home / "dagster.yaml").read_text()) == {"telemetry": {"enabled": False}}


def test_selection_errors_in_process(tmp_path, clean_env, capsys):
    config = str(_write_config(tmp_path))
    assert cli.main(["materialize", "--config", config, "--select", "group:kaed"]) == 2
    err = capsys.readouterr().err
    assert "unknown asset group 'kaed'" in err and "did you mean kead?" in err
    assert cli.main(["materialize", "--config", config, "--select", "key:pseudo_box"]) == 2
    assert "did you mean pseudo_boxes" in capsys.readouterr().err
    assert cli.main(["materialize", "--config", config, "--select", "image_index,"]) == 2
    assert "invalid asset selection 'image_index,'" in capsys.readouterr().err
    # valid names still work with operators, attributes and functions
    defs, parsed = _stand_in_defs({}), load_config(config)
    planned = plan_selection(defs, parsed, "key:image_index+ and not key:summary", only_source="line1")
    assert sorted((s.asset, s.partition) for s in planned) == [
        ("finetune_evaluation", None), ("image_index", "line1"), ("kead_evaluation", "line1"),
        ("pseudo_box_quality", "line1")]


def test_existing_instance_yaml_is_left_alone(tmp_path, clean_env):
    from agssp_pipeline.orchestration import instance_home

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("run_coordinator: {}\n")
    assert instance_home(tmp_path / "agssp.yaml") == home
    assert (home / "dagster.yaml").read_text() == "run_coordinator: {}\n"


def test_broken_pipe_exits_quietly(tmp_path):
    """`agssp ... | head` where head has gone: no BrokenPipeError traceback."""
    config = _write_config(tmp_path)
    for args in (["validate", "--config", str(config)], ["--help"]):
        clean = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "AGSSP_CONFIG")}
        proc = subprocess.Popen([sys.executable, "-m", "agssp_pipeline.cli", *args], cwd=REPO, env=clean,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # the reader leaves before the CLI has imported anything
        err = proc.stderr.read()
        assert proc.wait(timeout=300) in (0, 141), err
        assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_every_command_has_a_description_and_an_example():
    parser = cli.build_parser()
    top = parser.format_help()
    assert "``" not in top and ":class:" not in top and "agssp init" in top and "agssp materialize" in top
    (commands,) = [a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0]))]
    assert {"demo", "materialize", "validate", "lineage"} <= set(commands.choices)
    for name, sub in commands.choices.items():
        text = sub.format_help()
        assert sub.description, f"agssp {name} --help has no description"
        assert "example" in text.lower() and f"agssp {name}" in text, f"agssp {name} --help has no example"


# ----------------------------------------------------------------------------------------------- validate


def test_validate_names_each_static_problem_with_its_field(tmp_path, clean_env, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "store").write_text("not a folder")
    config = _write_config(tmp_path, kead={"encoder": "clipp", "device": "cuda"},
                           backbone={"backbones": ["resnet5O"]}, detector={"image_size": 100},
                           finetune={"image_size": 150})
    assert cli.main(["validate", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "error: field 'kead.encoder': unknown encoder 'clipp'" in err and "did you mean clip" in err
    assert "error: field 'backbone.backbones.0': unknown backbone 'resnet5O'" in err and "resnet50" in err
    assert "error: field 'detector.image_size': 100 is not a multiple of 32" in err and "use 96" in err
    assert "error: field 'finetune.image_size': 150 is not a multiple of 32" in err
    assert "error: field 'storage_root':" in err and "is a file" in err
    assert "warning: field 'kead.device': 'cuda' but CUDA is not available" in err

    good = _write_config(tmp_path, kead={"device": "cuda"})
    (tmp_path / "store").unlink()
    assert cli.main(["validate", "--config", str(good)]) == 0  # the CUDA warning alone does not fail
    captured = capsys.readouterr()
    assert "valid, 2 sources (1 pretraining, 1 downstream), 1 warning(s)" in captured.out
    assert "warning: field 'kead.device'" in captured.err


# ------------------------------------------------------------------------------------------ run summary


def _stand_in_defs(seen: dict):
    """The pipeline's result-writing assets, with trivial bodies writing tables in their real formats."""

    @dg.asset(partitions_def=image_source_partitions)
    def image_index(context: dg.AssetExecutionContext) -> None:
        layout = load_config(os.environ["AGSSP_TEST_CONFIG"]).layout()
        artifact_io.write_parquet(layout.index(context.partition_key), pd.DataFrame({"image_id": ["a", "b"]}))

    @dg.asset(partitions_def=pretrain_source_partitions, deps=[image_index])
    def kead_evaluation(context: dg.AssetExecutionContext) -> None:
        layout = load_config(os.environ["AGSSP_TEST_CONFIG"]).layout()
        artifact_io.write_parquet(layout.evaluations("kead", context.partition_key), pd.DataFrame({
            "level": ["overall", "overall", "class"], "name": ["all", "all", "scratch"],
            "encoder": ["clip", "cnn_fewshot", "cnn_fewshot"], "n_images": [10, 12, 5],
            "image_auroc": [0.5, 0.875, 0.9], "pixel_auroc": [0.5, 0.9375, 0.95],
            "evaluated_at": ["2026-01-01T00:00:00", "2026-02-01T00:00:00", "2026-02-01T00:00:00"]}))

    @dg.asset(partitions_def=pretrain_source_partitions, deps=[kead_evaluation])
    def pseudo_box_quality(context: dg.AssetExecutionContext) -> None:
        layout = load_config(os.environ["AGSSP_TEST_CONFIG"]).layout()
        artifact_io.write_parquet(layout.evaluations("box_quality", context.partition_key), pd.DataFrame({
            "view": ["boxes", "boxes", "boxes", "mask", "mask"],
            "method": ["pseudo", "pseudo", "random", "adaptive", "adaptive"],
            "iou_threshold": [0.3, 0.5, 0.5, None, None], "recall": [0.8, 0.625, 0.125, None, None],
            "precision": [0.7, 0.5, 0.0625, None, None], "mask_iou": [None, None, None, 0.25, 0.375],
            "configured": [None, None, None, False, True]}))

    @dg.asset(deps=[dg.AssetDep(image_index, partition_mapping=dg.AllPartitionMapping())])
    def finetune_evaluation() -> None:
        config = load_config(os.environ["AGSSP_TEST_CONFIG"])
        for source in config.downstream_sources():
            artifact_io.write_text(config.layout().evaluations("finetune", source.name, ".md"),
                                   "| dataset | variant | mAP@0.5 |\n|---|---|---:|\n| customer | agssp | 61.5 |\n")
            artifact_io.write_bytes(config.layout().evaluations("finetune", source.name, ".png"), b"png stand-in")
        if seen.get("fail_finetune"):
            raise RuntimeError("finetune could not start")

    @dg.asset(deps=[dg.AssetDep(pseudo_box_quality, partition_mapping=dg.AllPartitionMapping())])
    def summary() -> None:
        return None

    return dg.Definitions(assets=[image_index, kead_evaluation, pseudo_box_quality, finetune_evaluation, summary])


def _patched_build(monkeypatch, config_path: Path, seen: dict) -> None:
    """``agssp materialize`` on the stand-in graph (the real instance preparation, dagster.yaml included)."""
    from agssp_pipeline.orchestration import prepare_instance

    def build(path: str):
        config = load_config(path)
        return config, prepare_instance(config, path), _stand_in_defs(seen)

    monkeypatch.setenv("AGSSP_TEST_CONFIG", str(config_path))
    monkeypatch.setattr(cli, "_build", build)


def test_materialize_ends_with_steps_results_and_paths(tmp_path, clean_env, monkeypatch, capsys):
    config = _write_config(tmp_path)
    _patched_build(monkeypatch, config, {})
    assert cli.main(["materialize", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    out, store = captured.out, tmp_path / "store"
    assert "=== AGSSP run summary ===" in out
    assert "image_index          2/2 ok" in out and "summary              1/1 ok" in out
    # KeAD: the latest evaluated version's overall row, with its path
    assert "line1   cnn_fewshot  12      0.875        0.938" in out
    assert f"table: {store}/evaluations/kead/line1.parquet" in out
    # box quality at IoU 0.5 and the configured delta's mask IoU, next to the random baseline
    assert "line1   0.625   0.500      0.125          0.375" in out
    assert f"table: {store}/evaluations/box_quality/line1.parquet" in out
    assert f"finetune comparison, customer ({store}/evaluations/finetune/customer.md)" in out
    assert "| customer | agssp | 61.5 |" in out
    assert f"chart (mean ± std, Δ vs scratch with 95% CI): {store}/evaluations/finetune/customer.png" in out
    assert f"evaluations   {store}/evaluations" in out and "all 6 steps succeeded" in out
    # the progress bar knows the planned total
    assert "0/6" in captured.err and "6/6" in captured.err and "0step [" not in captured.err
    assert "next image_index[line1]" in captured.err  # the bar names the step it waits for
    assert yaml.safe_load((tmp_path / "dagster_home" / "dagster.yaml").read_text())["telemetry"] == {
        "enabled": False}


def test_a_failed_step_shows_in_the_summary_and_exits_1(tmp_path, clean_env, monkeypatch, capsys):
    config = _write_config(tmp_path)
    _patched_build(monkeypatch, config, {"fail_finetune": True})
    assert cli.main(["materialize", "--config", str(config), "--select", "key:image_index+"]) == 1
    captured = capsys.readouterr()
    assert "finetune_evaluation  0/1 ok" in captured.out and "FAILED" in captured.out
    assert "finetune_evaluation: FAILED: " in captured.err
    assert "finetune could not start" in captured.err


def test_plan_matches_what_runs_and_the_summary_shows_only_what_the_run_produced(tmp_path, clean_env):
    config = load_config(_write_config(tmp_path))
    os.environ["AGSSP_TEST_CONFIG"] = str(config.config_path)
    try:
        defs = _stand_in_defs({})
        with dg.instance_for_test() as instance:
            register_sources(instance, config)
            planned = plan_selection(defs, config, "key:image_index+")
            report = materialize_selection(defs, config, instance, selection="key:image_index+",
                                           log_level="CRITICAL")
            assert [(p.asset, p.partition) for p in planned] == [(s.asset, s.partition) for s in report.steps]
            only_index = materialize_selection(defs, config, instance, selection="image_index",
                                               log_level="CRITICAL")
    finally:
        del os.environ["AGSSP_TEST_CONFIG"]
    text = render_summary(config, only_index)
    assert "sources:" in text and "KeAD" not in text and "finetune comparison" not in text
    everything = render_summary(config)  # no report (what is on disk): every table
    assert "KeAD anomaly maps" in everything and "finetune comparison, customer" in everything


# ------------------------------------------------------------------------------------------ quiet, lineage


def test_only_known_dagster_preview_warnings_are_hidden():
    from agssp_pipeline.env import KNOWN_DAGSTER_FEATURES, quiet_known_warnings

    message = KNOWN_DAGSTER_FEATURES[0] + ", and may have breaking changes"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn_explicit(message, Warning, "x.py", 1, module="dagster._core.definitions.x")
        warnings.warn_explicit(message, Warning, "x.py", 1, module="agssp_pipeline.kead")  # not Dagster's
        warnings.warn_explicit("Function `new_thing` is currently in preview", Warning, "x.py", 1,
                               module="dagster._core.y")  # a feature the project did not choose
    assert [str(w.message) for w in caught] == [message, "Function `new_thing` is currently in preview"]
    assert os.environ.get("DAGSTER_DISABLE_TELEMETRY")


def test_lineage_finds_the_config_beside_the_artifacts_storage_root(tmp_path):
    config = _write_config(tmp_path)
    (tmp_path / "data.yaml").write_text("names: [a]\n")  # not a pipeline config: ignored
    table = tmp_path / "store" / "index" / "line1.parquet"
    table.parent.mkdir(parents=True)
    artifact_io.write_parquet(str(table), pd.DataFrame({"image_id": ["a"]}))
    assert cli._owning_config(str(table)) == str(config)
    assert cli._owning_config(str(tmp_path / "elsewhere.parquet")) is None
