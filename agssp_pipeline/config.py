"""The one pipeline config file (``agssp.yaml``): loading, validation, path resolution.

Errors name the file and the offending field, because the people editing it run plants, not Python.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agssp_pipeline import artifact_io
from agssp_pipeline.boxes.settings import BoxesSettings
from agssp_pipeline.kead.settings import KeadSettings
from agssp_pipeline.training.settings import BackboneSettings, DetectorSettings, FinetuneSettings

CONFIG_ENV_VAR = "AGSSP_CONFIG"
SOURCE_FORMATS = ("image_folder", "voc", "yolo", "coco", "mask_folder", "severstal_rle", "yolo_seg", "labelme",
                  "class_folders", "image_labels_csv", "instance_masks", "pixel_boxes", "split_folders")


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid; the message names file and field."""


class SourceConfig(BaseModel):
    """One image source: a public dataset in its native format or a plant folder."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="slug; the Dagster partition key")
    kind: Literal["public", "plant"] = "public"
    format: Literal["image_folder", "voc", "yolo", "coco", "mask_folder", "severstal_rle", "yolo_seg", "labelme",
                    "class_folders", "image_labels_csv", "instance_masks", "pixel_boxes", "split_folders"]
    root: str
    category: str | None = None
    category_from: Literal["subfolder"] | None = None
    role: Literal["pretrain", "downstream", "both"] = "pretrain"
    # folders (relative to root) whose images are defect-free, e.g. ["MT_Free"]
    normal_subfolders: list[str] = Field(default_factory=list)
    # format-specific settings, e.g. {"images": "IMAGES", "annotations": "ANNOTATIONS"} for voc
    options: dict[str, Any] = Field(default_factory=dict)
    # class names accepted in annotations; empty = accept any
    classes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_category_rule(self) -> SourceConfig:
        if (self.category is None) == (self.category_from is None):
            raise ValueError("give exactly one of 'category' or 'category_from'")
        return self

    @property
    def used_for_pretraining(self) -> bool:
        return self.role in ("pretrain", "both")

    @property
    def used_downstream(self) -> bool:
        return self.role in ("downstream", "both")


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    storage_root: str = "./agssp_data"
    sources: list[SourceConfig] = Field(default_factory=list)
    kead: KeadSettings = Field(default_factory=KeadSettings)
    boxes: BoxesSettings = Field(default_factory=BoxesSettings)
    backbone: BackboneSettings = Field(default_factory=BackboneSettings)
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    # where the file was read from (set by load_config; relative paths resolve against its folder)
    config_path: str | None = Field(default=None, exclude=True)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        seen: set[str] = set()
        for source in sources:
            if source.name in seen:
                raise ValueError(f"duplicate source name '{source.name}'")
            seen.add(source.name)
        return sources

    def source(self, name: str) -> SourceConfig:
        for source in self.sources:
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.sources) or "none"
        raise KeyError(f"unknown source '{name}' (configured: {known})")

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def pretrain_sources(self) -> list[SourceConfig]:
        return [s for s in self.sources if s.used_for_pretraining]

    def downstream_sources(self) -> list[SourceConfig]:
        return [s for s in self.sources if s.used_downstream]

    def layout(self):
        from agssp_pipeline.storage import StorageLayout

        return StorageLayout(self.storage_root)


def _resolve(path: str, base: Path) -> str:
    """An absolute local path (``~``, ``$VARS`` and paths relative to the config file resolved); URLs unchanged."""
    local = artifact_io.local_path(path)
    if local is None:
        return path
    expanded = Path(os.path.expandvars(os.path.expanduser(str(local))))
    return str(expanded if expanded.is_absolute() else (base / expanded).resolve())


def _format_validation_error(error: ValidationError, path: Path) -> str:
    lines = [f"invalid config file {path}:"]
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  field '{field}': {item['msg']}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], base_dir: Path, origin: str = "<dict>") -> PipelineConfig:
    """Validate a config mapping; relative paths resolve against ``base_dir``."""
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, Path(origin))) from None
    config.storage_root = _resolve(config.storage_root, base_dir)
    for source in config.sources:
        source.root = _resolve(source.root, base_dir)
    for field_name in ("prompts_file", "text_cache_dir"):
        if getattr(config.kead, field_name):
            setattr(config.kead, field_name, _resolve(getattr(config.kead, field_name), base_dir))
    # kead.weights may be a pretrained tag: resolve it only when it names a path next to the config
    if config.kead.weights and (base_dir / os.path.expanduser(config.kead.weights)).exists():
        config.kead.weights = _resolve(config.kead.weights, base_dir)
    config.config_path = origin
    return config


def load_config(path: str | os.PathLike[str] | None = None) -> PipelineConfig:
    """Read and validate ``agssp.yaml`` (from ``path`` or the ``AGSSP_CONFIG`` environment variable)."""
    if path is None:
        path = os.environ.get(CONFIG_ENV_VAR)
        if not path:
            raise ConfigError(f"no config file given: pass --config FILE or set {CONFIG_ENV_VAR}")
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {file} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file}: top level must be a mapping, got {type(data).__name__}")
    return parse_config(data, file.parent, str(file))


def dump_config(config: PipelineConfig, path: str | os.PathLike[str]) -> None:
    data = config.model_dump(mode="json", exclude_none=True)
    artifact_io.write_text(path, yaml.safe_dump(data, sort_keys=False))
