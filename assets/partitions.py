"""Partitions shared by the assets, one set per role, each registered from agssp.yaml.

- ``image_source``: every configured source (``image_index`` and its checks): a downstream set is indexed too.
- ``pretrain_source``: only sources used for pretraining (role ``pretrain`` or ``both``): anomaly maps,
  their evaluation, pseudo boxes and box quality. A downstream source is not a key there, so the UI neither
  shows it "missing" nor offers to materialise maps of a held-apart set.
- ``backbone``: the backbones of ``backbone.backbones`` that the backbone registry knows.

The sets are dynamic so that the config, not the code, decides their keys. ``partition_requests`` is the one
function that says how the instance's keys must change to match a config; the sensor returns its requests,
everything else applies them with ``sync_partitions``. A source whose role changes or that leaves the config
is removed from ``pretrain_source`` (no stale key lingers there); ``image_source`` keeps the keys of removed
sources, as their index history stays meaningful.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dagster as dg

IMAGE_SOURCE_PARTITION = "image_source"
PRETRAIN_SOURCE_PARTITION = "pretrain_source"
BACKBONE_PARTITION = "backbone"

image_source_partitions = dg.DynamicPartitionsDefinition(name=IMAGE_SOURCE_PARTITION)
pretrain_source_partitions = dg.DynamicPartitionsDefinition(name=PRETRAIN_SOURCE_PARTITION)
backbone_partitions = dg.DynamicPartitionsDefinition(name=BACKBONE_PARTITION)

# sets whose keys must equal the config's (stale keys removed); image_source only ever grows
EXACT_SETS = (PRETRAIN_SOURCE_PARTITION, BACKBONE_PARTITION)

PartitionRequest = dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest


def known_backbones(configured: Sequence[str]) -> tuple[list[str], list[str]]:
    """(configured names the backbone registry knows, names it does not), in config order."""
    from agssp_pipeline.training.backbones import BACKBONES

    return [n for n in configured if n in BACKBONES], [n for n in configured if n not in BACKBONES]


def wanted_partitions(config) -> dict[str, list[str]]:
    """The keys each partition set should hold for ``config`` (a PipelineConfig)."""
    return {
        IMAGE_SOURCE_PARTITION: list(config.source_names),
        PRETRAIN_SOURCE_PARTITION: [s.name for s in config.pretrain_sources()],
        BACKBONE_PARTITION: known_backbones(config.backbone.backbones)[0],
    }


def partition_requests(registered: Callable[[str], Sequence[str]], config) -> list[PartitionRequest]:
    """Add and delete requests that make the registered keys (``registered(set_name)``) match ``config``."""
    requests: list[PartitionRequest] = []
    for name, wanted in wanted_partitions(config).items():
        existing = list(registered(name))
        missing = [key for key in wanted if key not in existing]
        if missing:
            requests.append(dg.AddDynamicPartitionsRequest(partitions_def_name=name, partition_keys=missing))
        stale = [key for key in existing if key not in wanted] if name in EXACT_SETS else []
        if stale:
            requests.append(dg.DeleteDynamicPartitionsRequest(partitions_def_name=name, partition_keys=stale))
    return requests


def apply_partition_requests(instance: dg.DagsterInstance, requests: Sequence[PartitionRequest]) -> None:
    """Apply requests the way the daemon applies a sensor's (schedules and scripts cannot return them)."""
    for request in requests:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)


def sync_partitions(instance: dg.DagsterInstance, config) -> list[PartitionRequest]:
    """Register every partition ``config`` implies and drop stale role keys; returns what changed."""
    requests = partition_requests(instance.get_dynamic_partitions, config)
    apply_partition_requests(instance, requests)
    return requests
