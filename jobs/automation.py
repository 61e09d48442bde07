"""Automation policy: cheap assets keep themselves current, expensive GPU assets wait for a person or a schedule.

Cheap assets (image_index, category_thresholds, pseudo_boxes: seconds to minutes on a CPU) carry
``CHEAP_ASSET_AUTOMATION``: a partition is requested when

* it is new (a source was added: its partition became missing),
* an upstream partition's *data version* changed (new images observed in a plant folder, anomaly maps
  rebuilt with different content) - a rematerialisation that produced identical data triggers nothing,
* the asset's ``code_version`` changed (the logic changed, so every existing partition is stale),

and never while an upstream partition is missing or running, or the partition itself is running.
Only the affected partitions are requested: a new image in one plant folder re-indexes that source.

Expensive GPU assets (anomaly_maps, backbone/detector checkpoints, evaluations) carry no condition:
they run from their sensor/schedule or by hand, and the UI shows them as unsynced when an upstream
data version or their code version moved on.
"""

from __future__ import annotations

import dagster as dg

AC = dg.AutomationCondition

CHEAP_ASSETS = ("image_index", "category_thresholds", "pseudo_boxes")
EXPENSIVE_ASSETS = (
    "anomaly_maps", "kead_evaluation", "backbone_checkpoint", "detector_checkpoint", "finetune_evaluation",
)
AUTOMATION_SENSOR_NAME = "cheap_assets_automation"


def deps_data_changed() -> dg.AutomationCondition:
    """An upstream partition got new *data* (not merely a new materialisation) or is requested this tick.

    For observable source assets (plant folders) Dagster already counts only observations with a new
    data version; for materialised parents ``data_version_changed`` compares data versions. Parents
    updated by a run that also targeted this asset do not re-trigger it (that run handled it).
    """
    return AC.any_deps_match(
        (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("data_changed_outside_run")
        | AC.will_be_requested()
    ).with_label("any_deps_data_changed")


def cheap_asset_condition() -> dg.AutomationCondition:
    """Eager on new partitions, upstream data changes and code-version changes (see module docstring)."""
    return (
        (AC.newly_missing() | deps_data_changed() | AC.code_version_changed()).since_last_handled()
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("cheap_asset_eager")


CHEAP_ASSET_AUTOMATION = cheap_asset_condition()

# One named sensor evaluates the cheap assets (every 30 s in the daemon); running by default so a plant
# deployment indexes new images without anyone switching it on. Assets without a condition are skipped.
automation_sensor = dg.AutomationConditionSensorDefinition(
    AUTOMATION_SENSOR_NAME,
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Keeps image_index, category_thresholds and pseudo_boxes current; GPU assets stay manual.",
)

SENSORS = [automation_sensor]
