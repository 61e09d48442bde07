"""The Dagster instance on a real PostgreSQL server (dagster-postgres: runs, event log, schedules, pools).

Uses the storage section of docker/dagster.yaml unchanged, with the server's address in the same
environment variables the Docker deployment sets, so the deployed instance config is what is tested.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from helpers_servers import postgres_server, private_demo_config

pytest.importorskip("dagster_postgres")

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE = "demo_plant_line1"


@pytest.fixture(scope="module")
def postgres_home(tmp_path_factory):
    """One server for the module; each test sees it through the deployment's environment variables."""
    tmp_path = tmp_path_factory.mktemp("postgres")
    with postgres_server(tmp_path / "pg") as server, pytest.MonkeyPatch.context() as monkeypatch:
        env = {
            "DAGSTER_POSTGRES_HOST": server.host, "DAGSTER_POSTGRES_PORT": str(server.port),
            "DAGSTER_POSTGRES_USER": server.user, "DAGSTER_POSTGRES_PASSWORD": server.password,
            "DAGSTER_POSTGRES_DB": server.database,
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        deployed = yaml.safe_load((REPO_ROOT / "docker" / "dagster.yaml").read_text())
        home = tmp_path / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text(yaml.safe_dump({"storage": deployed["storage"], "telemetry": {"enabled": False}}))
        yield home, env


def test_materialisation_is_recorded_in_postgres_and_read_back_by_a_new_instance(postgres_home, demo_corpus, tmp_path):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    from assets.ingestion import image_index
    from assets.partitions import image_source_partitions
    from assets.resources import PipelineConfigResource

    home, _ = postgres_home
    config_path = private_demo_config(demo_corpus, tmp_path / "demo_config")
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        instance.add_dynamic_partitions(image_source_partitions.name, [SOURCE])
        result = dg.materialize(
            [image_index], instance=instance, partition_key=SOURCE,
            resources={"pipeline_config": PipelineConfigResource(config_path=str(config_path))},
        )
        assert result.success
        run_id = result.run_id
    finally:
        instance.dispose()

    # a second instance = another process (webserver, daemon) reading the shared database
    reader = dg.DagsterInstance.from_config(str(home))
    try:
        assert reader.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
        assert SOURCE in reader.get_dynamic_partitions(image_source_partitions.name)
        records = reader.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("image_index"), asset_partitions=[SOURCE]), limit=5
        ).records
        assert len(records) == 1
        materialization = records[0].asset_materialization
        assert materialization.partition == SOURCE
        import pandas as pd

        from agssp_pipeline.config import load_config

        index = pd.read_parquet(load_config(config_path).layout().index(SOURCE))
        assert materialization.metadata["dagster/row_count"].value == len(index) > 0
        assert materialization.tags.get("dagster/data_version"), "data version must be stored for staleness"
    finally:
        reader.dispose()


def test_gpu_pool_limit_is_set_the_way_the_daemon_entrypoint_sets_it(postgres_home):
    """docker/daemon-entrypoint.sh runs `dagster instance concurrency set gpu N` against this storage."""
    home, env = postgres_home
    cli_env = {**os.environ, **env, "DAGSTER_HOME": str(home)}
    dagster_cli = str(Path(sys.executable).parent / "dagster")
    run = subprocess.run([dagster_cli, "instance", "concurrency", "set", "gpu", "2"],
                         capture_output=True, text=True, env=cli_env, timeout=120)
    assert run.returncode == 0, run.stderr
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 2
    finally:
        instance.dispose()
