"""Versioned, incremental, crash-safe Zarr v3 store of anomaly maps (one store per image source).

Layout (``layout.maps_store(source)`` = ``<storage_root>/maps.zarr/<source>``)::

    <source>/                      group; attrs: current_version, versions {id: summary}
    <source>/<version_id>/         group; attrs: identity, references, grid_size, code_version, committed
        maps             (N, G, G) float16   patch-resolution maps
        image_score      (N,)      float32
        zero_shot_score  (N,)      float32   NaN where the encoder has no text path
        image_id         (N,)      string

Why versions: maps of different encoders, weights, prompts, references or grids are not comparable
(thresholds are computed over a whole source), so a change of any of these starts a new version group
and the source group's ``current_version`` points at it; rows of two versions are never mixed.

Why ``ready`` and publishing: a new version is created in several Zarr writes (its group, four arrays,
its attributes). Its attributes, with ``ready: true``, are written last in one metadata write; a group
without that mark is the leftover of a killed creation and is built again from scratch by the next
writer (it holds no committed rows). The source group's ``current_version`` moves to a version only when
its writer finishes without an error (``MapWriter.publish``, called on a clean exit): a run killed half
way leaves the previous version current, and the next run of the same identity resumes the partial one.

Why ``committed``: a run appends rows in batches. Rows are written first, then the version's
``committed`` count (one atomic metadata write: LocalStore writes through a temporary file and a rename,
an S3 PUT is atomic). Readers only trust rows below ``committed``; a killed run leaves at most some
uncommitted rows past it, which the next run overwrites. So there are never duplicates or half rows.
Arrays grow in whole chunks (``GROW_ROWS``) to avoid a metadata write per batch.

Concurrent writers: ``MapWriter`` holds ``<store>.lock``, so a second run on the same source fails fast
with ``StoreLockedError`` instead of interleaving rows: an ``fcntl`` lock for local stores, an expiring,
renewed lease written with S3 conditional writes for s3:// stores (``agssp_pipeline.kead.locks``; a writer
that loses its lease stops before its next commit). Other object stores get no lock: run one writer per
source there (Dagster does so when the asset runs under one concurrency pool / one run per partition).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from agssp_pipeline import artifact_io
from agssp_pipeline.kead.locks import LocalLock, S3Lease, StoreLockedError  # noqa: F401 (re-exported)
from agssp_pipeline.records import Record, pick

CODE_VERSION = "kead-maps-1"  # bump when map semantics change: starts new store versions everywhere
MAP_CHUNK_ROWS = 32  # small chunks: training loaders read single maps at random
VECTOR_CHUNK_ROWS = 4096
GROW_ROWS = 1024
ARRAY_NAMES = ("maps", "image_score", "zero_shot_score", "image_id")


class StoreEmptyError(FileNotFoundError):
    """The store (or its current version) does not exist yet."""


@dataclass
class MapTable:
    """Complete rows of one store version, in memory."""

    image_id: np.ndarray  # (N,) str
    maps: np.ndarray  # (N, G, G) float16
    image_score: np.ndarray  # (N,) float32
    zero_shot_score: np.ndarray  # (N,) float32
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.image_id))

    @property
    def grid_size(self) -> int:
        return int(self.maps.shape[-1])


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def store_version_id(
    identity: dict[str, Any],
    references: dict[str, list[str]],
    grid_size: int,
    code_version: str = CODE_VERSION,
) -> str:
    """Hash of everything that makes maps comparable; a change starts a new version group."""
    payload = {
        "identity": identity,
        "references": {category: sorted(ids) for category, ids in sorted(references.items())},
        "grid_size": int(grid_size),
        "code_version": code_version,
    }
    return "v" + hashlib.sha256(_canonical(payload).encode()).hexdigest()[:12]


def _open_group(uri: str, mode: str, storage_options: dict[str, Any] | None) -> zarr.Group:
    local = artifact_io.local_path(uri)
    if local is not None:
        return zarr.open_group(str(local), mode=mode, zarr_format=3)
    return zarr.open_group(uri, mode=mode, zarr_format=3, storage_options=storage_options or {})


def _jsonable(value: Any) -> Any:
    return json.loads(_canonical(value))


def version_is_ready(group: zarr.Group) -> bool:
    """A version group whose creation finished: all arrays exist and its attributes were written."""
    return bool(group.attrs.get("ready")) and set(ARRAY_NAMES) <= set(group.array_keys())


class MapWriter:
    """Appends rows to one version of a source's map store; use as a context manager.

    Opening takes the lock and creates ``version_id`` if new (or resumes it); a clean exit publishes it
    as the source's current version, an exception leaves the previous current version in place.
    """

    def __init__(
        self,
        store_uri: str,
        version_id: str,
        grid_size: int,
        attrs: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> None:
        self.store_uri = store_uri.rstrip("/")
        self.replace = replace  # drop an existing group of this version first (under the lock)
        self.version_id = version_id
        self.grid_size = int(grid_size)
        self.attrs = _jsonable(attrs or {})
        self.storage_options = storage_options
        self._lock: LocalLock | S3Lease | None = None
        local = artifact_io.local_path(self.store_uri)
        if local is not None:
            self._lock = LocalLock(local)
        elif artifact_io.to_upath(self.store_uri).protocol in ("s3", "s3a"):
            self._lock = S3Lease(self.store_uri, storage_options)
        self._group: zarr.Group | None = None
        self.committed = 0

    def __enter__(self) -> MapWriter:
        if self._lock is not None:
            self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is None:
                self.publish()
        finally:
            self.close()

    def publish(self) -> None:
        """Make this version the source's current one (one metadata write of the source group)."""
        assert self._group is not None, "use MapWriter as a context manager"
        if self._lock is not None:
            self._lock.check()
        root = _open_group(self.store_uri, "a", self.storage_options)
        versions = dict(root.attrs.get("versions", {}))
        versions[self.version_id] = {"created_at": self._group.attrs.get("created_at"),
                                     "encoder": self.attrs.get("identity", {}).get("encoder"),
                                     "rows": self.committed}
        root.attrs.update({"current_version": self.version_id, "versions": versions})

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _open(self) -> None:
        root = _open_group(self.store_uri, "a", self.storage_options)
        if self.version_id in root.group_keys():
            existing = root[self.version_id]
            if self.replace or not version_is_ready(existing):  # a killed creation holds no rows
                del root[self.version_id]
        if self.version_id in root.group_keys():
            group = root[self.version_id]
            stored_grid = int(group.attrs.get("grid_size", self.grid_size))
            if stored_grid != self.grid_size:
                raise ValueError(f"version {self.version_id} has grid {stored_grid}, writer has {self.grid_size}")
        else:
            group = self._create_version(root)
        self._group = group
        self.committed = int(group.attrs.get("committed", 0))

    def _create_version(self, root: zarr.Group) -> zarr.Group:
        group = root.create_group(self.version_id)
        grid = self.grid_size
        group.create_array("maps", shape=(0, grid, grid), chunks=(MAP_CHUNK_ROWS, grid, grid),
                           dtype="float16", fill_value=0.0)
        group.create_array("image_score", shape=(0,), chunks=(VECTOR_CHUNK_ROWS,), dtype="float32",
                           fill_value=float("nan"))
        group.create_array("zero_shot_score", shape=(0,), chunks=(VECTOR_CHUNK_ROWS,),
                           dtype="float32", fill_value=float("nan"))
        group.create_array("image_id", shape=(0,), chunks=(VECTOR_CHUNK_ROWS,), dtype=str)
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        # one metadata write, last: until it lands the group is not a version
        group.attrs.update({**self.attrs, "version": self.version_id, "grid_size": grid,
                            "created_at": created, "committed": 0, "ready": True})
        return group

    def committed_ids(self) -> set[str]:
        assert self._group is not None, "use MapWriter as a context manager"
        if self.committed == 0:
            return set()
        return set(_read_ids(self._group, self.committed).tolist())

    def append(
        self,
        image_ids: np.ndarray | list[str],
        maps: np.ndarray,
        image_score: np.ndarray,
        zero_shot_score: np.ndarray,
    ) -> int:
        """Write rows after the committed ones, then commit them; returns the new committed count."""
        assert self._group is not None, "use MapWriter as a context manager"
        ids = np.asarray([str(i) for i in image_ids], dtype=object)
        count = len(ids)
        maps = np.asarray(maps, dtype=np.float16)
        if maps.shape != (count, self.grid_size, self.grid_size):
            raise ValueError(f"maps shape {maps.shape} != ({count}, {self.grid_size}, {self.grid_size})")
        if count == 0:
            return self.committed
        start, stop = self.committed, self.committed + count
        arrays = {name: self._group[name] for name in ARRAY_NAMES}
        if arrays["image_id"].shape[0] < stop:
            capacity = -(-stop // GROW_ROWS) * GROW_ROWS
            for array in arrays.values():
                array.resize((capacity, *array.shape[1:]))
        arrays["maps"][start:stop] = maps
        arrays["image_score"][start:stop] = np.asarray(image_score, dtype=np.float32)
        arrays["zero_shot_score"][start:stop] = np.asarray(zero_shot_score, dtype=np.float32)
        arrays["image_id"][start:stop] = ids.astype(str)
        if self._lock is not None:
            self._lock.check()  # a writer that lost its lease must not move the commit point
        self._group.attrs["committed"] = stop  # the commit point: rows below it are trusted
        self.committed = stop
        return stop


def _read_ids(group: zarr.Group, committed: int) -> np.ndarray:
    """Committed image ids as a plain numpy unicode array (Zarr returns numpy's StringDType)."""
    if committed == 0:
        return np.array([], dtype=str)
    return np.array(group["image_id"][:committed].astype(object).tolist(), dtype=str)


def current_version(store_uri: str, storage_options: dict[str, Any] | None = None) -> str | None:
    try:
        root = _open_group(store_uri, "r", storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    return root.attrs.get("current_version")


def store_versions(
    store_uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """(store attrs, {version id: version attrs}): what each version was made from; None without a store.

    The version attrs are the writer's record (encoder identity, weights, prompts, references, grid, code
    version): ``agssp lineage`` reads them here rather than opening the Zarr groups itself.
    """
    try:
        root = _open_group(store_uri, "r", storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    return dict(root.attrs), {name: dict(root[name].attrs) for name in root.group_keys()}


# what a version's attrs say made it: label -> key path (shown by ``agssp lineage``)
VERSION_FIELDS = {"encoder": "encoder", "model": "identity.model", "mode": "identity.mode", "weights": "weights",
                  "prompts hash": "prompt_hash", "grid": "grid_size", "maps": "committed", "created": "created_at",
                  "code": "code_version", "reference images": "references"}


def store_record(store_uri: str, index_uri: str | None = None) -> Record:
    """What the store is now: its current version, what made each version, and its current rows.

    Versions record the encoder identity, weights, prompts, references and code, not the index they
    mapped; the rows a consumer used are compared instead (``map_rows``: the ``count:digest`` of the
    committed ids of images still in the index at ``index_uri``, what thresholds and boxes record).
    """
    source = artifact_io.name(store_uri)
    stored = store_versions(store_uri)
    record = Record(f"map store {source}", partition=source)
    if stored is None:
        record.now["version"] = record.fields["current version"] = None
        return record.missing(f"no map store at {store_uri}")
    current = stored[0].get("current_version")
    record.now["version"] = record.fields["current version"] = current
    record.history = {version: {label: pick(attrs, path) for label, path in VERSION_FIELDS.items()}
                      for version, attrs in stored[1].items()}
    record.fields["versions in store"] = sorted(stored[1])
    if current in record.history:
        record.fields[f"version {current}"] = record.history[current]
    record.now["map_rows"] = lambda: _current_rows_id(store_uri, index_uri)
    return record


def _current_rows_id(store_uri: str, index_uri: str | None) -> str | None:
    from agssp_pipeline.boxes.stage import map_rows_id

    try:
        group = _version_group(store_uri, None, None)
    except StoreEmptyError:
        return None
    ids = _read_ids(group, int(group.attrs.get("committed", 0)))
    if index_uri and artifact_io.is_file(index_uri):
        indexed = artifact_io.read_parquet(index_uri, columns=["image_id"])["image_id"].astype(str).to_numpy()
        ids = ids[np.isin(ids, indexed)]
    return map_rows_id(ids)


def _version_group(store_uri: str, version: str | None, storage_options: dict[str, Any] | None) -> zarr.Group:
    try:
        root = _open_group(store_uri, "r", storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise StoreEmptyError(f"no map store at {store_uri}; materialise anomaly_maps first") from None
    version = version or root.attrs.get("current_version")
    if not version or version not in root.group_keys():
        raise StoreEmptyError(f"map store {store_uri} has no version {version!r}")
    group = root[version]
    if not version_is_ready(group):
        raise StoreEmptyError(f"map store {store_uri}: version {version!r} was never completely created")
    return group


def read_map_table(
    store_uri: str, version: str | None = None, storage_options: dict[str, Any] | None = None
) -> MapTable:
    """Committed rows of the current (or given) version."""
    group = _version_group(store_uri, version, storage_options)
    committed = int(group.attrs.get("committed", 0))
    return MapTable(
        image_id=_read_ids(group, committed),
        maps=np.asarray(group["maps"][:committed], dtype=np.float16),
        image_score=np.asarray(group["image_score"][:committed], dtype=np.float32),
        zero_shot_score=np.asarray(group["zero_shot_score"][:committed], dtype=np.float32),
        attrs=dict(group.attrs),
    )


def write_map_table(
    store_uri: str, table: MapTable, storage_options: dict[str, Any] | None = None
) -> str:
    """Write a whole table as its own version (replacing a version of the same id); returns the id.

    The version id is ``table.attrs["version"]`` when given, else a hash of the attrs.
    """
    attrs = {k: v for k, v in table.attrs.items() if k not in ("committed", "created_at")}
    version = attrs.pop("version", None) or store_version_id(
        attrs.get("identity", attrs), attrs.get("references", {}), table.maps.shape[-1]
    )
    with MapWriter(store_uri, version, table.maps.shape[-1], attrs, storage_options, replace=True) as writer:
        writer.append(table.image_id, table.maps, table.image_score, table.zero_shot_score)
    return version


class LazyMaps:
    """Read single maps by image id without loading the store (for training data loaders).

    Picklable: the Zarr handle is reopened lazily in each DataLoader worker.
    """

    def __init__(self, store_uri: str, version: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.store_uri = store_uri
        self.storage_options = storage_options
        group = _version_group(store_uri, version, storage_options)
        self.version: str = str(group.attrs["version"])
        self.attrs: dict[str, Any] = dict(group.attrs)
        committed = int(group.attrs.get("committed", 0))
        self.image_ids: list[str] = _read_ids(group, committed).tolist()
        self._row = {image_id: row for row, image_id in enumerate(self.image_ids)}
        self._maps: zarr.Array | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row

    def __getitem__(self, image_id: str) -> np.ndarray:
        if image_id not in self._row:
            raise KeyError(f"image {image_id} has no map in {self.store_uri} (version {self.version})")
        if self._maps is None:
            self._maps = _version_group(self.store_uri, self.version, self.storage_options)["maps"]
        return np.asarray(self._maps[self._row[image_id]], dtype=np.float32)
