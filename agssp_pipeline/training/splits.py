"""Fixed, stored train/val splits of the downstream (labelled) datasets.

Why stored: every finetune variant (scratch, AGBP, AGSSP, user weights) must see exactly the same images, and a
re-run next month must too, otherwise deltas between variants measure the split, not the weights. The split is
stratified by each image's dominant class (the class with most boxes) so small classes appear in val, seeded,
and kept at ``storage_root/splits/<dataset>.parquet`` together with a fingerprint of the index it was made from;
it is reused while that fingerprint and the split parameters are unchanged, and rebuilt (with a log line) when
the labelled set changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from agssp_pipeline import artifact_io
from agssp_pipeline.storage import StorageLayout

LOGGER = logging.getLogger(__name__)
NO_BOX_CLASS = "(no boxes)"
SPLIT_METADATA_KEY = b"agssp_split"
SPLIT_COLUMNS = ["image_id", "split", "dominant_class", "few_shot"]


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float
    seed: int
    # one N or several (the paper's Table 3: e.g. 50 and 100); several subsets are nested (50 within 100)
    few_shot_train_images: int | tuple[int, ...] | list[int] | None = None

    def few_shot_sizes(self) -> tuple[int, ...]:
        value = self.few_shot_train_images
        if value is None:
            return ()
        return (int(value),) if isinstance(value, int) else tuple(sorted({int(v) for v in value}))

    def as_dict(self) -> dict:
        sizes = self.few_shot_sizes()
        few = None if not sizes else sizes[0] if isinstance(self.few_shot_train_images, int) else list(sizes)
        return {"val_fraction": self.val_fraction, "seed": self.seed, "few_shot_train_images": few}


def few_shot_column(size: int) -> str:
    """Split column of the few-shot subset of ``size`` training images."""
    return f"few_shot_{int(size)}"


def split_path(layout: StorageLayout, dataset: str) -> str:
    return layout.path("splits", f"{dataset}.parquet")


def dominant_class(image_ids: pd.Series, annotations: pd.DataFrame) -> pd.Series:
    """Class with most boxes per image (ties: alphabetical), ``NO_BOX_CLASS`` for images without boxes."""
    counts = annotations.groupby(["image_id", "class_name"]).size().rename("n").reset_index()
    counts = counts.sort_values(["image_id", "n", "class_name"], ascending=[True, False, True])
    top = counts.drop_duplicates("image_id").set_index("image_id")["class_name"]
    return image_ids.map(top).fillna(NO_BOX_CLASS).rename("dominant_class")


def _allocate(strata: pd.Series, fraction_or_count: float | int, rng: np.random.Generator) -> np.ndarray:
    """Pick a stratified subset: per stratum, a share proportional to its size (largest remainder rounding).

    Returns a boolean mask over ``strata``. The total is round(N * fraction) or exactly ``count``.
    """
    n_total = len(strata)
    target = int(fraction_or_count) if isinstance(fraction_or_count, int) else round(n_total * fraction_or_count)
    target = max(0, min(target, n_total))
    groups = {name: np.flatnonzero(strata.to_numpy() == name) for name in sorted(strata.unique())}
    exact = {name: len(members) * target / n_total for name, members in groups.items()} if n_total else {}
    quota = {name: int(np.floor(value)) for name, value in exact.items()}
    leftover = target - sum(quota.values())
    by_remainder = sorted(exact, key=lambda name: (-(exact[name] - quota[name]), name))
    for name in by_remainder[:leftover]:
        quota[name] += 1
    chosen = np.zeros(n_total, dtype=bool)
    for name, members in groups.items():
        picked = rng.permutation(members)[: quota[name]]
        chosen[picked] = True
    return chosen


def make_split(images: pd.DataFrame, annotations: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """Stratified train/val split (+ optional stratified few-shot subset of train); deterministic in seed."""
    if not 0.0 < params.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {params.val_fraction}")
    ids = pd.Series(sorted(images["image_id"].unique()), name="image_id")
    if len(ids) < 2:
        raise ValueError(f"a train/val split needs at least 2 images, got {len(ids)}")
    strata = dominant_class(ids, annotations)
    rng = np.random.default_rng(params.seed)
    is_val = _allocate(strata, params.val_fraction, rng)
    if is_val.all() or not is_val.any():
        raise ValueError(f"val_fraction {params.val_fraction} leaves an empty train or val split of {len(ids)} images")
    table = pd.DataFrame({"image_id": ids, "split": np.where(is_val, "val", "train"), "dominant_class": strata})
    table["few_shot"] = False
    pool = np.flatnonzero(~is_val)  # largest subset first, each smaller one drawn inside the previous: nested
    extra = []
    for size in sorted(params.few_shot_sizes(), reverse=True):
        if size > len(pool):
            raise ValueError(f"few-shot asks for {size} training images, the "
                             + ("train split" if len(extra) == 0 else f"{few_shot_column(len(pool))} subset")
                             + f" has {len(pool)}")
        pool = pool[_allocate(strata.iloc[pool].reset_index(drop=True), int(size), rng)]
        table[few_shot_column(size)] = False
        table.loc[pool, few_shot_column(size)] = True
        extra.insert(0, few_shot_column(size))
    if extra:
        table["few_shot"] = table[extra[0]]  # the smallest subset (the one column of single-N splits)
    return table[SPLIT_COLUMNS + (extra if len(extra) > 1 else [])]


def index_fingerprint(images: pd.DataFrame, annotations: pd.DataFrame) -> str:
    """Hash of the labelled set (image ids and their boxes), independent of row order."""
    digest = hashlib.sha256()
    for image_id in sorted(images["image_id"].astype(str)):
        digest.update(image_id.encode() + b"\n")
    boxes = annotations[["image_id", "class_name", "x1", "y1", "x2", "y2"]].copy()
    boxes = boxes.sort_values(list(boxes.columns)).round(3)
    digest.update(boxes.to_csv(index=False).encode())
    return digest.hexdigest()[:16]


def first_copies(index: pd.DataFrame, annotations: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The labelled set a split is made of: first copies of each image (``duplicate_of`` unset) and their boxes.

    Duplicates share their original's image_id, so they are dropped before splitting (a copy must not sit in
    train and val at once). Idempotent: an already de-duplicated set comes back unchanged.
    """
    keep = index["duplicate_of"].isna() if "duplicate_of" in index else pd.Series(True, index=index.index)
    kept = index[keep].drop_duplicates("image_id")
    if "path" in annotations and "path" in kept:
        boxes = annotations[annotations["path"].isin(set(kept["path"]))]
    else:
        boxes = annotations[annotations["image_id"].isin(set(kept["image_id"]))]
    return kept, boxes


