"""Dagster assets and asset checks. Each module only wires library code from ``agssp_pipeline``.

A module may define ``RESOURCES`` (a dict of resource key -> resource) that the Definitions merge.
"""

from assets import boxes, detection, ingestion, kead, training

ASSET_MODULES = [ingestion, kead, boxes, training, detection]
