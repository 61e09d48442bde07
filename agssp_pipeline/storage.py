"""Where every artifact lives under ``storage_root`` (the contract other stages and checks rely on)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agssp_pipeline import artifact_io


@dataclass(frozen=True)
class StorageLayout:
    """Paths of the pipeline's artifacts; ``root`` is a local folder or an fsspec URL (s3://...)."""

    root: str

    @property
    def is_local(self) -> bool:
        return not artifact_io.is_remote(self.root)

    def path(self, *parts: str) -> str:
        return artifact_io.join(self.root, *parts)

    def ensure_dir(self, *parts: str) -> str:
        return artifact_io.makedirs(self.path(*parts))

    def scratch(self, *parts: str) -> Path:
        """A local working folder for tools that need one (never an artifact's home on object storage).

        Under ``<root>/scratch/`` for a local root, under ``$AGSSP_SCRATCH`` (default: the system temp folder)
        for an object store. Finetune datasets and ultralytics run folders live here; the files that are
        artifacts (evaluation tables, markdown, kept plots and results.csv, COCO results) are published to
        ``evaluations/`` and ``runs/`` under the root.
        """
        return artifact_io.scratch_dir(self.root, *parts)

    # ingestion
    def index(self, source: str) -> str:
        return self.path("index", f"{source}.parquet")

    def annotations(self, source: str) -> str:
        return self.path("index", f"{source}.annotations.parquet")

    def quarantine(self, source: str) -> str:
        return self.path("index", f"{source}.quarantine.parquet")

    def derived_masks(self, source: str) -> str:
        """Masks ingestion draws from polygons / RLE / instance masks (the user's folders stay untouched)."""
        return self.path("index", "masks", source)

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

    def export_dir(self, *parts: str) -> Path:
        """The local folder of a training export (YOLO labels + symlinked images, COCO JSON, data.yaml).

        Local root: ``<root>/exports/...``, kept where it always was (users point other tools at it).
        Object-store root: ``scratch("exports", ...)``, a local cache that is never an artifact: exports are
        rebuilt from the Parquet tables, and what a training run produces is published through ``artifact_io``.
        """
        local = artifact_io.local_path(self.exports(*parts))
        if local is None:
            return self.scratch("exports", *parts)
        local.mkdir(parents=True, exist_ok=True)
        return local

    # training and evaluation
    def checkpoints(self, kind: str, name: str, *parts: str) -> str:
        return self.path("checkpoints", kind, name, *parts)

    def evaluations(self, kind: str, name: str, suffix: str = ".parquet") -> str:
        """``evaluations/<kind>/<name><suffix>``: each evaluation kind in its own folder.

        Kinds: ``finetune`` (per downstream dataset), ``kead`` and ``box_quality`` (per source).
        """
        return self.path("evaluations", kind, f"{name}{suffix}")

    def previews(self, *parts: str) -> str:
        return self.path("previews", *parts)
