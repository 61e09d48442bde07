"""Resources shared by every asset: the pipeline config file and the storage it names."""

from __future__ import annotations

import os

import dagster as dg
from pydantic import PrivateAttr

from agssp_pipeline.config import CONFIG_ENV_VAR, PipelineConfig, load_config
from agssp_pipeline.storage import StorageLayout

DEFAULT_CONFIG_PATH = "agssp_demo/agssp.yaml"


class PipelineConfigResource(dg.ConfigurableResource):
    """The validated ``agssp.yaml``; one file drives every asset of a deployment."""

    config_path: str

    _config: PipelineConfig | None = PrivateAttr(default=None)

    def load(self) -> PipelineConfig:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def layout(self) -> StorageLayout:
        return self.load().layout()


def default_config_path() -> str:
    return os.environ.get(CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH)
