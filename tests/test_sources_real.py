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


@pytest.fixture(scope="module")
def x_sdd_root() -> Path:
    from conftest import shared_dataset

    return shared_dataset("x_sdd")


@pytest.fixture(scope="module")
def casting_root() -> Path:
    from conftest import shared_dataset

    return shared_dataset("casting")


def test_x_sdd_class_folders(x_sdd_root):
    from agssp_pipeline.kead.evaluation import defect_class_of
    from agssp_pipeline.sources.detect import recognise

    assert recognise(x_sdd_root).format == "class_folders"
    source = SourceConfig(name="x_sdd", format="class_folders", root=str(x_sdd_root), category="rolled_strip")
    result = ingest_source(source)
    images = result.images
    assert len(images) == 1360 and (images.is_normal == False).all()  # noqa: E712  (all defective)
    classes = images.apply(defect_class_of, axis=1).value_counts().to_dict()
    assert classes == {"red iron": 397, "slag inclusion": 238, "finishing roll printing": 203,
                       "oxide scale of temperature system": 203, "surface scratch": 134, "iron sheet ash": 122,
                       "oxide scale of plate system": 63}
    by_category = ingest_source(source.model_copy(update={"category": None, "category_from": "subfolder",
                                                          "options": {"folder_is": "category"}}))
    assert by_category.images.category.nunique() == 7 and (result.quarantine.action == "quarantined").sum() == 0


def test_casting_ok_def_folders(casting_root):
    from agssp_pipeline.sources.detect import recognise

    assert recognise(casting_root).format == "class_folders"
    source = SourceConfig(name="casting", format="class_folders", root=str(casting_root), category="impeller")
    images = ingest_source(source).images
    assert len(images) == 7348
    counts = images.groupby(["split", "is_normal"]).size().to_dict()
    assert counts == {("train", False): 3758, ("train", True): 2875, ("test", False): 453, ("test", True): 262}
    assert images.duplicate_of.notna().sum() == 64
