"""Batch runner: score every indexed image of a source once and append the maps to its store.

Incremental (images already committed to the current store version are skipped), per category (the
encoder's few-shot memory is built once per category), with decoding in DataLoader workers so the
model never waits on JPEG decoding, pinned memory and bf16 autocast on CUDA.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from agssp_pipeline.kead.base import AnomalyEncoder
from agssp_pipeline.kead.maps import batch_images
from agssp_pipeline.kead.references import references_by_category
from agssp_pipeline.kead.store import CODE_VERSION, MapWriter, store_version_id
from agssp_pipeline.sources.decode import read_rgb, read_rgb_of


@dataclass
class Progress:
    done: int
    total: int
    images_per_s: float
    eta_s: float
    category: str


@dataclass
class RunStats:
    computed: int
    skipped: int
    images_per_s: float
    device: str
    seconds: float
    forward_passes: int
    version: str
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image_id, reason)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ImageDataset(Dataset):
    """Decodes and preprocesses in workers; a bad file yields ``ok=False`` instead of killing the run."""

    def __init__(self, rows: pd.DataFrame, preprocess: Callable[[np.ndarray], torch.Tensor], image_size: int):
        self.ids = rows["image_id"].astype(str).tolist()
        self.paths = rows["path"].astype(str).tolist()
        # the index's stat of each file: a file whose stat changed is re-hashed before it is mapped
        known = {"bytes", "mtime"} <= set(rows.columns)
        self.stats = list(zip(rows["bytes"], rows["mtime"], strict=True)) if known else [None] * len(self.ids)
        self.preprocess = preprocess
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int) -> dict[str, Any]:
        try:
            stat = self.stats[item]
            image = (read_rgb(self.paths[item]) if stat is None
                     else read_rgb_of(self.paths[item], self.ids[item], int(stat[0]), float(stat[1])))
            tensor, ok, reason = self.preprocess(image), True, ""
        except Exception as error:  # noqa: BLE001 - recorded per image, the run goes on
            tensor, ok, reason = torch.zeros(3, self.image_size, self.image_size), False, str(error)
        return {"image": tensor, "image_id": self.ids[item], "ok": ok, "reason": reason}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": batch_images([i["image"] for i in items]),  # a list when aspect inputs differ in shape
        "image_id": [i["image_id"] for i in items],
        "ok": [i["ok"] for i in items],
        "reason": [i["reason"] for i in items],
    }


def mappable_rows(index: pd.DataFrame) -> pd.DataFrame:
    """The images that get a map: one per image id, duplicates (``duplicate_of`` set) excluded."""
    rows = index
    if "duplicate_of" in rows:
        rows = rows[rows["duplicate_of"].isna()]
    return rows.drop_duplicates("image_id").reset_index(drop=True)


def load_reference_images(encoder: AnomalyEncoder, rows: pd.DataFrame) -> torch.Tensor | list[torch.Tensor]:
    return batch_images([encoder.preprocess(read_rgb(path)) for path in rows["path"].astype(str)])


def by_input_shape(rows: pd.DataFrame, encoder: AnomalyEncoder) -> pd.DataFrame:
    """``rows`` ordered by the shape the encoder gives them (index ``height``/``width``), so that batches of
    aspect-preserved inputs hold one shape and run as one forward; unchanged for fixed-shape encoders."""
    shape_of = getattr(encoder, "input_shape", None)
    if shape_of is None or getattr(encoder, "input", "squash") == "squash" or not {"height", "width"} <= set(rows):
        return rows
    known = rows["height"].notna() & rows["width"].notna()
    keys = [shape_of(int(h), int(w)) if ok else (0, 0)
            for h, w, ok in zip(rows["height"], rows["width"], known, strict=True)]
    order = sorted(range(len(rows)), key=lambda i: keys[i])
    return rows.iloc[order]


def store_version_for(encoder: AnomalyEncoder, references: pd.DataFrame, categories: list[str],
                      code_version: str = CODE_VERSION) -> tuple[str, dict[str, Any]]:
    """The store version id and attributes of a run of ``encoder`` with ``references``."""
    refs = {c: ids for c, ids in references_by_category(references).items() if c in set(categories)}
    identity = encoder.identity.as_dict()
    version = store_version_id(identity, refs, encoder.grid_size, code_version)
    attrs = {
        "identity": identity,
        "encoder": identity["encoder"],
        "weights": identity["weights"],
        "prompt_hash": identity.get("prompt_hash", ""),
        "references": refs,
        "code_version": code_version,
        "image_size": encoder.image_size,
    }
    return version, attrs


def resolve_num_workers(setting: int | str, device: torch.device | str) -> int:
    """Decoding workers for ``setting`` ("auto" or a count) on ``device``: see ``KeadSettings.num_workers``.

    One core decodes roughly 60-75 camera frames (1600x1200 JPEG) per second (benchmarks/
    bench_kead_loader.py), fewer than a GPU scores, so CUDA runs get up to 8 workers.
    """
    if setting != "auto":
        return int(setting)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    ceiling = 8 if torch.device(device).type == "cuda" else 2
    return max(0, min(ceiling, cores - 1))


def _score_batch(encoder: AnomalyEncoder, writer: MapWriter, batch: dict[str, Any], ok: np.ndarray,
                 category: str, device: torch.device) -> int:
    """One forward over the decodable images of a batch, appended to the store; returns the row count."""
    on_cuda = device.type == "cuda"
    if isinstance(batch["image"], list):  # aspect inputs of several shapes: the encoder groups them
        images = [image.to(device, non_blocking=on_cuda) for image, good in zip(batch["image"], ok, strict=True)
                  if good]
    else:
        images = batch["image"][torch.from_numpy(ok)].to(device, non_blocking=on_cuda)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda), torch.inference_mode():
        result = encoder.score(images, category)
    ids = [i for i, good in zip(batch["image_id"], ok, strict=True) if good]
    writer.append(ids, result.maps.float().cpu().numpy(), result.image_score.float().cpu().numpy(),
                  result.zero_shot_score.float().cpu().numpy())
    return len(ids)


def compute_anomaly_maps(
    index: pd.DataFrame,
    encoder: AnomalyEncoder,
    store_uri: str,
    references: pd.DataFrame,
    batch_size: int = 16,
    num_workers: int | str = "auto",
    progress: Callable[[Progress], None] | None = None,
    storage_options: dict[str, Any] | None = None,
    code_version: str = CODE_VERSION,
    require_references: bool = True,
) -> RunStats:
    """Maps for every mappable image of ``index`` not yet in the store's current version.

    ``require_references=False`` allows categories without references (zero-shot encoders, k_shot 0);
    the encoder is then asked to score them without a few-shot memory.
    """
    rows = mappable_rows(index)
    categories = sorted(rows["category"].astype(str).unique())
    missing = sorted(set(categories) - set(references["category"].astype(str)))
    if missing and require_references:
        raise ValueError(f"no reference images for categories {missing}; see kead.reference_strategy")
    version, attrs = store_version_for(encoder, references, categories, code_version)
    device = torch.device(encoder.device)
    on_cuda = device.type == "cuda"
    num_workers = resolve_num_workers(num_workers, device)
    started = time.perf_counter()
    computed, forward_passes, failed = 0, 0, []
    # an encoder may be reused across runs and sources: only this run's references may score this store
    encoder.clear_references()
    with MapWriter(store_uri, version, encoder.grid_size, attrs, storage_options) as writer:
        done_ids = writer.committed_ids()
        todo = rows[~rows["image_id"].astype(str).isin(done_ids)]
        skipped = len(rows) - len(todo)
        total = len(todo)
        for category, group in todo.groupby("category", sort=True):
            category = str(category)
            reference_rows = references[references["category"].astype(str) == category]
            if len(reference_rows):
                encoder.set_references(category, load_reference_images(encoder, reference_rows))
            loader = DataLoader(
                _ImageDataset(by_input_shape(group, encoder), encoder.preprocess, encoder.image_size),
                batch_size=batch_size,
                num_workers=num_workers,
                pin_memory=on_cuda,
                collate_fn=_collate,
                persistent_workers=False,
            )
            for batch in loader:
                ok = np.asarray(batch["ok"], dtype=bool)
                failed += [(i, r) for i, r, good in zip(batch["image_id"], batch["reason"], ok, strict=True)
                           if not good]
                if not ok.any():
                    continue
                computed += _score_batch(encoder, writer, batch, ok, category, device)
                forward_passes += 1
                if progress is not None:
                    elapsed = time.perf_counter() - started
                    rate = (computed + len(failed)) / max(elapsed, 1e-9)
                    remaining = total - computed - len(failed)
                    progress(Progress(computed + len(failed), total, rate, remaining / max(rate, 1e-9), category))
    seconds = time.perf_counter() - started
    return RunStats(
        computed=computed,
        skipped=skipped,
        images_per_s=computed / seconds if seconds > 0 and computed else 0.0,
        device=str(device),
        seconds=seconds,
        forward_passes=forward_passes,
        version=version,
        failed=failed,
    )
