"""AGBP data: index/map join, joint augmentation (the map follows the image), dataset and loader."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from agssp_pipeline.training.data import (
    InMemoryMaps,
    JointAugment,
    PretrainDataset,
    build_pretrain_table,
    make_loader,
    make_synthetic_pretrain_table,
)


def _index(rows):
    return pd.DataFrame(rows, columns=["image_id", "path", "source", "category", "duplicate_of"])


def test_table_drops_duplicates_skips_images_without_maps_and_numbers_classes():
    index_a = _index(
        [
            ("a1", "/x/a1.png", "a", "steel", None),
            ("a2", "/x/a2.png", "a", "steel", "a1"),  # duplicate of a1
            ("a3", "/x/a3.png", "a", "steel", None),  # no map yet
        ]
    )
    index_b = _index([("b1", "/x/b1.png", "b", "billet", None)])
    maps = {
        "a": InMemoryMaps({"a1": np.zeros((4, 4)), "a2": np.zeros((4, 4))}),
        "b": InMemoryMaps({"b1": np.ones((4, 4))}),
    }
    table = build_pretrain_table({"a": index_a, "b": index_b}, maps)
    assert sorted(table.rows["image_id"]) == ["a1", "b1"]
    assert table.classes == ["billet", "steel"]
    assert dict(zip(table.rows["image_id"], table.rows["class_id"], strict=True)) == {"a1": 1, "b1": 0}
    assert table.skipped == {"duplicate": 1, "no_map": 1}


def test_table_errors_clearly_without_maps():
    index = _index([("a1", "/x/a1.png", "a", "steel", None)])
    with pytest.raises(ValueError, match="no anomaly map store"):
        build_pretrain_table({"a": index}, {})
    with pytest.raises(ValueError, match="no pretraining images with anomaly maps"):
        build_pretrain_table({"a": index}, {"a": InMemoryMaps({})})


def _bright_region(image: torch.Tensor) -> torch.Tensor:
    return image.mean(dim=0) > 0.6


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_map_follows_the_image_through_crop_and_flips(seed):
    rng = np.random.default_rng(seed)
    size, grid = 96, 24
    image = np.full((size, size, 3), 40, dtype=np.uint8)
    anomaly = np.zeros((grid, grid), dtype=np.float32)
    # an L-shaped defect (asymmetric, so a flip of only one of the two would show)
    y, x = (4 * int(v) for v in rng.integers(2, 12, size=2))  # on the map's 4-px cell grid
    for dy, dx, h, w in ((0, 0, 32, 8), (24, 0, 8, 32)):
        image[y + dy : y + dy + h, x + dx : x + dx + w] = 230
        anomaly[(y + dy) // 4 : (y + dy + h) // 4, (x + dx) // 4 : (x + dx + w) // 4] = 1.0
    torch.manual_seed(seed)
    augment = JointAugment(48, scale=(0.4, 1.0), hflip=0.5, vflip=0.5, normalize=False)
    for _ in range(5):
        out_image, out_map = augment(image, anomaly)
        assert out_image.shape == (3, 48, 48) and out_map.shape == (48, 48)
        bright, hot = _bright_region(out_image), out_map > 0.5
        if bright.sum() < 10:
            continue  # crop missed the defect
        iou = (bright & hot).sum().item() / (bright | hot).sum().item()
        assert iou > 0.85, iou
        # control: the same map flipped on its own no longer matches the image
        flipped = hot.flip(-1)
        assert (bright & flipped).sum().item() / (bright | flipped).sum().item() < iou - 0.2


def test_dataset_items_and_loader_batches(tmp_path):
    table = make_synthetic_pretrain_table(str(tmp_path), images=6, size=64)
    dataset = PretrainDataset(table, JointAugment(32), views=2)
    item = dataset[0]
    assert item["image"].shape == (2, 3, 32, 32) and item["map"].shape == (2, 32, 32)
    assert item["label"] in (0, 1)
    # ImageNet normalisation: raw gray ~110/255 maps to a small negative/positive range, not [0, 1]
    assert item["image"].min() < 0
    loader = make_loader(dataset, batch_size=4, num_workers=0, seed=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 2, 3, 32, 32) and batch["label"].shape == (4,)
    assert len(loader) == 1  # drop_last: 6 images -> one full batch of 4


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    index = _index([("b1", str(bad), "s", "steel", None), ("b2", str(bad), "s", "steel", None)])
    table = build_pretrain_table(
        {"s": index}, {"s": InMemoryMaps({"b1": np.zeros((4, 4)), "b2": np.zeros((4, 4))})}
    )
    with pytest.raises(OSError, match="broken.png"):
        PretrainDataset(table, JointAugment(32))[0]


def test_config_table_reads_index_and_lazy_map_store_in_workers(tmp_path):
    """End to end with the real map store: index parquet + write_map_table -> loader with a worker process."""
    store = pytest.importorskip("agssp_pipeline.kead.store")
    from agssp_pipeline.config import PipelineConfig, SourceConfig
    from agssp_pipeline.training.data import pretrain_table_from_config
    from agssp_pipeline.training.lineage import data_lineage

    synthetic = make_synthetic_pretrain_table(str(tmp_path / "images"), images=4, size=64)
    config = PipelineConfig(
        storage_root=str(tmp_path / "storage"),
        sources=[
            SourceConfig(name="synth", format="image_folder", root=str(tmp_path / "images"), category="steel")
        ],
    )
    layout = config.layout()
    layout.ensure_dir("index")
    rows = synthetic.rows.assign(source="synth", duplicate_of=None)
    rows.loc[3, "duplicate_of"] = rows.loc[0, "image_id"]
    rows[["image_id", "path", "source", "category", "duplicate_of"]].to_parquet(layout.index("synth"))
    ids = rows["image_id"].to_numpy(dtype=str)
    maps = np.stack([synthetic.maps["synthetic"][i] for i in ids]).astype(np.float16)
    table = store.MapTable(
        image_id=ids,
        maps=maps,
        image_score=np.ones(len(ids), dtype=np.float32),
        zero_shot_score=np.full(len(ids), np.nan, dtype=np.float32),
        attrs={"encoder": "test", "model": "none", "weights": "random-init", "mode": "few_shot"},
    )
    store.write_map_table(layout.maps_store("synth"), table)

    pretrain = pretrain_table_from_config(config)
    assert len(pretrain) == 3 and pretrain.skipped["duplicate"] == 1
    assert pretrain.maps["synth"].version == store.LazyMaps(layout.maps_store("synth")).version
    lineage = data_lineage(config, pretrain)
    assert lineage["sources"]["synth"]["map_store_version"] == str(
        store.LazyMaps(layout.maps_store("synth")).version
    )
    assert lineage["sources"]["synth"]["index_version"]
    newer = store.MapTable(
        image_id=ids,
        maps=np.zeros_like(maps),
        image_score=table.image_score,
        zero_shot_score=table.zero_shot_score,
        attrs={**table.attrs, "mode": "zero_shot"},
    )
    store.write_map_table(layout.maps_store("synth"), newer)  # a re-run of anomaly_maps during training
    assert store.LazyMaps(layout.maps_store("synth")).version != pretrain.maps["synth"].version
    dataset = PretrainDataset(pretrain, JointAugment(32, scale=(1.0, 1.0), hflip=0.0, normalize=False))
    batch = next(iter(make_loader(dataset, batch_size=3, num_workers=1)))
    # the worker read the version the table was built on (pinned), not the newer all-zero one
    for image, anomaly in zip(batch["image"], batch["map"], strict=True):
        bright, hot = _bright_region(image[0]), anomaly[0] > 0.5
        assert (bright & hot).sum() / (bright | hot).sum() > 0.5
