"""The config file: validation errors that name file and field, path resolution, source lookups."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agssp_pipeline.config import ConfigError, load_config
from agssp_pipeline.storage import StorageLayout


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "agssp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_config_resolves_relative_paths(tmp_path):
    path = write(tmp_path, {
        "storage_root": "store",
        "sources": [{"name": "line_1", "kind": "plant", "format": "image_folder", "root": "imgs", "category": "steel"}],
    })
    config = load_config(path)
    assert config.storage_root == str((tmp_path / "store").resolve())
    assert config.source("line_1").root == str((tmp_path / "imgs").resolve())
    assert config.source("line_1").role == "pretrain"
    assert config.layout().index("line_1").endswith("store/index/line_1.parquet")


def test_s3_storage_root_is_left_alone(tmp_path):
    config = load_config(write(tmp_path, {"storage_root": "s3://bucket/agssp", "sources": []}))
    assert config.storage_root == "s3://bucket/agssp"
    assert not StorageLayout(config.storage_root).is_local
    assert config.layout().maps_store("a") == "s3://bucket/agssp/maps.zarr/a"


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"name": "Bad Name", "format": "voc", "root": "x", "category": "c"}, "sources.0.name"),
        ({"name": "ok", "format": "tiff_stack", "root": "x", "category": "c"}, "sources.0.format"),
        ({"name": "ok", "format": "voc", "root": "x"}, "sources.0"),
        ({"name": "ok", "format": "voc", "root": "x", "category": "c", "rol": "pretrain"}, "sources.0.rol"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path, source, field):
    path = write(tmp_path, {"sources": [source]})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert f"field '{field}'" in message


def test_duplicate_source_names_rejected(tmp_path):
    src = {"name": "a", "format": "voc", "root": "x", "category": "c"}
    with pytest.raises(ConfigError, match="duplicate source name 'a'"):
        load_config(write(tmp_path, {"sources": [src, src]}))


def test_missing_and_unreadable_files(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    monkeypatch.delenv("AGSSP_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="AGSSP_CONFIG"):
        load_config(None)


def test_env_var_and_role_helpers(tmp_path, monkeypatch):
    path = write(tmp_path, {"sources": [
        {"name": "pre", "format": "voc", "root": "a", "category": "c", "role": "pretrain"},
        {"name": "down", "format": "yolo", "root": "b", "category": "c", "role": "downstream"},
        {"name": "both", "format": "coco", "root": "c", "category_from": "subfolder", "role": "both"},
    ]})
    monkeypatch.setenv("AGSSP_CONFIG", str(path))
    config = load_config()
    assert [s.name for s in config.pretrain_sources()] == ["pre", "both"]
    assert [s.name for s in config.downstream_sources()] == ["down", "both"]
    with pytest.raises(KeyError, match="unknown source 'zzz'"):
        config.source("zzz")


def test_static_problems_name_the_field_and_pass_a_sound_config(tmp_path):
    from agssp_pipeline.config import static_problems

    sound = load_config(write(tmp_path, {"sources": [
        {"name": "a", "format": "voc", "root": "x", "category": "c"}]}))
    assert [p for p in static_problems(sound) if p.severity == "error"] == []
    path = write(tmp_path, {
        "sources": [{"name": "a", "format": "voc", "root": "x", "category": "c", "options": {"imags": "I"}}],
        "backbone": {"backbones": ["yolov8n", "swinb"]}, "detector": {"backbone": "resnet50", "model": "yolov9z"},
        "finetune": {"image_size": 641},
    })
    problems = {p.field: p for p in static_problems(load_config(path))}
    assert "swin_b" in problems["backbone.backbones.1"].message
    assert problems["detector.backbone"].severity == "warning"  # registered, but no run trains it
    assert "unknown detector model 'yolov9z'" in problems["detector.model"].message
    assert "use 640" in problems["finetune.image_size"].message
    assert "unknown option(s) ['imags']" in problems["sources.0.options"].message
    assert list(problems.values())[-1].severity == "warning"  # errors first
