"""The Docker deployment (docker/): instance config through Dagster's loader, compose file through a
real compose implementation (offline `config`, no engine), and the cross-file names that must agree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO_ROOT / "docker"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"
POSTGRES_ENV = {
    "DAGSTER_POSTGRES_HOST": "postgres",
    "DAGSTER_POSTGRES_PORT": "5433",
    "DAGSTER_POSTGRES_USER": "agssp",
    "DAGSTER_POSTGRES_PASSWORD": "secret",
    "DAGSTER_POSTGRES_DB": "dagster",
}


def _instance_yaml() -> dict:
    return yaml.safe_load((DOCKER_DIR / "dagster.yaml").read_text())


def _env_refs(node) -> set[str]:
    """Names of every `{env: NAME}` in a config tree."""
    if isinstance(node, dict):
        found = {node["env"]} if set(node) == {"env"} else set()
        return found.union(*(_env_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_env_refs(v) for v in node))
    return set()


def test_instance_yaml_passes_dagsters_instance_schema(tmp_path):
    from dagster._core.instance.config import dagster_instance_config

    shutil.copy(DOCKER_DIR / "dagster.yaml", tmp_path / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    assert "postgres" in config["storage"]
    # a typo must not pass silently: the same loader rejects an unknown key
    broken = _instance_yaml()
    broken["run_monitoring"]["start_timout_seconds"] = 10
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(broken))
    from dagster._core.errors import DagsterInvalidConfigError

    with pytest.raises(DagsterInvalidConfigError):
        dagster_instance_config(str(tmp_path))


def test_postgres_storage_resolves_from_environment(monkeypatch):
    from dagster._config import process_config
    from dagster_postgres import DagsterPostgresStorage

    for key, value in POSTGRES_ENV.items():
        monkeypatch.setenv(key, value)
    storage = _instance_yaml()["storage"]["postgres"]
    assert _env_refs(storage) == set(POSTGRES_ENV), "credentials must come from the environment"
    result = process_config(DagsterPostgresStorage.config_type(), storage)
    assert result.success, result.errors
    db = result.value["postgres_db"]
    assert (db["hostname"], db["port"], db["password"]) == ("postgres", 5433, "secret")


def test_instance_built_from_the_yaml_has_queue_pools_monitoring_and_gpu_runs(tmp_path, monkeypatch):
    """Everything but the database: swap storage for sqlite and build the real DagsterInstance."""
    import dagster as dg
    from dagster._core.instance.config import PoolGranularity
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_docker import DockerRunLauncher
    from docker.types import HostConfig

    for key, value in POSTGRES_ENV.items():
        monkeypatch.setenv(key, value)
    config = _instance_yaml()
    config["storage"] = {"sqlite": {"base_dir": str(tmp_path / "storage")}}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        launcher = instance.run_launcher
        assert isinstance(launcher, DockerRunLauncher)
        assert launcher.networks == ["agssp_network"]
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_start_timeout_seconds >= 300
        assert instance.run_retries_max_retries == 1
        assert instance.auto_materialize_use_sensors
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 4
        # GPU runs wait in the queue while the gpu pool is full (no idle container holding a place)
        assert concurrency.pool_config.pool_granularity == PoolGranularity.RUN
        assert concurrency.run_queue_config.max_concurrent_runs == 4
        # docker-py (what the launcher calls) accepts the container kwargs: GPUs, volumes, shm
        kwargs = launcher.container_kwargs
        host_config = HostConfig(
            version="1.43", binds=kwargs["volumes"], device_requests=kwargs["device_requests"],
            shm_size=kwargs["shm_size"],
        )
        (request,) = host_config["DeviceRequests"]
        assert request["Driver"] == "nvidia" and request["Count"] == -1 and request["Capabilities"] == [["gpu"]]
        assert "agssp_plants:/data/plants:ro" in host_config["Binds"], "plant folders are mounted read-only"
        assert "agssp_storage:/data/storage" in host_config["Binds"]
    finally:
        instance.dispose()


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def _compose_config(env_file: Path) -> subprocess.CompletedProcess:
    command = _compose_command()
    if command is None:
        pytest.skip("no compose implementation (install Debian's docker-compose: scripts/system_deps.sh)")
    # a clean environment: only the env file may supply the deployment's variables
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "AGSSP_", "AWS_"))}
    return subprocess.run(
        [*command, "--env-file", str(env_file), "-f", str(DOCKER_DIR / "docker-compose.yml"), "config"],
        capture_output=True, text=True, env=env, cwd=DOCKER_DIR, timeout=120,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    result = _compose_config(ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _mounts(service: dict) -> dict[str, dict]:
    """target -> {source, read_only} from compose's short or long volume syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            mounts[parts[1]] = {"source": parts[0], "read_only": len(parts) > 2 and "ro" in parts[2]}
        else:
            mounts[volume["target"]] = {"source": volume["source"], "read_only": volume.get("read_only", False)}
    return mounts


