"""Reading and writing every artifact, on a local disk or on object storage (fsspec / universal_pathlib).

This is the only module that looks at URI schemes. Every writer goes through :func:`write_bytes`
(or a typed helper built on it), so a crash never leaves a half-written file where the good one was:

- local paths: the bytes go to ``<name>.partial-<pid>-<thread>`` beside the target, are flushed and
  fsynced, then ``os.replace`` swaps them in (atomic on POSIX); temporaries left by a killed writer
  are removed by the next writer of the same file;
- object stores (``s3://``, ``gs://``, ``memory://``...): one PUT of the whole object, which the store
  makes visible atomically.

Anything that needs a real local folder (ultralytics datasets and runs, symlinked exports) asks
:func:`scratch_dir` for one and publishes its results with :func:`upload_tree`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

PARTIAL_MARK = ".partial-"
_PARTIAL_PID = re.compile(r"\.partial-(\d+)-\d+$")


# ---------------------------------------------------------------- addresses


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for object-store URLs (``s3://b/k``); False for local paths and ``file://`` URLs."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def local_path(uri: str | os.PathLike[str]) -> Path | None:
    """The local ``Path`` of a local address, or None for an object-store URL."""
    if is_remote(uri):
        return None
    return Path(str(uri).removeprefix("file://"))


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """``uri/part/part``; keeps the scheme of URLs, never turns ``s3://b`` into ``s3:/b``."""
    text = str(uri)
    if not parts:
        return text
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts if p)])


def parent(uri: str | os.PathLike[str]) -> str:
    text = str(uri).rstrip("/")
    return text.rsplit("/", 1)[0] if "/" in text else "."


def name(uri: str | os.PathLike[str]) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def to_upath(uri: str | os.PathLike[str]) -> UPath:
    """A pathlib-like handle (local ``PosixUPath`` or a cloud path) for callers that want one."""
    return UPath(str(uri))


def _fs(uri: str | os.PathLike[str]) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(str(uri))


