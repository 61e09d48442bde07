"""Kubernetes scale-out: pod resources per asset, the step executor config and torchrun pods.

Plain dictionaries in the shapes dagster-k8s reads (``dagster-k8s/config`` op tags, the
``k8s_job_executor`` config, a PodSpec for ``PipesK8sClient``), so the library stays importable
without Dagster or a cluster; ``jobs/deploy.py`` turns them into Dagster objects and the tests
validate them against dagster-k8s' own schemas.

Why per-step pods: the anomaly maps of each image source are independent, so with the
``k8s_job_executor`` a backfill over N sources runs N GPU pods at once, each asking the scheduler
for exactly the GPUs and memory its step needs; CPU steps never hold a GPU.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
# Dagster concurrency pool the GPU assets declare (limit set per deployment: docker/, docker/k8s/)
GPU_POOL = "gpu"
# the taint GPU node pools usually carry (GKE, EKS and AKS GPU node groups, NVIDIA GPU operator)
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


@dataclass(frozen=True)
class PodResources:
    """What one step's pod asks the Kubernetes scheduler for.

    ``shm`` mounts a memory-backed /dev/shm: PyTorch DataLoader workers pass batches through shared
    memory and the container default (64 MiB) crashes multi-worker loaders.
    """

    cpu: str
    memory: str
    gpus: int = 0
    shm: str | None = None
    ephemeral_storage: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")


# Defaults per asset key; a deployment overrides them through ``k8s_executor_config(overrides=...)``.
ASSET_POD_RESOURCES: dict[str, PodResources] = {
    "image_index": PodResources(cpu="2", memory="4Gi"),
    "anomaly_maps": PodResources(cpu="8", memory="32Gi", gpus=1, shm="8Gi"),
    "kead_evaluation": PodResources(cpu="2", memory="8Gi"),
    "feature_adaptor": PodResources(cpu="4", memory="16Gi", gpus=1, shm="4Gi"),
    "category_thresholds": PodResources(cpu="2", memory="8Gi"),
    "pseudo_boxes": PodResources(cpu="4", memory="8Gi"),
    "pseudo_box_quality": PodResources(cpu="2", memory="4Gi"),
    # one device in the step pod (the asset trains in-process); multi-GPU runs use TORCHRUN_POD_RESOURCES
    "backbone_checkpoint": PodResources(cpu="8", memory="64Gi", gpus=1, shm="16Gi"),
    "detector_checkpoint": PodResources(cpu="16", memory="64Gi", gpus=1, shm="16Gi"),
    "finetune_evaluation": PodResources(cpu="8", memory="32Gi", gpus=1, shm="8Gi"),
}

# a whole 8-GPU node for AGBP under torchrun (PipesK8sClient + agbp_torchrun_pod_spec)
TORCHRUN_POD_RESOURCES = PodResources(cpu="64", memory="480Gi", gpus=8, shm="64Gi")

GPU_ASSETS = tuple(name for name, res in ASSET_POD_RESOURCES.items() if res.gpus > 0)

SHM_VOLUME_NAME = "dshm"


def container_resources(resources: PodResources) -> dict[str, Any]:
    """V1ResourceRequirements: GPUs go in limits (Kubernetes does not overcommit extended resources)."""
    requests: dict[str, str] = {"cpu": resources.cpu, "memory": resources.memory}
    limits: dict[str, str] = {"memory": resources.memory}
    if resources.ephemeral_storage:
        requests["ephemeral-storage"] = resources.ephemeral_storage
    if resources.gpus:
        requests[GPU_RESOURCE] = str(resources.gpus)
        limits[GPU_RESOURCE] = str(resources.gpus)
    return {"requests": requests, "limits": limits}


def k8s_step_config(resources: PodResources, tolerations: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """One step's ``dagster-k8s/config`` (UserDefinedDagsterK8sConfig shape, snake_case keys)."""
    container: dict[str, Any] = {"resources": container_resources(resources)}
    pod_spec: dict[str, Any] = {}
    if resources.shm:
        container["volume_mounts"] = [{"name": SHM_VOLUME_NAME, "mount_path": "/dev/shm"}]
        pod_spec["volumes"] = [
            {"name": SHM_VOLUME_NAME, "empty_dir": {"medium": "Memory", "size_limit": resources.shm}}
        ]
    pod_tolerations = [dict(t) for t in tolerations]
    if resources.gpus and GPU_TOLERATION not in pod_tolerations:
        pod_tolerations.append(dict(GPU_TOLERATION))
    if pod_tolerations:
        pod_spec["tolerations"] = pod_tolerations
    if resources.node_selector:
        pod_spec["node_selector"] = dict(resources.node_selector)
    config: dict[str, Any] = {"container_config": container}
    if pod_spec:
        config["pod_spec_config"] = pod_spec
    return config


def k8s_op_tags(asset_name: str, **overrides: Any) -> dict[str, Any]:
    """``op_tags`` for an asset decorator: ``@dg.asset(op_tags=k8s_op_tags("anomaly_maps"))``.

    ``overrides`` replace fields of the asset's default PodResources (e.g. ``gpus=2``).
    """
    resources = resources_for(asset_name, **overrides)
    return {K8S_CONFIG_TAG: k8s_step_config(resources)}


