"""Shared fixtures: offline settings, the real datasets (skipped when absent), the demo corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")

import agssp_pipeline  # noqa: E402,F401  (offline defaults, ultralytics font)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AGSSP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """Path of a real dataset in ../shared/data, or a clean skip when this checkout has none."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name} not found at {path} (only developer machines and CI have ../shared/data)")
    return path


@pytest.fixture(scope="session")
def neu_det_root() -> Path:
    return shared_dataset("neu_det")


@pytest.fixture(scope="session")
def magnetic_tile_root() -> Path:
    return shared_dataset("magnetic_tile")


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The embedded synthetic demo corpus, generated once per test session (read-only for tests)."""
    from agssp_pipeline.demo import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(autouse=True)
def _forget_closed_dagster_instances(monkeypatch):
    """Dagster keeps the last instance's defs-state storage in a context variable, which can outlive
    ``instance_for_test`` (its temp folder then gone) or the instance itself (a weakref that dies when the
    garbage collector runs, so the failure depends on timing); a later Definitions load would open that
    deleted SQLite file or raise "undefined DagsterInstance weakref". Within a test, a storage whose
    instance is gone counts as no storage; after every test it is reset, so tests don't depend on order."""
    try:
        from dagster._core.storage.defs_state import base as defs_state_base
    except ImportError:  # a Dagster without defs-state storage has nothing to reset
        yield
        return
    current = defs_state_base.DefsStateStorage.get.__func__

    def live_storage(cls):
        storage = current(cls)
        ref = getattr(storage, "_instance_weakref", None)
        return None if storage is not None and ref is not None and ref() is None else storage

    monkeypatch.setattr(defs_state_base.DefsStateStorage, "get", classmethod(live_storage))
    yield
    defs_state_base._current_storage.set(None)


class MotoS3:
    """A moto S3 server on 127.0.0.1 with the bucket ``agssp``: its endpoint, fsspec options and a client."""

    bucket = "agssp"
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.storage_options = {"key": "testing", "secret": "testing", "anon": False, "endpoint_url": endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **self.credentials)


@pytest.fixture
def moto_s3_server():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    s3 = MotoS3(f"http://{host}:{port}")
    s3.client().create_bucket(Bucket=MotoS3.bucket)
    import s3fs

    # fsspec caches filesystems by their arguments, not by AWS_ENDPOINT_URL: an instance made for another
    # test's server (another port) would be reused and refused
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture()
def dagster_home(tmp_path, monkeypatch):
    """A fresh persistent Dagster instance folder for the test (DAGSTER_HOME)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture()
def lineage_writes(monkeypatch) -> list[str]:
    """Every lineage.json write through artifact_io during the test (to assert one writer, once)."""
    from agssp_pipeline import artifact_io
    from agssp_pipeline.training import checkpoint as ckpt

    writes: list[str] = []
    original = artifact_io.write_bytes

    def recording(uri, data):
        if str(uri).endswith(ckpt.LINEAGE_FILE):
            writes.append(str(uri))
        return original(uri, data)

    monkeypatch.setattr(artifact_io, "write_bytes", recording)
    return writes