def same_location(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two addresses name the same place (local paths resolved; URLs compared as text)."""
    la, lb = local_path(a), local_path(b)
    if la is None or lb is None:
        return str(a).rstrip("/") == str(b).rstrip("/")
    return la.resolve() == lb.resolve()


def canonical(uri: str | os.PathLike[str]) -> str:
    """An absolute local path, or the URL unchanged: what lineage records store."""
    local = local_path(uri)
    return str(local.resolve()) if local is not None else str(uri).rstrip("/")


# ---------------------------------------------------------------- queries


def exists(uri: str | os.PathLike[str]) -> bool:
    local = local_path(uri)
    if local is not None:
        return local.exists()
    fs, path = _fs(uri)
    return fs.exists(path)


def is_file(uri: str | os.PathLike[str]) -> bool:
    local = local_path(uri)
    if local is not None:
        return local.is_file()
    fs, path = _fs(uri)
    return fs.isfile(path)


def is_dir(uri: str | os.PathLike[str]) -> bool:
    local = local_path(uri)
    if local is not None:
        return local.is_dir()
    fs, path = _fs(uri)
    return fs.isdir(path)


def list_dir(uri: str | os.PathLike[str], *, dirs_only: bool = False) -> list[str]:
    """Full addresses of the entries directly inside ``uri`` (sorted); [] when it does not exist."""
    local = local_path(uri)
    if local is not None:
        if not local.is_dir():
            return []
        entries = [p for p in local.iterdir() if not dirs_only or p.is_dir()]
        return sorted(str(p) for p in entries)
    fs, path = _fs(uri)
    if not fs.exists(path):
        return []
    base = str(uri).rstrip("/")
    out = []
    for entry in fs.ls(path, detail=True):
        if dirs_only and entry["type"] != "directory":
            continue
        out.append(join(base, entry["name"].rstrip("/").rsplit("/", 1)[-1]))
    return sorted(out)


def glob(pattern: str | os.PathLike[str]) -> list[str]:
    """Addresses matching a glob pattern (``*`` within a path segment), sorted."""
    local = local_path(pattern)
    if local is not None:
        anchor = Path(local.anchor) if local.is_absolute() else Path(".")
        relative = str(local.relative_to(anchor)) if local.is_absolute() else str(local)
        return sorted(str(p) for p in anchor.glob(relative))
    fs, path = _fs(pattern)
    protocol = str(pattern).split("://", 1)[0]
    return sorted(f"{protocol}://{hit}" for hit in fs.glob(path))


def modified_time(uri: str | os.PathLike[str]) -> float | None:
    """Modification time (seconds since the epoch) or None when the store does not say."""
    local = local_path(uri)
    if local is not None:
        return local.stat().st_mtime if local.exists() else None
    fs, path = _fs(uri)
    try:
        stamp = fs.modified(path)
    except (NotImplementedError, FileNotFoundError, OSError):
        return None
    return stamp.timestamp() if stamp is not None else None


# ---------------------------------------------------------------- bytes


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    local = local_path(uri)
    if local is not None:
        return local.read_bytes()
    fs, path = _fs(uri)
    return fs.cat_file(path)


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` at ``uri`` so readers see the old file or the new one, never a part; returns ``uri``."""
    local = local_path(uri)
    if local is None:
        fs, path = _fs(uri)
        fs.pipe_file(path, bytes(data))
        return str(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(local)
    tmp = local.with_name(f"{local.name}{PARTIAL_MARK}{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, local)
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(uri)


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with ``pid`` still runs (to tell a dead writer's leftovers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_partials(target: str | os.PathLike[str]) -> list[str]:
    """Remove temporaries of ``target`` left by writers that no longer run; returns what was removed."""
    local = local_path(target)
    if local is None or not local.parent.is_dir():
        return []
    removed = []
    for candidate in local.parent.glob(f"{local.name}{PARTIAL_MARK}*"):
        match = _PARTIAL_PID.search(candidate.name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
            removed.append(str(candidate))
    return removed


def remove(uri: str | os.PathLike[str], *, recursive: bool = False) -> None:
    """Delete a generated artifact (never call this on a user's images); missing is fine."""
    local = local_path(uri)
    if local is not None:
        if local.is_dir() and not local.is_symlink():
            if recursive:
                shutil.rmtree(local)
            else:
                local.rmdir()
        elif local.exists() or local.is_symlink():
            local.unlink()
        return
    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def makedirs(uri: str | os.PathLike[str]) -> str:
    """Create a local folder (object stores have no folders: nothing to do there)."""
    local = local_path(uri)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
    return str(uri)


# ---------------------------------------------------------------- text and JSON


def read_text(uri: str | os.PathLike[str]) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike[str], text: str) -> str:
    return write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str | os.PathLike[str]) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str | os.PathLike[str], payload: Any) -> str:
    return write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode("utf-8"))


def read_json_or(uri: str | os.PathLike[str], default: Any = None) -> Any:
    """The JSON at ``uri``, or ``default`` when there is none."""
    return read_json(uri) if exists(uri) else default


# ---------------------------------------------------------------- Parquet


def parquet_bytes(table: pd.DataFrame | pa.Table, metadata: Mapping[str, str] | None = None) -> bytes:
    """A table (and optional key/value schema metadata) as zstd Parquet bytes."""
    arrow = table if isinstance(table, pa.Table) else pa.Table.from_pandas(table, preserve_index=False)
    if metadata:
        merged = dict(arrow.schema.metadata or {})
        merged.update({str(k).encode(): str(v).encode() for k, v in metadata.items()})
        arrow = arrow.replace_schema_metadata(merged)
    sink = pa.BufferOutputStream()
    pq.write_table(arrow, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_parquet(
    uri: str | os.PathLike[str], table: pd.DataFrame | pa.Table, metadata: Mapping[str, str] | None = None
) -> str:
    """Write a table atomically; ``metadata`` lands in the Parquet schema (see :func:`parquet_metadata`)."""
    return write_bytes(uri, parquet_bytes(table, metadata))


def read_arrow(uri: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    local = local_path(uri)
    if local is not None:
        return pq.read_table(local, columns=columns)
    return pq.read_table(io.BytesIO(read_bytes(uri)), columns=columns)


def read_parquet(uri: str | os.PathLike[str], columns: list[str] | None = None) -> pd.DataFrame:
    return read_arrow(uri, columns).to_pandas()


def parquet_metadata(uri: str | os.PathLike[str]) -> dict[str, str]:
    """The key/value schema metadata a writer stored with :func:`write_parquet` (pandas' own left out)."""
    local = local_path(uri)
    source = local if local is not None else io.BytesIO(read_bytes(uri))
    raw = pq.read_schema(source).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k != b"pandas"}


# ---------------------------------------------------------------- images


def write_image(uri: str | os.PathLike[str], image: Any, ext: str | None = None) -> str:
    """Encode an image array (BGR or grey, as cv2 uses) by the extension of ``uri`` and write it atomically."""
    import cv2

    suffix = ext or ("." + name(uri).rsplit(".", 1)[-1] if "." in name(uri) else ".png")
    ok, encoded = cv2.imencode(suffix, image)
    if not ok:
        raise ValueError(f"could not encode an image as {suffix} for {uri}")
    return write_bytes(uri, encoded.tobytes())


def read_image(uri: str | os.PathLike[str], flags: int | None = None) -> Any:
    """Decode an image (cv2, BGR) from any address; raises ValueError when the bytes are not an image."""
    import cv2
    import numpy as np

    data = np.frombuffer(read_bytes(uri), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED if flags is None else flags)
    if image is None:
        raise ValueError(f"{uri} is not a decodable image")
    return image


# ---------------------------------------------------------------- local work folders


def scratch_dir(storage_root: str | os.PathLike[str], *parts: str) -> Path:
    """A local folder for tools that need one (ultralytics runs, exports with symlinks).

    With a local storage root it lives under ``<root>/scratch/``; with an object store it lives under
    ``$AGSSP_SCRATCH`` (default: the system temp folder), keyed by the bucket path, so it is a cache
    and never the home of an artifact: results are published with :func:`upload_tree`.
    """
    local = local_path(storage_root)
    if local is not None:
        base = local / "scratch"
    else:
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(storage_root))
        base = Path(os.environ.get("AGSSP_SCRATCH") or tempfile.gettempdir()) / "agssp-scratch" / key
    target = base.joinpath(*parts)
    target.mkdir(parents=True, exist_ok=True)
    return target


def upload_tree(local_dir: str | os.PathLike[str], uri: str | os.PathLike[str]) -> list[str]:
    """Copy the regular files under ``local_dir`` to ``uri`` (same relative paths); returns their addresses.

    A no-op returning the files in place when ``uri`` is the same local folder.
    """
    source = Path(local_dir)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if same_location(source, uri):
        return [str(p) for p in files]
    written = []
    for path in files:
        target = join(uri, *path.relative_to(source).parts)
        write_bytes(target, path.read_bytes())
        written.append(target)
    return written


@contextlib.contextmanager
def local_copy(uri: str | os.PathLike[str]) -> Iterator[Path]:
    """A local file with the content of ``uri`` for libraries that only open paths (deleted afterwards)."""
    local = local_path(uri)
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="agssp-") as tmp:
        target = Path(tmp) / name(uri)
        target.write_bytes(read_bytes(uri))
        yield target
