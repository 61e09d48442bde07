"""AGBP training data: index images joined with their anomaly maps, jointly augmented.

Images come from the index parquet files of the sources whose role is ``pretrain`` or ``both``
(duplicates, ``duplicate_of`` not null, are dropped so no image counts twice). Maps come from each
source's map store, read lazily (``agssp_pipeline.kead.store.LazyMaps``) so a DataLoader worker only
touches the maps of its own batch. Image and map go through the *same* geometric augmentation (the map
is upsampled to the image and rides along as a 4th channel), so a defect and its anomaly stay aligned.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from agssp_pipeline.kead.maps import upsample_map
from agssp_pipeline.sources.decode import read_rgb

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MapLookup(Protocol):
    """What the dataset needs from a map store (``LazyMaps`` fulfils it; tests may pass a dict wrapper)."""

    image_ids: object

    def __getitem__(self, image_id: str) -> np.ndarray: ...


class InMemoryMaps:
    """Maps held in a dict (tests, small experiments); same interface as ``LazyMaps``."""

    def __init__(self, maps: Mapping[str, np.ndarray], version: str = "in-memory", attrs: dict | None = None):
        self._maps = {k: np.asarray(v, dtype=np.float32) for k, v in maps.items()}
        self.image_ids = np.array(list(self._maps), dtype=str)
        self.version = version
        self.attrs = attrs or {"version": version}

    def __getitem__(self, image_id: str) -> np.ndarray:
        return self._maps[image_id]


def open_lazy_maps(store_uri: str) -> MapLookup:
    from agssp_pipeline.kead.store import LazyMaps

    return LazyMaps(store_uri)


@dataclass
class PretrainTable:
    """The images AGBP trains on: one row per image with its class id and map store."""

    rows: pd.DataFrame  # image_id, path, source, category, class_id
    classes: list[str]  # class id -> category
    maps: dict[str, MapLookup]  # source -> map lookup (LazyMaps pinned to one store version)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.rows)


def read_index(index_path: str) -> pd.DataFrame:
    frame = pd.read_parquet(index_path, columns=["image_id", "path", "source", "category", "duplicate_of"])
    return frame


def build_pretrain_table(
    indexes: Mapping[str, pd.DataFrame | str],
    maps: Mapping[str, MapLookup | str],
) -> PretrainTable:
    """Join index rows (per source) with the image ids present in that source's map store.

    Images without a map are skipped and counted (the map store may lag the index); duplicates dropped.
    Classes are the sorted categories, so class ids are stable across runs with the same sources.
    """
    frames = []
    opened: dict[str, MapLookup] = {}
    skipped = {"duplicate": 0, "no_map": 0}
    for source, index in indexes.items():
        frame = read_index(index) if isinstance(index, str) else index.copy()
        if "source" not in frame:
            frame["source"] = source
        duplicates = (
            frame["duplicate_of"].notna() if "duplicate_of" in frame else pd.Series(False, index=frame.index)
        )
        skipped["duplicate"] += int(duplicates.sum())
        frame = frame.loc[~duplicates]
        lookup = maps.get(source)
        if lookup is None:
            raise ValueError(
                f"source '{source}' has no anomaly map store; materialise anomaly_maps for it first"
            )
        if isinstance(lookup, str):
            # opened once here: the version read now is the one trained on and recorded in the lineage
            # (LazyMaps pickles without its Zarr handle and reopens that same version in each worker)
            lookup = open_lazy_maps(lookup)
        opened[source] = lookup
        have_map = frame["image_id"].isin(set(np.asarray(lookup.image_ids).astype(str).tolist()))
        missing = int((~have_map).sum())
        if missing:
            log.warning(
                "source %s: %d of %d images have no anomaly map yet; skipped", source, missing, len(frame)
            )
        skipped["no_map"] += missing
        frames.append(frame.loc[have_map, ["image_id", "path", "source", "category"]])
    rows = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["image_id", "path", "source", "category"])
    )
    if rows.empty:
        raise ValueError(
            "no pretraining images with anomaly maps (check sources with role pretrain/both and their maps)"
        )
    classes = sorted(rows["category"].astype(str).unique().tolist())
    rows["class_id"] = rows["category"].astype(str).map({c: i for i, c in enumerate(classes)}).astype(int)
    return PretrainTable(rows=rows.reset_index(drop=True), classes=classes, maps=opened, skipped=skipped)


def pretrain_table_from_config(config) -> PretrainTable:
    """Pretraining table for a ``PipelineConfig``: pretrain/both sources, index and map store from the layout."""
    layout = config.layout()
    sources = config.pretrain_sources()
    if not sources:
        raise ValueError("no source has role 'pretrain' or 'both' in the config")
    indexes = {s.name: layout.index(s.name) for s in sources}
    maps = {s.name: layout.maps_store(s.name) for s in sources}
    return build_pretrain_table(indexes, maps)


class JointAugment:
    """Same random resized crop and flips for an image and its anomaly map; photometric jitter on RGB only."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.35, 1.0),
        hflip: float = 0.5,
        vflip: float = 0.0,
        color_jitter: float = 0.0,
        normalize: bool = True,
    ):
        self.geometry = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale, antialias=True),
                v2.RandomHorizontalFlip(hflip),
                v2.RandomVerticalFlip(vflip),
            ]
        )
        self.color = v2.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD) if normalize else None

    def __call__(self, image_rgb: np.ndarray, anomaly_map: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """HWC uint8 RGB + (G, G) map -> (3, S, S) float image, (S, S) float map."""
        height, width = image_rgb.shape[:2]
        full_map = upsample_map(anomaly_map, height, width)
        image = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1).float() / 255.0
        stacked = torch.cat([image, torch.from_numpy(full_map)[None]], dim=0)
        stacked = self.geometry(stacked)
        image, out_map = stacked[:3], stacked[3]
        if self.color is not None:
            image = self.color(image)
        if self.normalize is not None:
            image = self.normalize(image)
        return image, out_map


