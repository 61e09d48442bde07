"""The one pipeline config file (``agssp.yaml``): loading, validation, path resolution.

Errors name the file and the offending field, because the people editing it run plants, not Python.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
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


class SelectionError(KeyError):
    """An asset selection or source name (``--select``, ``--partition``) that matches nothing; the message
    names the closest ones. A KeyError, like a failed ``config.source`` lookup."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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


# ---------------------------------------------------------------------------------------------------------------
# Static checks: what ``agssp validate`` can know without running anything (names, sizes, devices, paths)

STRIDE = 32  # YOLOv8's largest stride: ultralytics silently rounds other sizes up, so the config would lie


@dataclass(frozen=True)
class ConfigProblem:
    """One problem of a loaded config; ``warning``s may still run (e.g. CUDA absent on this machine only)."""

    field: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"field '{self.field}': {self.message}"


def _unknown(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown {kind} '{name}' (registered: {', '.join(sorted(known))}){hint}"


def _registry_problems(config: PipelineConfig) -> list[ConfigProblem]:
    """Encoder, backbone and detector names against the registries that build them."""
    from agssp_pipeline.kead.encoders import ENCODERS
    from agssp_pipeline.training.backbones import BACKBONES
    from agssp_pipeline.training.detector import YOLO_MODEL_CONFIGS

    problems = []
    if config.kead.encoder not in ENCODERS:
        problems.append(ConfigProblem("kead.encoder", _unknown("encoder", config.kead.encoder, list(ENCODERS))))
    for i, name in enumerate(config.backbone.backbones):
        if name not in BACKBONES:
            problems.append(ConfigProblem(f"backbone.backbones.{i}", _unknown("backbone", name, list(BACKBONES))))
    if config.detector.backbone not in BACKBONES:
        problems.append(ConfigProblem("detector.backbone",
                                      _unknown("backbone", config.detector.backbone, list(BACKBONES))))
    elif config.detector.backbone not in config.backbone.backbones:
        problems.append(ConfigProblem("detector.backbone", f"'{config.detector.backbone}' is not in "
                                      "backbone.backbones: no run trains it, so the detector needs an earlier "
                                      "checkpoint of it", "warning"))
    model = config.detector.model
    if model not in YOLO_MODEL_CONFIGS and not (model.endswith((".yaml", ".yml")) and Path(model).is_file()):
        problems.append(ConfigProblem("detector.model", _unknown("detector model", model, list(YOLO_MODEL_CONFIGS))
                                      + " or a local .yaml file"))
    return problems


def _device_problems(config: PipelineConfig) -> list[ConfigProblem]:
    """``cuda`` on a machine without CUDA is a warning: the config may be meant for another machine."""
    sections = {"kead": config.kead, "backbone": config.backbone, "detector": config.detector,
                "finetune": config.finetune}
    wanted = {name: str(section.device) for name, section in sections.items() if str(section.device) != "auto"}
    if not any(device.startswith("cuda") for device in wanted.values()):
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return [ConfigProblem(f"{name}.device", f"'{device}' but CUDA is not available on this machine "
                          "(use 'auto' to fall back to the CPU)", "warning")
            for name, device in wanted.items() if device.startswith("cuda")]


def _size_problems(config: PipelineConfig) -> list[ConfigProblem]:
    return [ConfigProblem(f"{name}.image_size", f"{size} is not a multiple of {STRIDE} (the detector's stride); "
                          f"use {max(STRIDE, round(size / STRIDE) * STRIDE)}")
            for name, size in (("detector", config.detector.image_size), ("finetune", config.finetune.image_size))
            if size % STRIDE]


def _path_problems(config: PipelineConfig) -> list[ConfigProblem]:
    """A storage root that is a file (every artifact write would fail); source roots are the adapters' call."""
    root = artifact_io.local_path(config.storage_root)
    if root is not None and root.exists() and not root.is_dir():
        return [ConfigProblem("storage_root", f"{root} is a file, not a folder")]
    return []


def _source_option_problems(config: PipelineConfig) -> list[ConfigProblem]:
    from agssp_pipeline.sources.formats import check_options

    problems = []
    for i, source in enumerate(config.sources):
        try:
            check_options(source)
        except ValueError as error:
            problems.append(ConfigProblem(f"sources.{i}.options", str(error)))
    return problems


def static_problems(config: PipelineConfig) -> list[ConfigProblem]:
    """Everything wrong with ``config`` that can be known before a run, errors first."""
    problems = (_registry_problems(config) + _size_problems(config) + _path_problems(config)
                + _source_option_problems(config) + _device_problems(config))
    return sorted(problems, key=lambda p: p.severity != "error")
