"""Kubernetes scale-out config: validated with dagster-k8s' own schemas and manifest builders (no cluster)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("dagster_k8s")

import kubernetes  # noqa: E402
from dagster._config import process_config  # noqa: E402
from dagster_k8s import k8s_job_executor  # noqa: E402
from dagster_k8s.container_context import K8sContainerContext  # noqa: E402
from dagster_k8s.job import (  # noqa: E402
    USER_DEFINED_K8S_JOB_CONFIG_SCHEMA,
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)
from dagster_k8s.pipes import build_pod_body  # noqa: E402

from agssp_pipeline import deploy  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
VALUES_FILE = REPO_ROOT / "docker" / "k8s" / "values.yaml"
PIPELINE_ASSETS = {
    "image_index", "anomaly_maps", "kead_evaluation", "category_thresholds", "pseudo_boxes",
    "pseudo_box_quality", "backbone_checkpoint", "detector_checkpoint", "finetune_evaluation", "feature_adaptor",
}


def _manifest(obj) -> dict:
    return kubernetes.client.ApiClient().sanitize_for_serialization(obj)


def _validated_executor_config(config: dict) -> dict:
    result = process_config(k8s_job_executor.config_schema.config_type, config)
    assert result.success, [e.message for e in result.errors]
    return result.value


def _step_job_manifest(executor_config: dict, op_name: str, op_tags: dict | None = None) -> dict:
    """The Job the k8s executor would create for one step, merged the way K8sStepHandler merges it."""
    cfg = _validated_executor_config(executor_config)
    context = K8sContainerContext(
        env_config_maps=cfg.get("env_config_maps"),
        env_secrets=cfg.get("env_secrets"),
        env_vars=cfg.get("env_vars"),
        volume_mounts=cfg.get("volume_mounts"),
        volumes=cfg.get("volumes"),
        namespace=cfg.get("job_namespace"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(cfg.get("step_k8s_config", {})),
    )
    tags = {k: json.dumps(v) for k, v in (op_tags or {}).items()}
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    per_op = UserDefinedDagsterK8sConfig.from_dict(cfg["per_step_k8s_config"].get(op_name, {}))
    context = context.merge(K8sContainerContext(run_k8s_config=per_op))
    launcher = SimpleNamespace(
        job_image=None, dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance",
        postgres_password_secret=None,
    )
    job_config = context.get_k8s_job_config("registry.example.com/agssp-user-code:0.1.0", launcher)
    job = construct_dagster_k8s_job(
        job_config, ["dagster", "api", "execute_step"], f"dagster-step-{op_name.replace('_', '-')}",
        user_defined_k8s_config=context.run_k8s_config,
        env_vars=[{"name": "DAGSTER_RUN_STEP_KEY", "value": op_name}],
    )
    return _manifest(job)


def test_every_pipeline_asset_has_pod_resources():
    assert set(deploy.ASSET_POD_RESOURCES) == PIPELINE_ASSETS
    assert set(deploy.GPU_ASSETS) >= {"anomaly_maps", "backbone_checkpoint", "detector_checkpoint"}
    assert "image_index" not in deploy.GPU_ASSETS


def test_executor_config_passes_dagster_k8s_schema_and_bad_config_fails():
    config = deploy.k8s_executor_config(job_namespace="agssp", max_concurrent=8, env_secrets=["agssp-s3"])
    value = _validated_executor_config(config)
    assert value["per_step_k8s_config"]["anomaly_maps"]["container_config"]["resources"]["limits"] == {
        "memory": "32Gi", deploy.GPU_RESOURCE: "1",
    }
    broken = dict(config, max_concurrent="many")
    assert not process_config(k8s_job_executor.config_schema.config_type, broken).success
    broken_step = {**config, "per_step_k8s_config": {"anomaly_maps": {"containr_config": {}}}}
    assert not process_config(k8s_job_executor.config_schema.config_type, broken_step).success


@pytest.mark.parametrize("asset_name", sorted(PIPELINE_ASSETS))
def test_step_pod_gets_the_assets_gpus_memory_config_and_secrets(asset_name):
    expected = deploy.ASSET_POD_RESOURCES[asset_name]
    manifest = _step_job_manifest(deploy.k8s_executor_config(env_secrets=["agssp-s3"]), asset_name)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["requests"]["memory"] == expected.memory
    assert resources["requests"]["cpu"] == expected.cpu
    if expected.gpus:
        assert resources["limits"][deploy.GPU_RESOURCE] == str(expected.gpus)
        assert deploy.GPU_TOLERATION in [
            {k: t[k] for k in ("key", "operator", "effect")} for t in pod["tolerations"]
        ]
        shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm, "GPU steps need a memory-backed /dev/shm for DataLoader workers"
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])
    else:
        assert deploy.GPU_RESOURCE not in resources.get("limits", {})
        assert not pod.get("tolerations")
    # the pipeline config arrives as a read-only ConfigMap mount and AGSSP_CONFIG points at it
    assert {"name": "AGSSP_CONFIG", "value": "/config/agssp.yaml"} in container["env"]
    assert any(m["mountPath"] == "/config" and m.get("readOnly") for m in container["volumeMounts"])
    assert {"secretRef": {"name": "agssp-s3"}} in container["envFrom"]


def test_op_tags_parse_with_dagster_k8s_and_overrides_apply():
    tags = deploy.k8s_op_tags("detector_checkpoint", gpus=2, memory="96Gi")
    parsed = get_user_defined_k8s_config({k: json.dumps(v) for k, v in tags.items()})
    assert parsed.container_config["resources"]["limits"] == {"memory": "96Gi", deploy.GPU_RESOURCE: "2"}
    # per-op executor config wins over op tags (dagster-k8s merge order), so a deployment can resize
    manifest = _step_job_manifest(
        deploy.k8s_executor_config(overrides={"detector_checkpoint": deploy.PodResources("4", "16Gi", gpus=4)}),
        "detector_checkpoint", op_tags=tags,
    )
    limits = manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits[deploy.GPU_RESOURCE] == "4"
    with pytest.raises(KeyError, match="known:"):
        deploy.k8s_op_tags("not_an_asset")
    with pytest.raises(ValueError):
        deploy.PodResources("1", "1Gi", gpus=-1)


def test_torchrun_pod_runs_one_process_per_gpu():
    assert importlib.util.find_spec(deploy.AGBP_MODULE) is not None, "torchrun entry point must exist"
    spec = deploy.agbp_torchrun_pod_spec(
        "registry.example.com/agssp-user-code:0.1.0", "swin_b", "--epochs", "100", env_secrets=["agssp-s3"],
    )
    pod = _manifest(build_pod_body("agssp-backbone", None, None, {}, None, spec))
    (container,) = pod["spec"]["containers"]
    assert container["command"][:4] == ["torchrun", "--nproc-per-node=8", "--nnodes=1", "--standalone"]
    assert container["command"][4:] == [
        "-m", deploy.AGBP_MODULE, "--config", "/config/agssp.yaml", "--backbone", "swin_b", "--epochs", "100",
    ]
    assert container["resources"]["limits"][deploy.GPU_RESOURCE] == "8"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/config"}
    assert {"secretRef": {"name": "agssp-s3"}} in container["envFrom"]
    assert {"name": "AGSSP_CONFIG", "value": "/config/agssp.yaml"} in container["env"]
    assert pod["spec"]["restartPolicy"] == "Never"
    multi = deploy.torchrun_command("m", nproc_per_node=4, nnodes=2, rdzv_endpoint="trainer-0:29400")
    assert "--rdzv-endpoint=trainer-0:29400" in multi and "--standalone" not in multi
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        deploy.torchrun_command("m", nproc_per_node=4, nnodes=2)
    with pytest.raises(ValueError, match="GPU"):
        deploy.torchrun_pod_spec("img", "m", resources=deploy.PodResources("1", "1Gi"))


def test_helm_values_are_consistent_with_the_executor_config():
    values = yaml.safe_load(VALUES_FILE.read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert env["AGSSP_EXECUTOR"] == "k8s"
    options = json.loads(env["AGSSP_K8S_EXECUTOR_OPTIONS"])
    _validated_executor_config(deploy.k8s_executor_config(**options))
    # the ConfigMap the values mount is the one the step pods mount
    mounted = {v["configMap"]["name"] for v in deployment["volumes"] if "configMap" in v}
    step_volumes = deploy.k8s_executor_config()["volumes"]
    assert {v["config_map"]["name"] for v in step_volumes} <= mounted
    assert env["AGSSP_CONFIG"] == "/config/agssp.yaml"
    # the run pod's k8s config is valid dagster-k8s config (Helm passes it through as run_k8s_config)
    run_k8s = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    snake = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config"}
    run_config = {snake[k]: v for k, v in run_k8s.items()}
    assert process_config(USER_DEFINED_K8S_JOB_CONFIG_SCHEMA, run_config).success
    assert deploy.GPU_RESOURCE not in str(run_config), "the run pod orchestrates; only step pods hold GPUs"
    assert values["concurrency"]["enabled"] and values["concurrency"]["pools"]["granularity"] == "op"


def test_executor_from_env(monkeypatch):
    from jobs.deploy import EXECUTOR_ENV_VAR, executor_from_env

    monkeypatch.delenv(EXECUTOR_ENV_VAR, raising=False)
    assert executor_from_env() is None
    monkeypatch.setenv(EXECUTOR_ENV_VAR, "k8s")
    monkeypatch.setenv(
        "AGSSP_K8S_EXECUTOR_OPTIONS", '{"max_concurrent": 3, "overrides": {"anomaly_maps": {"gpus": 2}}}'
    )
    monkeypatch.setenv("AGSSP_K8S_NAMESPACE", "plants")
    executor = executor_from_env()
    assert executor.name == "agssp_k8s"
    resolved = executor.config_schema.resolve_config({})
    assert resolved.success, resolved.errors
    assert resolved.value["config"]["max_concurrent"] == 3
    assert resolved.value["config"]["job_namespace"] == "plants"
    maps = resolved.value["config"]["per_step_k8s_config"]["anomaly_maps"]["container_config"]["resources"]
    assert maps["limits"][deploy.GPU_RESOURCE] == "2" and maps["requests"]["memory"] == "32Gi"
    monkeypatch.setenv(EXECUTOR_ENV_VAR, "celery")
    with pytest.raises(ValueError, match="AGSSP_EXECUTOR"):
        executor_from_env()


def test_the_projects_gpu_assets_declare_the_gpu_pool():
    """Docker and Kubernetes limit GPU work through this pool; an asset outside it would oversubscribe."""
    from agssp_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    checked = []
    for key in graph.get_all_asset_keys():
        name = key.to_user_string()
        node = graph.get(key)
        if name in deploy.GPU_ASSETS and node.is_materializable:
            assert node.pools == {deploy.GPU_POOL}, f"{name} runs on a GPU but is in pools {node.pools}"
            checked.append(name)
    assert checked, "no GPU asset found in the definitions"


def test_project_definitions_switch_to_step_pods_with_agssp_executor(monkeypatch):
    from agssp_pipeline.definitions import build_definitions

    monkeypatch.setenv("AGSSP_EXECUTOR", "k8s")
    assert build_definitions().resolve_job_def("ingest_job").executor_def.name == "agssp_k8s"
    monkeypatch.delenv("AGSSP_EXECUTOR")
    assert build_definitions().resolve_job_def("ingest_job").executor_def.name != "agssp_k8s"