def test_compose_services_ports_and_gpus(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "user_code", "webserver", "daemon", "docker_api"}
    (port,) = services["webserver"]["ports"]
    published = port if isinstance(port, str) else f"{port.get('host_ip')}:{port['published']}:{port['target']}"
    assert published.startswith("127.0.0.1:"), "the UI must not be published on all interfaces by default"
    devices = services["user_code"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["user_code"]["healthcheck"]["test"][1:4] == ["dagster", "api", "grpc-health-check"]
    assert services["webserver"]["depends_on"]["user_code"]["condition"] == "service_healthy"


def test_compose_volumes_networks_and_env_agree_with_dagster_yaml(compose):
    services = compose["services"]
    launcher = _instance_yaml()["run_launcher"]["config"]
    # run containers mount the same named volumes the code server sees, plants read-only everywhere
    volume_names = {key: spec.get("name", key) for key, spec in compose["volumes"].items()}
    user_code_mounts = _mounts(services["user_code"])
    for bind in launcher["container_kwargs"]["volumes"]:
        source, target, *mode = bind.split(":")
        assert source in volume_names.values(), f"{source} is not a named volume of the compose file"
        assert user_code_mounts[target]["source"] in (source, *[k for k, v in volume_names.items() if v == source])
        assert user_code_mounts[target]["read_only"] == (mode == ["ro"])
    assert user_code_mounts["/data/plants"]["read_only"]
    assert launcher["network"] in {spec.get("name") for spec in compose["networks"].values()}
    # the daemon launches runs: every variable the launcher forwards must be set in its environment
    daemon_env = services["daemon"]["environment"]
    forwarded = [name for name in launcher["env_vars"] if "=" not in name]
    assert not [name for name in forwarded if name not in daemon_env]
    for service in ("user_code", "webserver", "daemon"):
        assert set(POSTGRES_ENV) <= set(services[service]["environment"]), service
    # runs start from the code server's own image
    assert services["user_code"]["environment"]["DAGSTER_CURRENT_IMAGE"] == services["user_code"]["image"]
    assert services["daemon"]["environment"]["AGSSP_GPU_POOL_LIMIT"] == "1"


def test_only_the_api_proxy_sees_the_docker_socket(compose):
    services = compose["services"]
    with_socket = {name for name, service in services.items()
                   if any("docker.sock" in m["source"] for m in _mounts(service).values())}
    assert with_socket == {"docker_api"}
    assert _mounts(services["docker_api"])["/var/run/docker.sock"]["read_only"]
    proxy_env = services["docker_api"]["environment"]
    assert proxy_env["CONTAINERS"] == "1" and proxy_env["EXEC"] == "0" and proxy_env["VOLUMES"] == "0"
    # the launcher (daemon) and the terminate button (webserver) reach the engine only through the proxy,
    # on an internal network that the proxy shares with nobody else
    api_network = "agssp_docker_api"
    assert compose["networks"][api_network]["internal"] is True
    for name in ("webserver", "daemon"):
        assert services[name]["environment"]["DOCKER_HOST"] == "tcp://docker_api:2375"
        assert api_network in services[name]["networks"]
    assert {n for n, s in services.items() if api_network in s.get("networks", {})} == {
        "docker_api", "webserver", "daemon"}


def test_containers_run_as_a_non_root_user_and_secrets_are_ignored():
    for dockerfile in ("Dockerfile.user_code", "Dockerfile.dagster"):
        users = re.findall(r"^USER (\S+)\s*$", (DOCKER_DIR / dockerfile).read_text(), re.M)
        assert users and users[-1] not in {"root", "0"}, f"{dockerfile} must end as a non-root user"
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO_ROOT)
    assert ignored.returncode == 0, "docker/.env (the database password) must be ignored by git"
    assert subprocess.run(["git", "check-ignore", "-q", "docker/.env.example"], cwd=REPO_ROOT).returncode == 1


def test_compose_refuses_to_start_without_a_database_password(tmp_path):
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith("DAGSTER_POSTGRES_PASSWORD")]
    env_file = tmp_path / "no_password.env"
    env_file.write_text("\n".join(lines) + "\n")
    result = _compose_config(env_file)
    assert result.returncode != 0
    assert "DAGSTER_POSTGRES_PASSWORD" in result.stderr


def test_dockerfiles_copy_what_exists_and_serve_the_project_definitions():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    user_code = (DOCKER_DIR / "Dockerfile.user_code").read_text()
    cmd = re.search(r'^CMD \[(.*?)\]\s*$', user_code.replace("\\\n", " "), re.M | re.S).group(1)
    cmd_args = [a.strip().strip('"') for a in cmd.split(",")]
    assert cmd_args[:3] == ["dagster", "code-server", "start"]
    assert cmd_args[cmd_args.index("-m") + 1] == pyproject["tool"]["dagster"]["module_name"]
    port = cmd_args[cmd_args.index("-p") + 1]
    workspace = yaml.safe_load((DOCKER_DIR / "workspace.yaml").read_text())
    (server,) = [entry["grpc_server"] for entry in workspace["load_from"]]
    assert (server["host"], str(server["port"])) == ("user_code", port)
    assert f"grpc-health-check -p {port}" in user_code
    for dockerfile in ("Dockerfile.user_code", "Dockerfile.dagster"):
        text = (DOCKER_DIR / dockerfile).read_text()
        ignore = (DOCKER_DIR / f"{dockerfile}.dockerignore").read_text()
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            *sources, _dest = line.split()
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"{dockerfile}: COPY {source} does not exist"
                assert f"!{source}" in ignore, f"{dockerfile}: {source} is excluded from the build context"
    entrypoint = DOCKER_DIR / "daemon-entrypoint.sh"
    assert os.access(entrypoint, os.X_OK)
    assert subprocess.run(["sh", "-n", str(entrypoint)]).returncode == 0


def test_system_deps_script_parses_and_can_be_switched_off():
    script = REPO_ROOT / "scripts" / "system_deps.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "AGSSP_SKIP_SYSTEM_DEPS": "1"})
    assert result.returncode == 0 and "not installing anything" in result.stdout
