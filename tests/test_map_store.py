"""Zarr map store: round trip, versions, incremental commits, crash safety, locking, s3 via moto."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from agssp_pipeline.kead.store import (
    LazyMaps,
    MapTable,
    MapWriter,
    StoreEmptyError,
    StoreLockedError,
    current_version,
    read_map_table,
    store_version_id,
    write_map_table,
)

GRID = 6


def _rows(ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maps whose values encode the row's id number, so a mixed-up row is detectable."""
    numbers = np.array([int(i.split("_")[1]) for i in ids], dtype=np.float32)
    maps = np.repeat(numbers[:, None, None] / 1000.0, GRID * GRID, axis=1).reshape(-1, GRID, GRID)
    return maps, numbers / 1000.0, np.full(len(ids), np.nan, np.float32)


def _assert_consistent(table: MapTable) -> None:
    assert len(set(table.image_id.tolist())) == len(table)
    for image_id, patch_map, score in zip(table.image_id, table.maps, table.image_score, strict=True):
        expected = int(image_id.split("_")[1]) / 1000.0
        assert np.allclose(patch_map.astype(np.float32), expected, atol=1e-3)
        assert score == pytest.approx(expected, abs=1e-6)


def test_round_trip_versions_and_lazy_reads(tmp_path):
    uri = str(tmp_path / "maps.zarr" / "src")
    with pytest.raises(StoreEmptyError):
        read_map_table(uri)
    version_a = store_version_id({"encoder": "cnn"}, {"cat": ["r1", "r2"]}, GRID)
    assert version_a == store_version_id({"encoder": "cnn"}, {"cat": ["r2", "r1"]}, GRID)  # order-free
    version_b = store_version_id({"encoder": "cnn"}, {"cat": ["r1", "r3"]}, GRID)
    assert version_a != version_b

    ids_a = [f"img_{i}" for i in range(5)]
    with MapWriter(uri, version_a, GRID, {"identity": {"encoder": "cnn"}}) as writer:
        writer.append(ids_a[:3], *_rows(ids_a[:3]))
        writer.append(ids_a[3:], *_rows(ids_a[3:]))
    table = read_map_table(uri)
    assert table.image_id.tolist() == ids_a and table.maps.dtype == np.float16
    assert table.attrs["version"] == version_a and table.attrs["identity"] == {"encoder": "cnn"}
    _assert_consistent(table)

    # a new version starts empty, becomes current, and the old one stays intact
    with MapWriter(uri, version_b, GRID, {"identity": {"encoder": "cnn"}}) as writer:
        assert writer.committed_ids() == set()
        writer.append(["img_9"], *_rows(["img_9"]))
    assert current_version(uri) == version_b
    assert read_map_table(uri).image_id.tolist() == ["img_9"]
    assert read_map_table(uri, version=version_a).image_id.tolist() == ids_a

    lazy = LazyMaps(uri, version=version_a)
    assert lazy.version == version_a and len(lazy) == 5 and "img_4" in lazy
    revived = pickle.loads(pickle.dumps(lazy))
    assert revived["img_4"].dtype == np.float32 and np.allclose(revived["img_4"], 0.004, atol=1e-3)
    with pytest.raises(KeyError):
        lazy["missing"]

    # write_map_table: a whole table as its own version
    version_c = write_map_table(uri, MapTable(*[table.image_id, table.maps, table.image_score,
                                                table.zero_shot_score], attrs={"version": "vtest"}))
    assert version_c == "vtest" and current_version(uri) == "vtest"
    _assert_consistent(read_map_table(uri))


