"""Multi-source image ingestion: native dataset layouts -> one image index per source.

``ingest_source(source, known_hashes)`` returns an ``IngestResult`` (images, annotations, quarantine)
whose ``write(layout, name)`` stores ``index/<name>.parquet`` and its two companions. Formats are
adapters in ``FORMAT_ADAPTERS`` (see ``formats.py`` for their options). No Dagster here.
"""

from agssp_pipeline.sources.fingerprint import (
    FolderSnapshot,
    folder_fingerprint,
    folder_snapshot,
    source_fingerprint,
    source_snapshot,
)
from agssp_pipeline.sources.formats import FORMAT_ADAPTERS
from agssp_pipeline.sources.ingest import (
    IngestResult,
    ProbeCache,
    ingest_source,
    known_hashes_from,
    previous_probe_cache,
    require_source_root,
)
from agssp_pipeline.sources.probe import ImageProbe, probe_image
from agssp_pipeline.sources.schema import ANNOTATION_SCHEMA, INDEX_SCHEMA, QUARANTINE_SCHEMA

__all__ = [
    "ANNOTATION_SCHEMA",
    "FORMAT_ADAPTERS",
    "FolderSnapshot",
    "INDEX_SCHEMA",
    "QUARANTINE_SCHEMA",
    "ImageProbe",
    "IngestResult",
    "ProbeCache",
    "folder_fingerprint",
    "folder_snapshot",
    "ingest_source",
    "known_hashes_from",
    "previous_probe_cache",
    "probe_image",
    "require_source_root",
    "source_fingerprint",
    "source_snapshot",
]
