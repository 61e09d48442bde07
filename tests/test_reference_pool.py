"""Few-shot references never come from held-apart downstream sources (no leak into pretraining)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from agssp_pipeline.config import load_config
from assets.kead import reference_pool


def _index(source: str, n: int) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"{source}{i:014d}" for i in range(n)], "source": source,
                         "category": "rolled_strip", "is_normal": True, "duplicate_of": None})


def test_downstream_images_never_serve_as_references(tmp_path: Path):
    sources = [
        {"name": "pre_a", "format": "voc", "root": "a", "category": "rolled_strip", "role": "pretrain"},
        {"name": "pre_b", "format": "voc", "root": "b", "category": "rolled_strip", "role": "both"},
        {"name": "held_out", "format": "yolo", "root": "c", "category": "rolled_strip", "role": "downstream"},
    ]
    path = tmp_path / "agssp.yaml"
    path.write_text(yaml.safe_dump({"storage_root": "store", "sources": sources}))
    config = load_config(path)
    layout = config.layout()
    Path(layout.index("x")).parent.mkdir(parents=True)
    for name, n in (("pre_a", 3), ("pre_b", 2), ("held_out", 5)):
        _index(name, n).to_parquet(layout.index(name))
    pool = reference_pool(config, layout, "pre_a", _index("pre_a", 3))
    assert set(pool["source"]) == {"pre_a", "pre_b"}
    assert len(pool) == 5
