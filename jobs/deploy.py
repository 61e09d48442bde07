"""Executors per deployment: the default multiprocess one on a workstation, one pod per step on Kubernetes.

``AGSSP_EXECUTOR=k8s`` (set in the Helm values of the user-code deployment, docker/k8s/values.yaml)
selects the ``k8s_job_executor`` with the per-asset pod resources of ``agssp_pipeline.deploy``.
Not a JOB_MODULES member: it defines no jobs, only the executor the Definitions use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import dagster as dg

from agssp_pipeline.deploy import k8s_executor_config

EXECUTOR_ENV_VAR = "AGSSP_EXECUTOR"
K8S_NAMESPACE_ENV_VAR = "AGSSP_K8S_NAMESPACE"
# JSON object of extra k8s_executor_config keyword arguments, e.g. '{"max_concurrent": 16}'
K8S_EXECUTOR_OPTIONS_ENV_VAR = "AGSSP_K8S_EXECUTOR_OPTIONS"


def k8s_executor(**options) -> dg.ExecutorDefinition:
    """``k8s_job_executor`` configured with our per-step pod resources (options: k8s_executor_config)."""
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(k8s_executor_config(**options), name="agssp_k8s")


def _k8s_from_env() -> dg.ExecutorDefinition:
    options = json.loads(os.environ.get(K8S_EXECUTOR_OPTIONS_ENV_VAR, "{}") or "{}")
    if namespace := os.environ.get(K8S_NAMESPACE_ENV_VAR):
        options.setdefault("job_namespace", namespace)
    return k8s_executor(**options)


EXECUTOR_FACTORIES: dict[str, Callable[[], dg.ExecutorDefinition | None]] = {
    "default": lambda: None,  # Dagster's default (multiprocess) executor
    "multiprocess": lambda: dg.multiprocess_executor,
    "in_process": lambda: dg.in_process_executor,
    "k8s": _k8s_from_env,
}


def executor_from_env() -> dg.ExecutorDefinition | None:
    """The executor named by ``AGSSP_EXECUTOR`` (None = Dagster's default)."""
    name = os.environ.get(EXECUTOR_ENV_VAR, "default") or "default"
    if name not in EXECUTOR_FACTORIES:
        raise ValueError(f"{EXECUTOR_ENV_VAR}={name!r} is not one of {', '.join(EXECUTOR_FACTORIES)}")
    return EXECUTOR_FACTORIES[name]()
