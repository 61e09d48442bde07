"""Where every artifact lives under ``storage_root`` (the contract other stages and checks rely on)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StorageLayout:
    """Paths of the pipeline's artifacts; ``root`` is a local folder or an fsspec URL (s3://...)."""

    root: str

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def path(self, *parts: str) -> str:
        root = self.root.rstrip("/")
        return "/".join([root, *parts])

    def ensure_dir(self, *parts: str) -> str:
        target = self.path(*parts)
        if self.is_local:
            Path(target).mkdir(parents=True, exist_ok=True)
        return target

    # ingestion
    def index(self, source: str) -> str:
        return self.path("index", f"{source}.parquet")

    def annotations(self, source: str) -> str:
        return self.path("index", f"{source}.annotations.parquet")

    def quarantine(self, source: str) -> str:
        return self.path("index", f"{source}.quarantine.parquet")

    # KeAD
    def maps_root(self) -> str:
        return self.path("maps.zarr")

    def maps_store(self, source: str) -> str:
        return self.path("maps.zarr", source)

    # thresholds and boxes
    def thresholds(self) -> str:
        return self.path("thresholds.parquet")

    def pseudo_boxes(self, source: str) -> str:
        return self.path("pseudo_boxes", f"{source}.parquet")

    def exports(self, *parts: str) -> str:
        return self.path("exports", *parts)

    # training and evaluation
    def checkpoints(self, kind: str, name: str, *parts: str) -> str:
        return self.path("checkpoints", kind, name, *parts)

    def evaluations(self, name: str) -> str:
        return self.path("evaluations", f"{name}.parquet")

    def previews(self, *parts: str) -> str:
        return self.path("previews", *parts)
