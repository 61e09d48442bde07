"""The whole chain with ``storage_root`` on S3 (a moto server on 127.0.0.1) and on a local folder.

On S3 every artifact must land in the bucket: a writer that turns ``s3://b/x`` into a local ``s3:/b/x``
folder, or keeps a result only in its scratch folder, fails here. With a local root nothing may be
written outside the root: not in the working directory, not beside the corpus (scratch goes under the
root; ``AGSSP_SCRATCH`` points into the test's folder so a stray use of it is seen too).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from agssp_pipeline.config import load_config
from agssp_pipeline.definitions import build_definitions
from agssp_pipeline.demo import generate_demo
from agssp_pipeline.orchestration import materialize_selection, prepare_instance

PREFIX = "chain"
PRETRAIN = ("demo_plant_line1", "demo_rolled_voc", "demo_billet_masks")
DOWNSTREAM = "demo_downstream"


def _demo_config(tmp_path: Path, storage_root: str | None) -> Path:
    """A small demo corpus whose config points at ``storage_root`` (None: the corpus' own storage/)."""
    corpus = generate_demo(tmp_path / "demo", seed=0, scale=0.3)
    data = yaml.safe_load(corpus.config_path.read_text())
    if storage_root is not None:
        data["storage_root"] = storage_root
    data["finetune"]["epochs"] = 1
    corpus.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return corpus.config_path


def _run_chain(config_path: Path) -> None:
    config = load_config(config_path)
    instance = prepare_instance(config, str(config_path))
    report = materialize_selection(build_definitions(str(config_path)), config, instance)
    assert not report.failed, "\n".join(report.summary_lines())


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def _bucket_keys(s3) -> set[str]:
    paginator = s3.client().get_paginator("list_objects_v2")
    keys = set()
    for page in paginator.paginate(Bucket=s3.bucket, Prefix=f"{PREFIX}/"):
        keys.update(item["Key"].removeprefix(f"{PREFIX}/") for item in page.get("Contents", []))
    return keys


def _assert_chain_artifacts(keys: set[str]) -> None:
    """Every artifact kind of a clean chain, as paths relative to the storage root."""
    expected = {
        *(f"index/{s}{suffix}" for s in (*PRETRAIN, DOWNSTREAM)
          for suffix in (".parquet", ".annotations.parquet", ".quarantine.parquet")),
        "thresholds.parquet",
        *(f"pseudo_boxes/{s}.parquet" for s in PRETRAIN),
        "evaluations/kead/demo_billet_masks.parquet",
        "evaluations/box_quality/demo_billet_masks.parquet",
        f"evaluations/finetune/{DOWNSTREAM}.parquet",
        f"evaluations/finetune/{DOWNSTREAM}.per_class.parquet",
        f"evaluations/finetune/{DOWNSTREAM}.md",
        f"splits/{DOWNSTREAM}.parquet",
        f"runs/finetune/{DOWNSTREAM}/full/scratch/weights/last.pt",
        f"runs/finetune/{DOWNSTREAM}/full/agssp/coco/coco_results.json",
    }
    assert expected <= keys, sorted(expected - keys)
    for source in PRETRAIN:
        assert any(k.startswith(f"maps.zarr/{source}/") for k in keys), f"no map store of {source}"
    assert not any(k.startswith(f"maps.zarr/{DOWNSTREAM}/") for k in keys)  # held apart from pretraining
    for kind in ("backbone", "detector"):
        run_files = {Path(k).name for k in keys if k.startswith(f"checkpoints/{kind}/")}
        assert {"model.safetensors", "lineage.json"} <= run_files, (kind, sorted(run_files))


@pytest.mark.slow
def test_whole_chain_on_s3_lands_in_the_bucket(tmp_path, dagster_home, moto_s3_server, monkeypatch):
    import s3fs

    s3 = moto_s3_server
    for name, value in {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AGSSP_SCRATCH", str(tmp_path / "scratch"))
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made before the endpoint was set would miss moto
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config_path = _demo_config(tmp_path, f"s3://{s3.bucket}/{PREFIX}")
    try:
        _run_chain(config_path)
        _assert_chain_artifacts(_bucket_keys(s3))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    demo = config_path.parent
    assert not (demo / "storage").exists() or not _files_under(demo / "storage")
    assert not any(part.startswith("s3:") for f in _files_under(tmp_path) for part in Path(f).parts)
    assert not _files_under(cwd)


@pytest.mark.slow
def test_whole_chain_on_a_local_root_writes_nothing_outside_it(tmp_path, dagster_home, monkeypatch):
    monkeypatch.setenv("AGSSP_SCRATCH", str(tmp_path / "scratch"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config_path = _demo_config(tmp_path, None)
    demo = config_path.parent
    root = Path(load_config(config_path).storage_root)
    assert root.is_relative_to(demo)
    corpus_before = {f for f in _files_under(demo) if not (demo / f).is_relative_to(root)}
    outside_before = _files_under(tmp_path) - {str(Path("demo") / f) for f in _files_under(demo)}

    _run_chain(config_path)

    _assert_chain_artifacts(_files_under(root))
    corpus_after = {f for f in _files_under(demo) if not (demo / f).is_relative_to(root)}
    assert corpus_after == corpus_before, sorted(corpus_after - corpus_before)
    outside_after = _files_under(tmp_path) - {str(Path("demo") / f) for f in _files_under(demo)}
    new_outside = {f for f in outside_after - outside_before if not f.startswith("dagster_home" + os.sep)}
    assert not new_outside, sorted(new_outside)
    assert not _files_under(cwd)
