"""Partitions shared by the assets: one per image source (never per image)."""

import dagster as dg

IMAGE_SOURCE_PARTITION = "image_source"

image_source_partitions = dg.DynamicPartitionsDefinition(name=IMAGE_SOURCE_PARTITION)
