"""The shipped example deployment config validates and uses every format the adapters support."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from agssp_pipeline.config import SOURCE_FORMATS, load_config
from agssp_pipeline.sources import ingest_source
from agssp_pipeline.sources.formats import check_options

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "sources.example.yaml"


def test_example_config_validates_without_the_data():
    config = load_config(EXAMPLE)
    kinds = Counter(source.kind for source in config.sources)
    assert kinds == {"public": 25, "plant": 15}
    assert set(source.format for source in config.sources) == set(SOURCE_FORMATS)
    assert config.downstream_sources() and config.pretrain_sources()
    assert all(Path(source.root).is_absolute() for source in config.sources)
    for source in config.sources:
        check_options(source)  # no misspelt option anywhere


def test_example_source_with_missing_root_fails_with_its_name():
    source = load_config(EXAMPLE).source("hsm1_top_cam")
    if Path(source.root).exists():
        pytest.skip("this machine really has the plant mount")
    with pytest.raises(FileNotFoundError, match=r"source 'hsm1_top_cam': root folder /mnt/plant/hsm1/top does not exist"):
        ingest_source(source)


def test_misspelt_option_is_refused_before_reading_anything(tmp_path):
    from agssp_pipeline.config import SourceConfig

    source = SourceConfig(name="tiles", format="mask_folder", root=str(tmp_path), category="tile",
                          options={"mask_sufix": "_GT"})
    with pytest.raises(ValueError, match=r"source 'tiles' \(mask_folder\): unknown option\(s\) \['mask_sufix'\]"):
        ingest_source(source)
