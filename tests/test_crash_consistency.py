"""Fault injection on the map store: SIGKILL the writer at every Zarr write of a new version's run.

After each kill a reader of "current" must see a complete version (the previous one, or the new one if
the kill came after it was published) with all of its metadata, and one rerun must leave exactly the
maps of an uninterrupted run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agssp_pipeline.kead.store import current_version, read_map_table

GRID = 4
REPO = Path(__file__).resolve().parents[1]

# Writes version vA (20 rows, published), then version vB (40 rows in batches of 7); with kill_at=N > 0 the
# process kills itself at its N-th store write of the vB run. Returns the number of vB writes.
def write_versions(uri: str, kill_at: int = 0) -> int:
    import os
    import signal

    from zarr.storage import LocalStore

    from agssp_pipeline.kead.store import MapWriter

    refs = {"steel": ["ref_1", "ref_2"]}

    def rows(ids):
        numbers = np.array([int(i.split("_")[1]) for i in ids], dtype=np.float32) / 100.0
        maps = np.repeat(numbers[:, None, None], GRID * GRID, axis=1).reshape(-1, GRID, GRID)
        return maps, numbers, numbers * 2

    def write(version, count):
        attrs = {"identity": {"encoder": version}, "references": refs}
        with MapWriter(uri, version, GRID, attrs) as writer:
            done = writer.committed_ids()
            todo = [f"img_{i}" for i in range(count) if f"img_{i}" not in done]
            for start in range(0, len(todo), 7):
                ids = todo[start:start + 7]
                writer.append(ids, *rows(ids))

    if current_version(uri) is None:
        write("vA", 20)
    writes = 0
    original = LocalStore._set

    async def counted(self, key, value, exclusive=False):
        nonlocal writes
        writes += 1
        if writes == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, key, value, exclusive=exclusive)

    LocalStore._set = counted
    try:
        write("vB", 40)
    finally:
        LocalStore._set = original
    return writes


SCRIPT = "import sys; sys.path.insert(0, 'tests'); import test_crash_consistency as t; " \
         "print(t.write_versions(sys.argv[1], int(sys.argv[2])))"


def _run(uri: str, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, uri, str(kill_at)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def _assert_complete(uri: str) -> str:
    version = current_version(uri)
    assert version in {"vA", "vB"}
    table = read_map_table(uri)
    assert len(table) == {"vA": 20, "vB": 40}[version]
    assert table.attrs["version"] == version and table.attrs["references"] == {"steel": ["ref_1", "ref_2"]}
    assert table.attrs["identity"] == {"encoder": version}
    expected = np.array([int(i.split("_")[1]) for i in table.image_id], dtype=np.float32) / 100.0
    np.testing.assert_allclose(table.image_score, expected, rtol=1e-6)
    np.testing.assert_allclose(table.maps[:, 0, 0].astype(np.float32), expected, rtol=1e-3)
    return version


@pytest.mark.slow
def test_killed_at_every_zarr_write_the_store_recovers(tmp_path):
    reference = str(tmp_path / "reference")
    clean = _run(reference, 0)
    assert clean.returncode == 0, clean.stderr
    total_writes = int(clean.stdout.split()[-1])
    assert total_writes >= 10
    expected = read_map_table(reference)
    outcomes = {"recovered": 0, "broken": 0, "metadata_lost": 0}
    for kill_at in range(1, total_writes + 1):
        uri = str(tmp_path / f"killed_{kill_at}")
        killed = _run(uri, kill_at)
        assert killed.returncode == -9, f"write {kill_at}: {killed.stderr[-500:]}"
        _assert_complete(uri)  # right after the kill: current is a whole version
        write_versions(uri)  # the rerun, in this process
        assert _assert_complete(uri) == "vB"
        table = read_map_table(uri)
        assert sorted(table.image_id.tolist()) == sorted(expected.image_id.tolist())
        order = np.argsort(table.image_id)
        np.testing.assert_array_equal(table.maps[order], expected.maps[np.argsort(expected.image_id)])
        outcomes["recovered"] += 1
    assert outcomes == {"recovered": total_writes, "broken": 0, "metadata_lost": 0}
