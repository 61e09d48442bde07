"""Lineage of a backbone checkpoint: which config, code, index files and map store versions made it.

Answering "which anomaly maps fed this checkpoint?" must not need Dagster: the sidecar ``lineage.json``
next to the weights carries the source list with the hash of each index parquet file, each map store's
version id and encoder identity, the threshold table version (when one exists) and the code commit.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import agssp_pipeline
from agssp_pipeline import artifact_io

HASH_CHARS = 16


def stable_hash(payload: Any) -> str:
    """Hash of a JSON-serialisable value, independent of key order."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def file_hash(uri: str) -> str | None:
    """sha256 prefix of a file's bytes (local path or object-store URL); None when the file does not exist."""
    if not artifact_io.is_file(uri):
        return None
    return hashlib.sha256(artifact_io.read_bytes(uri)).hexdigest()[:HASH_CHARS]


def code_version() -> dict[str, Any]:
    """Git commit of the checkout (with a dirty flag) when available, else the package version."""
    repo = Path(agssp_pipeline.__file__).resolve().parents[1]
    info: dict[str, Any] = {
        "package_version": agssp_pipeline.__version__,
        "git_commit": None,
        "git_dirty": None,
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        info["git_commit"] = commit or None
        info["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def map_store_lineage(lookup: Any) -> dict[str, Any]:
    """Version id and encoder identity of a map store (``LazyMaps`` or a test double)."""
    attrs = dict(getattr(lookup, "attrs", {}) or {})
    encoder_keys = ("encoder", "model", "weights", "mode", "prompt_hash")
    if isinstance(attrs.get("encoder_identity"), dict):
        encoder = attrs["encoder_identity"]
    elif isinstance(attrs.get("encoder"), dict):  # EncoderIdentity.as_dict() stored under "encoder"
        encoder = attrs["encoder"]
    else:
        encoder = {k: attrs[k] for k in encoder_keys if k in attrs}
    return {
        "version": str(getattr(lookup, "version", attrs.get("version", ""))),
        "encoder": encoder,
        "maps": int(len(getattr(lookup, "image_ids", []))),
    }


def data_lineage(config, table) -> dict[str, Any]:
    """Per-source index hash, image counts and map store versions for the images of ``table``."""
    from agssp_pipeline.training.data import open_lazy_maps

    layout = config.layout()
    counts = table.rows.groupby("source").size().to_dict()
    sources: dict[str, Any] = {}
    for source in sorted(table.maps):
        lookup = table.maps[source]
        if isinstance(lookup, str):
            lookup = open_lazy_maps(lookup)
        store_uri = getattr(lookup, "store_uri", None)
        index_uri = layout.index(source)
        sources[source] = {
            "index_path": index_uri,
            "index_version": file_hash(index_uri),
            "images_used": int(counts.get(source, 0)),
            "map_store": store_uri or layout.maps_store(source),
            "map_store_version": map_store_lineage(lookup)["version"],
            "encoder": map_store_lineage(lookup)["encoder"],
        }
    thresholds_uri = layout.thresholds()
    return {
        "sources": sources,
        "classes": list(table.classes),
        "skipped": dict(table.skipped),
        "threshold_table_path": thresholds_uri,
        "threshold_table_version": file_hash(thresholds_uri),
    }
