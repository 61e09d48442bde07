"""Writer locks for map stores: one writer per store, local folder or S3 bucket.

* Local stores: an exclusive, non-blocking ``fcntl`` lock on ``<store>.lock``; the kernel drops it when
  the process dies, so there are no stale locks.
* S3 stores: a lease object ``<store>.lock`` written with S3 conditional writes. ``If-None-Match: *``
  creates it only if no one holds it; the holder renews it (``If-Match`` on its own ETag) from a
  background thread every ``heartbeat_s``. A killed writer cannot release its lease, so a lease expires
  ``ttl_s`` after its last renewal and the next writer takes it over, again with ``If-Match`` on the
  expired lease's ETag, so of two writers taking over at once only one wins. A holder whose renewal
  fails has lost the lease; ``check()`` then raises before it commits another row.
  This needs a store with conditional writes: AWS S3 (since 2024), MinIO, moto. Other object stores
  (gs://, az://...) get no lock: run one writer per source there (the ``gpu`` pool does).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

LEASE_TTL_S = 15 * 60.0
HEARTBEAT_S = 60.0


class StoreLockedError(RuntimeError):
    """Another process is writing this map store (or took over this writer's expired lease)."""


class LocalLock:
    """Exclusive, non-blocking ``fcntl`` lock released when the process dies (no stale locks)."""

    def __init__(self, store_path: Path) -> None:
        self.path = Path(str(store_path).rstrip("/") + ".lock")
        self._handle: Any = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreLockedError(
                f"map store {self.path.with_suffix('')} is being written by another process "
                f"(lock {self.path}); wait for that run to finish"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def check(self) -> None:
        """A kernel lock cannot be lost while the process lives."""

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _precondition_failed(error: BaseException) -> bool:
    """s3fs turns a 412 (or a 409 conditional-write conflict) into OSError/FileExistsError."""
    if isinstance(error, FileExistsError):
        return True
    cause = getattr(error, "__cause__", None) or error
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return code in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class S3Lease:
    """A renewable, expiring lease object next to an S3 map store (see the module docstring)."""

    def __init__(self, store_uri: str, storage_options: dict[str, Any] | None = None,
                 ttl_s: float | None = None, heartbeat_s: float | None = None) -> None:
        import fsspec

        self.uri = store_uri.rstrip("/") + ".lock"
        self.fs, path = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.bucket, self.key, _ = self.fs.split_path(path)
        self.ttl_s = float(LEASE_TTL_S if ttl_s is None else ttl_s)
        self.heartbeat_s = float(HEARTBEAT_S if heartbeat_s is None else heartbeat_s)
        self.owner = uuid.uuid4().hex
        self.lost: str | None = None
        self._etag: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- S3 calls ------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "renewed_at": now, "expires_at": now + self.ttl_s}).encode()

    def _put(self, **condition: str) -> str:
        out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)
        return str(out["ETag"])

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The current lease body and its ETag, from one GET (so the two belong together)."""
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            out = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with out["Body"] as stream:
                return await stream.read(), str(out["ETag"])

        try:
            data, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(data), etag
        except ValueError:
            return {}, etag  # unreadable lease: treated as expired below

    # -- lease ---------------------------------------------------------------------------------------
    def acquire(self) -> None:
        try:
            self._etag = self._put(IfNoneMatch="*")
        except OSError as error:
            if not _precondition_failed(error):
                raise
            self._take_over_if_expired()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.key}", daemon=True)
        self._thread.start()

    def _take_over_if_expired(self) -> None:
        holder, etag = self._read()
        if etag is None:  # released between our write and our read: try once more
            self._etag = self._put(IfNoneMatch="*")
            return
        expires = float((holder or {}).get("expires_at", 0.0))
        if expires > time.time():
            raise StoreLockedError(
                f"map store {self.uri[: -len('.lock')]} is being written by pid {holder.get('pid')} on "
                f"{holder.get('host')} (lease {self.uri}, renewed {time.time() - holder.get('renewed_at', 0):.0f} s "
                f"ago, expires in {expires - time.time():.0f} s); wait for that run to finish"
            )
        try:  # the holder died: take its expired lease, atomically against other takers
            self._etag = self._put(IfMatch=etag)
        except OSError as error:
            if _precondition_failed(error):
                raise StoreLockedError(f"another writer took over the expired lease {self.uri} first") from None
            raise

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost`` set) when someone else holds it now."""
        with self._mutex:
            if self._etag is None or self.lost:
                return False
            try:
                self._etag = self._put(IfMatch=self._etag)
                return True
            except FileNotFoundError:
                self.lost = f"lease {self.uri} was deleted while this writer held it"
                return False
            except OSError as error:
                if not _precondition_failed(error):
                    return True  # a network hiccup: the lease stays ours until it expires; retry next beat
                self.lost = f"lease {self.uri} was taken over by another writer (it had expired)"
                return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.renew():
                return

    def check(self) -> None:
        if self.lost:
            raise StoreLockedError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._mutex:
            if self._etag is None or self.lost:
                return
            try:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
            except OSError:
                pass  # no longer ours, or already gone: nothing to release
            self._etag = None
