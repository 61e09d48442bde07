"""The sensor that evaluates the automation policy of ``assets/automation.py`` in the daemon.

Cheap assets (image_index, category_thresholds, pseudo_boxes) carry ``CHEAP_ASSET_AUTOMATION`` in their
decorators; GPU assets carry none and run from their sensors/schedules or by hand (shown unsynced when
stale). See ``assets/automation.py`` for what triggers a request and why.
"""

from __future__ import annotations

import dagster as dg

from assets.automation import (  # noqa: F401  (re-exported: the policy's public home for jobs and tests)
    CHEAP_ASSET_AUTOMATION,
    CHEAP_ASSETS,
    EXPENSIVE_ASSETS,
    FOLDER_OBSERVATION_ASSET,
    cheap_asset_condition,
    deps_data_changed,
)

AUTOMATION_SENSOR_NAME = "cheap_assets_automation"

# One named sensor evaluates the cheap assets (every 30 s in the daemon); running by default so new
# sources, new code and rebuilt maps propagate without anyone switching it on. Assets without a
# condition (the GPU assets) are skipped.
automation_sensor = dg.AutomationConditionSensorDefinition(
    AUTOMATION_SENSOR_NAME,
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Keeps image_index, category_thresholds and pseudo_boxes current; GPU assets stay manual.",
)

SENSORS = [automation_sensor]
