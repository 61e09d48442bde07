"""The one artifact I/O module: atomic writes, typed helpers, the same behaviour on a disk and on S3."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from agssp_pipeline import artifact_io
from agssp_pipeline.storage import StorageLayout


def test_join_keeps_url_schemes():
    assert artifact_io.join("s3://bucket/prefix/", "checkpoints", "x") == "s3://bucket/prefix/checkpoints/x"
    assert artifact_io.join("/tmp/root", "a", "b.json") == "/tmp/root/a/b.json"
    assert artifact_io.is_remote("s3://b/k") and not artifact_io.is_remote("file:///tmp/x")
    assert artifact_io.local_path("file:///tmp/x") == artifact_io.local_path("/tmp/x")
    assert artifact_io.local_path("s3://b/k") is None
    assert StorageLayout("s3://b/p").checkpoints("detector", "yolov8n") == "s3://b/p/checkpoints/detector/yolov8n"


def test_crash_during_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "table.parquet"
    artifact_io.write_parquet(target, pd.DataFrame({"a": [1, 2]}))

    def broken_replace(src, dst):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="injected"):
        artifact_io.write_parquet(target, pd.DataFrame({"a": [9, 9, 9]}))
    monkeypatch.undo()
    assert artifact_io.read_parquet(target)["a"].tolist() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_killed_writer_leaves_old_file_and_next_writer_cleans_its_temp(tmp_path):
    target = tmp_path / "thresholds.json"
    artifact_io.write_json(target, {"ok": 1})
    # a writer killed with SIGKILL between writing its temporary and swapping it in
    script = (
        "import os, sys\n"
        "from agssp_pipeline import artifact_io\n"
        "os.replace = lambda a, b: os.kill(os.getpid(), 9)\n"
        f"artifact_io.write_json({str(target)!r}, {{'ok': 2}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if artifact_io.PARTIAL_MARK in p.name]
    assert len(leftovers) == 1
    assert artifact_io.read_json(target) == {"ok": 1}
    artifact_io.write_json(target, {"ok": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thresholds.json"]
    assert artifact_io.read_json(target) == {"ok": 3}


def test_parquet_metadata_round_trip(tmp_path):
    target = tmp_path / "boxes.parquet"
    artifact_io.write_parquet(target, pd.DataFrame({"x": [1.5]}), metadata={"map_version": "v1", "rows": 3})
    assert artifact_io.parquet_metadata(target) == {"map_version": "v1", "rows": "3"}


def test_scratch_and_upload_tree(tmp_path):
    layout = StorageLayout(str(tmp_path / "root"))
    work = layout.scratch("runs", "a")
    (work / "sub").mkdir()
    (work / "sub" / "results.csv").write_text("epoch,map\n1,0.5\n")
    assert work.is_relative_to(tmp_path / "root")
    published = artifact_io.upload_tree(work, layout.path("published"))
    assert published == [str(tmp_path / "root" / "published" / "sub" / "results.csv")]
    assert artifact_io.read_text(published[0]).startswith("epoch")
    remote_scratch = StorageLayout("s3://bucket/prefix").scratch("runs")
    assert not remote_scratch.is_relative_to(tmp_path) and remote_scratch.is_dir()


def test_list_glob_remove_local(tmp_path):
    for name in ("a", "b"):
        artifact_io.write_json(tmp_path / "runs" / name / "lineage.json", {"n": name})
    assert artifact_io.list_dir(tmp_path / "runs", dirs_only=True) == [str(tmp_path / "runs" / "a"),
                                                                        str(tmp_path / "runs" / "b")]
    assert len(artifact_io.glob(str(tmp_path / "runs" / "*" / "lineage.json"))) == 2
    artifact_io.remove(tmp_path / "runs" / "a", recursive=True)
    assert not artifact_io.exists(tmp_path / "runs" / "a")
    assert artifact_io.list_dir(tmp_path / "missing") == []


@pytest.fixture
def s3_env(moto_s3_server, monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_s3_server.endpoint}.items():
        monkeypatch.setenv(key, value)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    yield moto_s3_server
    fsspec.filesystem("s3").clear_instance_cache()


def test_same_behaviour_on_s3(s3_env):
    root = f"s3://{s3_env.bucket}/io-test"
    frame = pd.DataFrame({"image_id": ["a", "b"], "score": [0.1, 0.9]})
    artifact_io.write_parquet(artifact_io.join(root, "t.parquet"), frame, metadata={"k": "v"})
    artifact_io.write_json(artifact_io.join(root, "runs", "r1", "lineage.json"), {"run": 1})
    artifact_io.write_image(artifact_io.join(root, "p.png"), np.zeros((4, 5, 3), np.uint8))
    pd.testing.assert_frame_equal(artifact_io.read_parquet(artifact_io.join(root, "t.parquet")), frame)
    assert artifact_io.parquet_metadata(artifact_io.join(root, "t.parquet")) == {"k": "v"}
    assert artifact_io.read_json(artifact_io.join(root, "runs", "r1", "lineage.json")) == {"run": 1}
    assert artifact_io.read_image(artifact_io.join(root, "p.png")).shape == (4, 5, 3)
    assert artifact_io.list_dir(artifact_io.join(root, "runs"), dirs_only=True) == [f"{root}/runs/r1"]
    assert artifact_io.glob(f"{root}/runs/*/lineage.json") == [f"{root}/runs/r1/lineage.json"]
    assert artifact_io.is_file(artifact_io.join(root, "t.parquet"))
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket)["Contents"]}
    assert keys == {"io-test/t.parquet", "io-test/runs/r1/lineage.json", "io-test/p.png"}
    with artifact_io.local_copy(artifact_io.join(root, "t.parquet")) as path:
        assert path.is_file()
    artifact_io.remove(artifact_io.join(root, "runs"), recursive=True)
    assert not artifact_io.exists(artifact_io.join(root, "runs", "r1", "lineage.json"))
