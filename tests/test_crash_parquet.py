"""Fault injection on the Parquet artifacts of the boxes stage: SIGKILL the writer at every artifact write
(inside the write, after the new bytes are on disk and before they replace the old file). The previous
artifacts must stay readable and unchanged, and one rerun must give what an uninterrupted run gives."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from agssp_pipeline import artifact_io

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, pandas as pd, yaml
    from agssp_pipeline import artifact_io
    from agssp_pipeline.boxes import stage
    from agssp_pipeline.config import load_config
    from agssp_pipeline.kead.store import MapTable, write_map_table

    root, kill_at, delta = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sources = ["line_a", "line_b"]
    config_path = os.path.join(root, "agssp.yaml")
    if not os.path.exists(config_path):
        os.makedirs(root, exist_ok=True)
        data = {"storage_root": os.path.join(root, "storage"), "sources": [
            {"name": s, "kind": "plant", "format": "image_folder", "root": os.path.join(root, s),
             "category": "steel", "role": "pretrain"} for s in sources]}
        open(config_path, "w").write(yaml.safe_dump(data))
    config = load_config(config_path)
    layout = config.layout()
    rng = np.random.default_rng(0)
    for number, source in enumerate(sources):
        if artifact_io.exists(layout.index(source)):
            continue
        ids = [f"{source}_{i:03d}" for i in range(12)]
        index = pd.DataFrame({"image_id": ids, "path": [f"/x/{i}.png" for i in ids], "source": source,
                              "category": "steel", "width": 64, "height": 64, "duplicate_of": None})
        artifact_io.write_parquet(layout.index(source), index)
        maps = (0.1 + 0.05 * rng.random((12, 8, 8))).astype(np.float32)
        maps[::2, 2:4, 3:6] += 0.8
        write_map_table(layout.maps_store(source), MapTable(
            np.array(ids), maps.astype(np.float16), maps.reshape(12, -1).max(1), np.full(12, np.nan, np.float32),
            {"encoder": "test", "version": f"v{number}"}))

    writes = 0
    original = os.replace
    def replace(src, dst):
        global writes
        if str(dst).endswith(".parquet"):
            writes += 1
            if writes == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(src, dst)
    os.replace = replace

    settings = config.boxes.model_copy(update={"delta": delta})
    stage.write_thresholds(config, stage.compute_thresholds(config, settings))
    for source in sources:
        stage.write_pseudo_boxes(layout, source, stage.compute_pseudo_boxes(config, source, settings))
    print(writes)
    """
)


def _run(root: Path, kill_at: int, delta: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, str(root), str(kill_at), str(delta)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _artifacts(root: Path) -> dict[str, pd.DataFrame]:
    storage = root / "storage"
    paths = [storage / "thresholds.parquet", *sorted((storage / "pseudo_boxes").glob("*.parquet"))]
    return {p.name: artifact_io.read_parquet(p) for p in paths}


@pytest.mark.slow
def test_killed_at_every_parquet_write_old_artifacts_survive_and_one_rerun_converges(tmp_path):
    expected_root = tmp_path / "expected"
    assert _run(expected_root, 0, 0.05).returncode == 0
    expected = _artifacts(expected_root)
    first = _run(tmp_path / "count", 0, 0.1)
    total = int(first.stdout.split()[-1])
    assert total == 3  # thresholds + one pseudo-box table per source
    for kill_at in range(1, total + 1):
        root = tmp_path / f"killed_{kill_at}"
        assert _run(root, 0, 0.1).returncode == 0  # a complete earlier run (another delta)
        before = _artifacts(root)
        killed = _run(root, kill_at, 0.05)
        assert killed.returncode == -9, killed.stderr[-800:]
        after_kill = _artifacts(root)  # every file readable: old or new, never half
        for name, table in after_kill.items():
            assert table.equals(before[name]) or table.equals(expected[name]), (kill_at, name)
        assert after_kill[list(after_kill)[kill_at - 1]].equals(before[list(before)[kill_at - 1]])
        rerun = _run(root, 0, 0.05)
        assert rerun.returncode == 0, rerun.stderr[-800:]
        for name, table in _artifacts(root).items():
            pd.testing.assert_frame_equal(table, expected[name], obj=f"{name} after kill at write {kill_at}")
        leftovers = [p for p in (root / "storage").rglob("*") if artifact_io.PARTIAL_MARK in p.name]
        assert leftovers == [], "the rerun cleans the killed writer's temporary files"
