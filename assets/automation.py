"""Automation policy: cheap assets keep themselves current, expensive GPU assets wait for a person or a schedule.

A leaf module (Dagster only) so asset modules can attach the condition in their decorators without an
import cycle through ``jobs``; the sensor that evaluates it is ``jobs/automation.py``.

Cheap assets (image_index, category_thresholds, pseudo_boxes: seconds to minutes on a CPU) carry
``CHEAP_ASSET_AUTOMATION``: a partition is requested when

* it is new (a source was added: its partition became missing),
* an upstream partition's *data version* changed (anomaly maps rebuilt with different content,
  thresholds moved) - a rematerialisation that produced identical data triggers nothing,
* the asset's ``code_version`` changed (the logic changed, so every existing partition is stale),

and never while an upstream partition is missing or running, or the partition itself is running.
Only the affected partitions are requested.

New files in a plant folder are the ingestion sensor's job (``jobs/ingestion.py``): it compares each
source's folder fingerprint and requests ``image_index`` for exactly the changed sources. The folder
observation asset ``plant_images`` carries one data version for all folders (per-partition observations
do not feed Dagster's staleness of partitioned assets), so the policy ignores it: reacting to it would
re-index every source when one folder changed, and twice with the sensor's run.

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
# observable source of the plant folders; its changes reach image_index through the ingestion sensor
FOLDER_OBSERVATION_ASSET = "plant_images"


def deps_data_changed() -> dg.AutomationCondition:
    """An upstream partition got new *data* (not merely a new materialisation) or is requested this tick.

    ``data_version_changed`` compares data versions, so a parent rebuilt with identical content does not
    trigger; parents updated by a run that also targeted this asset do not re-trigger it (that run
    handled it).
    """
    return _ignore_folder_observation(
        AC.any_deps_match(
            (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("data_changed_outside_run")
            | AC.will_be_requested()
        )
    ).with_label("any_deps_data_changed")


def _ignore_folder_observation(condition):
    """Leave ``plant_images`` to the ingestion sensor (see the module docstring)."""
    return condition.ignore(dg.AssetSelection.assets(FOLDER_OBSERVATION_ASSET))


def cheap_asset_condition() -> dg.AutomationCondition:
    """Eager on new partitions, upstream data changes and code-version changes (see module docstring)."""
    return (
        (AC.newly_missing() | deps_data_changed() | AC.code_version_changed()).since_last_handled()
        # indexing reads the folder itself: a never-observed plant_images must not block a new source
        & ~_ignore_folder_observation(AC.any_deps_missing())
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("cheap_asset_eager")


CHEAP_ASSET_AUTOMATION = cheap_asset_condition()