def test_uncommitted_rows_are_invisible_and_overwritten(tmp_path):
    uri = str(tmp_path / "src")
    with MapWriter(uri, "v1", GRID) as writer:
        writer.append(["img_1", "img_2"], *_rows(["img_1", "img_2"]))
        # simulate a crash between writing rows and committing them
        group = writer._group
        group["image_id"][2:4] = np.array(["img_3", "img_4"])
        group["maps"][2:4] = np.full((2, GRID, GRID), 0.5, np.float16)
    assert read_map_table(uri).image_id.tolist() == ["img_1", "img_2"]
    with MapWriter(uri, "v1", GRID) as writer:
        assert writer.committed_ids() == {"img_1", "img_2"}
        writer.append(["img_3", "img_5"], *_rows(["img_3", "img_5"]))
    table = read_map_table(uri)
    assert table.image_id.tolist() == ["img_1", "img_2", "img_3", "img_5"]
    _assert_consistent(table)


def test_second_writer_is_locked_out(tmp_path):
    uri = str(tmp_path / "src")
    with MapWriter(uri, "v1", GRID):
        with pytest.raises(StoreLockedError, match="another process"):
            with MapWriter(uri, "v1", GRID):
                pass
    with MapWriter(uri, "v1", GRID) as writer:  # released on exit
        assert writer.committed == 0