class PretrainDataset(Dataset):
    """Items: ``image`` (V, 3, S, S), ``map`` (V, S, S), ``label`` (class id), ``image_id``.

    ``views`` > 1 draws independent augmentations of the same image (MoCo), each with its own map.
    Map stores given as URIs are opened on first use inside each worker process (no open handles pickled).
    """

    def __init__(self, table: PretrainTable, augment: JointAugment, views: int = 1):
        self.rows = table.rows[["image_id", "path", "source", "class_id"]].to_dict("records")
        self.maps_spec = table.maps
        self._maps: dict[str, MapLookup] = {}
        self.augment = augment
        self.views = views

    def __len__(self) -> int:
        return len(self.rows)

    def _lookup(self, source: str) -> MapLookup:
        if source not in self._maps:
            spec = self.maps_spec[source]
            self._maps[source] = open_lazy_maps(spec) if isinstance(spec, str) else spec
        return self._maps[source]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}  # reopened lazily in the worker
        return state

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        image = read_rgb(row["path"])
        anomaly_map = np.asarray(self._lookup(row["source"])[row["image_id"]], dtype=np.float32)
        images, maps = zip(*(self.augment(image, anomaly_map) for _ in range(self.views)), strict=True)
        return {
            "image": torch.stack(images),
            "map": torch.stack(maps),
            "label": int(row["class_id"]),
            "image_id": row["image_id"],
        }


def _seed_worker(worker_id: int) -> None:
    # one torch thread per worker: the main process already uses every core for the model step.
    # Not cv2.setNumThreads: in a forked worker whose parent already ran OpenCV's thread pool it
    # deadlocks (seen when a Dagster run indexes, maps, then trains in one process).
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 2,
    shuffle: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    drop_last: bool = True,
) -> DataLoader:
    """DataLoader for AGBP. A DistributedSampler is used even for one process: its per-epoch order
    (``sampler.set_epoch``) is a function of (seed, epoch), so a resumed run sees the same data order.

    ``drop_last`` keeps batch statistics (BatchNorm, InfoNCE) well defined; it is turned off when the data
    set is smaller than one batch so tiny runs still train.
    """
    if len(dataset) < batch_size:
        drop_last = False
    sampler = DistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last and world_size > 1,
    )
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker,
        generator=generator,
    )


def make_synthetic_pretrain_table(
    root: str,
    images: int = 8,
    size: int = 64,
    grid: int = 16,
    categories: tuple[str, ...] = ("synthetic_a", "synthetic_b"),
    seed: int = 0,
) -> PretrainTable:
    """Textured gray images with one bright defect square each, and maps marking that square.

    For smoke runs, tests and benchmarks where no map store exists yet: writes PNGs under ``root``
    and keeps the maps in memory (``InMemoryMaps``). Never used by the pipeline itself.
    """
    from pathlib import Path

    rng = np.random.default_rng(seed)
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    rows, maps = [], {}
    for i in range(images):
        image = rng.normal(110, 12, size=(size, size, 1)).clip(0, 255).repeat(3, axis=2).astype(np.uint8)
        side = int(rng.integers(size // 6, size // 3))
        y, x = (int(v) for v in rng.integers(0, size - side, size=2))
        image[y : y + side, x : x + side] = 235
        anomaly = np.zeros((grid, grid), dtype=np.float32)
        scale = grid / size
        anomaly[
            int(y * scale) : max(int((y + side) * scale), int(y * scale) + 1),
            int(x * scale) : max(int((x + side) * scale), int(x * scale) + 1),
        ] = 1.0
        image_id = f"{i:016x}"
        path = folder / f"{image_id}.png"
        cv2.imwrite(str(path), image)
        rows.append(
            {
                "image_id": image_id,
                "path": str(path),
                "source": "synthetic",
                "category": categories[i % len(categories)],
                "duplicate_of": None,
            }
        )
        maps[image_id] = anomaly
    return build_pretrain_table(
        {"synthetic": pd.DataFrame(rows)}, {"synthetic": InMemoryMaps(maps, version=f"synthetic-{seed}")}
    )
