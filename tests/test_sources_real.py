"""Ingestion of the real datasets in ../shared/data (skipped cleanly where absent)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from agssp_pipeline.config import SourceConfig
from agssp_pipeline.sources import ingest_source

pytestmark = pytest.mark.shared_data


def test_neu_det_voc(neu_det_root):
    source = SourceConfig(name="neu_det", format="voc", root=str(neu_det_root), category="rolled_strip",
                          classes=["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"])
    result = ingest_source(source)
    images = result.images
    assert len(images) == 1800 and len(result.annotations) == 4189
    assert (images.split == "validation").sum() == 30
    assert (result.quarantine.action == "quarantined").sum() == 0
    duplicates = images[images.duplicate_of.notna()]
    assert [Path(p).name for p in duplicates.path] == ["patches_105.jpg"]
    original = images[images.path.str.endswith("/patches_101.jpg")].iloc[0]
    assert duplicates.iloc[0].duplicate_of == original.image_id and pd.isna(original.duplicate_of)
    assert set(images.width) == {200} and set(images.height) == {200}


def test_magnetic_tile_masks(magnetic_tile_root):
    source = SourceConfig(name="magnetic_tile", format="mask_folder", root=str(magnetic_tile_root),
                          category="magnetic_tile", normal_subfolders=["MT_Free"], options={"class_strip_prefix": "MT_"})
    result = ingest_source(source)
    images = result.images
    assert len(images) == 1344 and images.mask_path.notna().sum() == 1344
    assert (images.is_normal == True).sum() == 952  # noqa: E712
    assert images[images.is_normal == True].path.str.contains("/MT_Free/").all()  # noqa: E712
    assert images.is_normal.isna().sum() == 4  # the four empty Uneven masks: unknown, flagged
    assert set(result.annotations.class_name) == {"Blowhole", "Break", "Crack", "Fray", "Uneven"}
    assert (images.channels == 1).all()