KILLED_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {repo!r})
    from agssp_pipeline.kead.store import MapWriter
    grid = {grid}
    with MapWriter({uri!r}, "v1", grid) as writer:
        done = writer.committed_ids()
        todo = [f"img_{{i}}" for i in range(100000) if f"img_{{i}}" not in done]
        print("ready", flush=True)
        for start in range(0, len(todo), 7):
            ids = todo[start:start + 7]
            numbers = np.array([int(i.split("_")[1]) for i in ids], dtype=np.float32) / 1000.0
            maps = np.repeat(numbers[:, None, None], grid * grid, axis=1).reshape(-1, grid, grid)
            writer.append(ids, maps, numbers, numbers)
    """
)


def test_killed_writer_leaves_a_completable_store(tmp_path):
    """SIGKILL a writer mid-run (twice); every committed row stays unique and intact."""
    from pathlib import Path

    uri = str(tmp_path / "src")
    script = KILLED_WRITER.format(repo=str(Path(__file__).resolve().parents[1]), uri=uri, grid=GRID)
    seen = 0
    for _ in range(2):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert current_version(uri) is None  # a killed run never publishes its partial version
        table = read_map_table(uri, version="v1")
        assert len(table) >= seen
        seen = len(table)
        _assert_consistent(table)
        # committed rows are a prefix of the todo order: no gaps, no duplicates
        assert sorted(int(i.split("_")[1]) for i in table.image_id) == list(range(len(table)))
    assert seen > 0


@pytest.fixture
def moto_s3(moto_s3_server):
    return moto_s3_server.storage_options


def test_store_on_s3(moto_s3):
    uri = "s3://agssp/storage/maps.zarr/src"
    assert current_version(uri, storage_options=moto_s3) is None
    with MapWriter(uri, "v1", GRID, {"identity": {"encoder": "x"}}, storage_options=moto_s3) as writer:
        writer.append(["img_1", "img_2"], *_rows(["img_1", "img_2"]))
    with MapWriter(uri, "v1", GRID, storage_options=moto_s3) as writer:
        assert writer.committed_ids() == {"img_1", "img_2"}
        writer.append(["img_3"], *_rows(["img_3"]))
    table = read_map_table(uri, storage_options=moto_s3)
    assert table.image_id.tolist() == ["img_1", "img_2", "img_3"]
    _assert_consistent(table)
    assert LazyMaps(uri, storage_options=moto_s3)["img_3"].shape == (GRID, GRID)


def _s3(storage_options: dict):
    from tests.conftest import MotoS3

    return MotoS3(storage_options["endpoint_url"]).client()


def test_s3_writers_hold_a_lease(moto_s3):
    """One writer per S3 store: a live lease locks others out, is released on exit, and is not left behind."""
    import json

    uri = "s3://agssp/storage/maps.zarr/leased"
    s3 = _s3(moto_s3)
    with MapWriter(uri, "v1", GRID, storage_options=moto_s3) as writer:
        lease = json.loads(s3.get_object(Bucket="agssp", Key="storage/maps.zarr/leased.lock")["Body"].read())
        assert lease["expires_at"] > time.time() and lease["host"]
        with pytest.raises(StoreLockedError, match="being written by pid"):
            with MapWriter(uri, "v1", GRID, storage_options=moto_s3):
                pass
        writer.append(["img_1"], *_rows(["img_1"]))
    assert "Contents" not in s3.list_objects_v2(Bucket="agssp", Prefix="storage/maps.zarr/leased.lock")
    with MapWriter(uri, "v1", GRID, storage_options=moto_s3) as writer:  # released: the next run goes on
        assert writer.committed_ids() == {"img_1"}


def test_s3_lease_of_a_dead_writer_expires_and_a_lost_lease_stops_commits(moto_s3):
    import json

    from agssp_pipeline.kead.locks import S3Lease

    uri = "s3://agssp/storage/maps.zarr/crashed"
    key = "storage/maps.zarr/crashed.lock"
    s3 = _s3(moto_s3)
    dead = {"owner": "x", "host": "gpu-node-7", "pid": 4242, "renewed_at": time.time() - 3600,
            "expires_at": time.time() - 60}  # what a killed writer leaves behind
    s3.put_object(Bucket="agssp", Key=key, Body=json.dumps(dead).encode())
    # leaving the block must not publish either: the clean exit re-checks the lease and raises
    with pytest.raises(StoreLockedError, match="taken over"):
        with MapWriter(uri, "v1", GRID, storage_options=moto_s3) as writer:  # expired: taken over
            writer.append(["img_1"], *_rows(["img_1"]))
            # a writer that stalled past its TTL meets one that took its lease over: it must stop committing
            assert isinstance(writer._lock, S3Lease) and writer._lock.renew()
            s3.put_object(Bucket="agssp", Key=key, Body=json.dumps({**dead, "expires_at": time.time() + 600}).encode())
            assert not writer._lock.renew()
            with pytest.raises(StoreLockedError, match="taken over"):
                writer.append(["img_2"], *_rows(["img_2"]))
    assert read_map_table(uri, "v1", storage_options=moto_s3).image_id.tolist() == ["img_1"]
    assert current_version(uri, storage_options=moto_s3) is None  # the loser never publishes
    # the live (foreign) lease survives the loser's exit and keeps others out
    with pytest.raises(StoreLockedError, match="gpu-node-7"):
        with MapWriter(uri, "v1", GRID, storage_options=moto_s3):
            pass


def test_s3_lease_is_renewed_by_its_heartbeat(moto_s3):
    import json

    from agssp_pipeline.kead.locks import S3Lease

    lease = S3Lease("s3://agssp/storage/maps.zarr/beating", moto_s3, ttl_s=30, heartbeat_s=0.2)
    lease.acquire()
    try:
        s3 = _s3(moto_s3)
        first = json.loads(s3.get_object(Bucket="agssp", Key="storage/maps.zarr/beating.lock")["Body"].read())
        deadline = time.time() + 10
        while time.time() < deadline:
            now = json.loads(s3.get_object(Bucket="agssp", Key="storage/maps.zarr/beating.lock")["Body"].read())
            if now["renewed_at"] > first["renewed_at"]:
                break
            time.sleep(0.1)
        assert now["renewed_at"] > first["renewed_at"] and now["owner"] == first["owner"]
        lease.check()
    finally:
        lease.release()
    assert "Contents" not in s3.list_objects_v2(Bucket="agssp", Prefix="storage/maps.zarr/beating.lock")

    deleted = S3Lease("s3://agssp/storage/maps.zarr/deleted", moto_s3, heartbeat_s=600)
    deleted.acquire()
    s3.delete_object(Bucket="agssp", Key="storage/maps.zarr/deleted.lock")  # someone removed it by hand
    assert not deleted.renew()
    with pytest.raises(StoreLockedError, match="deleted while this writer held it"):
        deleted.check()
    deleted.release()
