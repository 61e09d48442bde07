"""Column contracts of the three ingestion tables and their Parquet schemas.

Every stage downstream reads these files, so the column names and types live in one place and the
writer casts to them explicitly: a table that round-trips through Parquet looks the same as the one
returned in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # first 16 hex digits of sha256(bytes); NOT unique when duplicates exist
        ("path", pa.string()),  # absolute path of the image file
        ("source", pa.string()),
        ("category", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("channels", pa.int32()),  # bands after the probe conversion (CMYK -> 3, 16-bit grey -> 1)
        ("bytes", pa.int64()),
        ("mtime", pa.float64()),
        ("split", pa.string()),  # null when the dataset does not say
        ("mask_path", pa.string()),  # null when no usable pixel mask
        ("is_normal", pa.bool_()),  # True defect-free, False defective, null unknown
        ("duplicate_of", pa.string()),  # image_id of the first copy (same bytes); null for first copies
    ]
)

ANNOTATION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),  # the image file the box belongs to (disambiguates duplicate image_ids)
        ("class_name", pa.string()),
        ("x1", pa.float64()),  # pixels, x1 < x2 and y1 < y2, inside [0, width] x [0, height]
        ("y1", pa.float64()),
        ("x2", pa.float64()),
        ("y2", pa.float64()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the offending file (image, annotation file or mask)
        ("kind", pa.string()),  # image | annotation | mask
        ("action", pa.string()),  # quarantined | clipped | converted | flagged
        ("reason", pa.string()),
    ]
)

# what each action means for consumers
ACTION_QUARANTINED = "quarantined"  # left out of the index / annotations
ACTION_CLIPPED = "clipped"  # box kept after clipping to the image
ACTION_CONVERTED = "converted"  # image kept; loaders must convert (16-bit, CMYK); the file is untouched
ACTION_FLAGGED = "flagged"  # kept, but worth a look (duplicate, empty mask in a defect folder, ...)

KIND_IMAGE = "image"
KIND_ANNOTATION = "annotation"
KIND_MASK = "mask"


@dataclass(frozen=True)
class QuarantineRow:
    path: str
    kind: str
    action: str
    reason: str


def frame(rows: list[dict] | dict[str, list], schema: pa.Schema) -> pd.DataFrame:
    """A DataFrame with exactly the dtypes a reader of the Parquet file gets back."""
    if isinstance(rows, dict):
        table = pa.Table.from_pydict(rows, schema=schema)
    else:
        table = pa.Table.from_pylist(rows, schema=schema)
    return table.to_pandas()


def to_table(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    missing = [name for name in schema.names if name not in df.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}")
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    return table.replace_schema_metadata(None)  # no pandas/version blob: identical bytes across envs