def labelled_set_fingerprint(index: pd.DataFrame, annotations: pd.DataFrame) -> str:
    """The split fingerprint: of the de-duplicated labelled set, whether given raw (lineage) or deduplicated.

    The one function finetune (through :func:`load_or_create_split`) and ``agssp lineage`` both call, so a
    source with duplicate images is not reported as changed right after a clean run.
    """
    return index_fingerprint(*first_copies(index, annotations))


def read_split(path: str) -> tuple[pd.DataFrame, dict] | None:
    """A stored split and what it was made from (fingerprint, params, dataset); None when there is none."""
    if not artifact_io.exists(path):
        return None
    meta = json.loads(artifact_io.parquet_metadata(path).get(SPLIT_METADATA_KEY.decode(), "{}"))
    return artifact_io.read_parquet(path), meta


def write_split(path: str, frame: pd.DataFrame, meta: dict) -> str:
    """The one writer of ``splits/<dataset>.parquet``: the table with its recorded inputs in the schema metadata."""
    return artifact_io.write_parquet(path, frame, metadata={SPLIT_METADATA_KEY.decode(): json.dumps(meta)})


def load_or_create_split(
    layout: StorageLayout, dataset: str, images: pd.DataFrame, annotations: pd.DataFrame, params: SplitParams
) -> tuple[pd.DataFrame, dict]:
    """The stored split of ``dataset`` if still valid for this index and these params, else a new stored one.

    Returns (split table, metadata incl. ``fingerprint``, ``params`` and ``reused``).
    """
    path = split_path(layout, dataset)
    fingerprint = labelled_set_fingerprint(images, annotations)
    wanted = {"fingerprint": fingerprint, "params": params.as_dict(), "dataset": dataset}
    stored = read_split(path)
    if stored is not None:
        frame, meta = stored
        if meta.get("fingerprint") == fingerprint and meta.get("params") == params.as_dict():
            return frame, {**meta, "path": path, "reused": True}
        LOGGER.warning("split of %s at %s was made for another index or parameters (%s); rebuilding it",
                       dataset, path, {k: meta.get(k) for k in ("fingerprint", "params")})
    frame = make_split(images, annotations, params)
    write_split(path, frame, wanted)
    return frame, {**wanted, "path": path, "reused": False}


def split_summary(split: pd.DataFrame) -> pd.DataFrame:
    """Images per dominant class and split (for asset metadata)."""
    return split.pivot_table(index="dominant_class", columns="split", values="image_id", aggfunc="count",
                             fill_value=0)