def resources_for(asset_name: str, **overrides: Any) -> PodResources:
    if asset_name not in ASSET_POD_RESOURCES:
        known = ", ".join(sorted(ASSET_POD_RESOURCES))
        raise KeyError(f"no pod resources defined for asset '{asset_name}' (known: {known})")
    return replace(ASSET_POD_RESOURCES[asset_name], **overrides)


def k8s_executor_config(
    *,
    job_namespace: str | None = None,
    job_image: str | None = None,
    max_concurrent: int | None = None,
    env_config_maps: Sequence[str] = (),
    env_secrets: Sequence[str] = (),
    config_map_volume: str | None = "agssp-config-file",
    overrides: Mapping[str, PodResources | Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Config for ``dagster_k8s.k8s_job_executor``: one pod per step with that asset's resources.

    Per-step pod specs are keyed by op name (= asset name for our single-asset ops), so the asset
    modules need no Kubernetes code; dagster-k8s merges them over any ``dagster-k8s/config`` op tags.
    ``config_map_volume`` mounts the ConfigMap holding ``agssp.yaml`` at /config (AGSSP_CONFIG).
    ``overrides``: asset name -> PodResources, or a dict of the fields to change (``{"gpus": 2}``).
    Cluster-wide GPU limits belong to the Dagster pool ``gpu`` (instance state), not to this per-run config.
    """
    resources = dict(ASSET_POD_RESOURCES)
    for name, value in (overrides or {}).items():
        # a dict (e.g. from JSON in AGSSP_K8S_EXECUTOR_OPTIONS) changes only the fields it names
        resources[name] = value if isinstance(value, PodResources) else resources_for(name, **value)
    config: dict[str, Any] = {
        "env_config_maps": list(env_config_maps),
        "env_secrets": list(env_secrets),
        "per_step_k8s_config": {name: k8s_step_config(res) for name, res in resources.items()},
    }
    if config_map_volume:
        config["volumes"] = [{"name": "agssp-config-file", "config_map": {"name": config_map_volume}}]
        config["volume_mounts"] = [{"name": "agssp-config-file", "mount_path": "/config", "read_only": True}]
        config["env_vars"] = ["AGSSP_CONFIG=/config/agssp.yaml"]
    if job_namespace:
        config["job_namespace"] = job_namespace
    if job_image:
        config["job_image"] = job_image
    if max_concurrent is not None:
        config["max_concurrent"] = max_concurrent
    return config


def torchrun_command(
    module: str,
    args: Sequence[str] = (),
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
) -> list[str]:
    """``torchrun`` argv for data-parallel training in one pod (or several with a rendezvous host)."""
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError("nproc_per_node and nnodes must be >= 1")
    command = ["torchrun", f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("multi-node torchrun needs rdzv_endpoint (host:port of node 0)")
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        command.append("--standalone")
    return [*command, "-m", module, *args]


def torchrun_pod_spec(
    image: str,
    module: str,
    args: Sequence[str] = (),
    *,
    resources: PodResources | None = None,
    env: Mapping[str, str] | None = None,
    config_map: str | None = "agssp-config-file",
    env_secrets: Sequence[str] = (),
) -> dict[str, Any]:
    """PodSpec for ``PipesK8sClient.run(base_pod_spec=...)``: torchrun over all GPUs of the pod.

    One process per GPU (``nproc_per_node = gpus``); /dev/shm is memory-backed for the loaders and
    NCCL; ``config_map`` (holding agssp.yaml) is mounted read-only at /config as for the step pods.
    The image is the user-code image, so the training module is the project's own code.
    """
    resources = resources or TORCHRUN_POD_RESOURCES
    if resources.gpus < 1:
        raise ValueError("torchrun pods need at least one GPU")
    step = k8s_step_config(resources)
    container = copy.deepcopy(step["container_config"])
    container.update(
        {
            "name": "torchrun",
            "image": image,
            "command": torchrun_command(module, args, nproc_per_node=resources.gpus),
            "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
        }
    )
    if env_secrets:
        container["env_from"] = [{"secret_ref": {"name": name}} for name in env_secrets]
    spec: dict[str, Any] = {"restart_policy": "Never", "containers": [container]}
    spec.update(copy.deepcopy(step.get("pod_spec_config", {})))
    if config_map:
        container.setdefault("volume_mounts", []).append(
            {"name": "agssp-config-file", "mount_path": "/config", "read_only": True}
        )
        spec.setdefault("volumes", []).append({"name": "agssp-config-file", "config_map": {"name": config_map}})
        container["env"].append({"name": "AGSSP_CONFIG", "value": "/config/agssp.yaml"})
    return spec


AGBP_MODULE = "agssp_pipeline.training.agbp"


def agbp_torchrun_pod_spec(image: str, backbone: str, *extra_args: str, **options: Any) -> dict[str, Any]:
    """Multi-GPU AGBP pretraining of ``backbone`` in one pod (see ``agssp_pipeline.training.agbp``)."""
    args = ["--config", "/config/agssp.yaml", "--backbone", backbone, *extra_args]
    return torchrun_pod_spec(image, AGBP_MODULE, args, **options)


def shell_join(command: Sequence[str]) -> str:
    """Readable one-line form of a command for docs and run metadata."""
    return shlex.join(command)
