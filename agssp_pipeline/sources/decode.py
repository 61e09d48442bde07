"""Decoding an indexed image to the 8-bit pixels every stage sees (maps, references, AGBP, previews).

One decoder so that every stage sees the same pixels:

- high-depth data is scaled by its real range, not by the container's: a 16-bit PNG holding 12-bit
  camera data (values up to 4095) is divided by 16, not by 256 (which would make it near-black). The
  depth is the smallest of 8/10/12/14/16 bits that holds the image's maximum; wider integer data
  (int32 TIFFs) and negative values are min-max scaled;
- float images (32-bit TIFFs) in [0, 1] are multiplied by 255; others are min-max scaled;
- EXIF orientation is never applied: pixels are used as stored, like the index and the annotations
  (the probe quarantines images whose EXIF asks for a rotation, so no stage disagrees about "up");
- grey stays grey for :func:`read_grey`; everything else becomes RGB, alpha dropped.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from agssp_pipeline import artifact_io

STANDARD_BIT_DEPTHS = (8, 10, 12, 14, 16)


def _bytes_of(path: str | os.PathLike[str]) -> np.ndarray:
    local = artifact_io.local_path(path)
    if local is not None:
        return np.fromfile(local, dtype=np.uint8)
    return np.frombuffer(artifact_io.read_bytes(path), dtype=np.uint8)


def data_bit_depth(array: np.ndarray) -> int:
    """Bits the data really uses: the smallest standard depth that holds its maximum."""
    peak = int(array.max()) if array.size else 0
    needed = max(peak, 1).bit_length()
    for depth in STANDARD_BIT_DEPTHS:
        if needed <= depth:
            return depth
    return 32


def to_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit pixels of any decoded array (uint8 unchanged; see the module docstring for the rest)."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(finite.min(initial=0.0)), float(finite.max(initial=0.0))
        if low >= 0.0 and high <= 1.0:
            return np.round(finite * 255.0).astype(np.uint8)
        scale = 255.0 / (high - low) if high > low else 0.0
        return np.round((finite - low) * scale).astype(np.uint8)
    depth = data_bit_depth(array)
    if depth > 16 or (np.issubdtype(array.dtype, np.signedinteger) and array.size and int(array.min()) < 0):
        return to_uint8(array.astype(np.float64))  # no camera depth fits: min-max through the float path
    shift = depth - 8
    return np.right_shift(array.astype(np.uint64), max(shift, 0)).clip(0, 255).astype(np.uint8)


def decode_image(data: np.ndarray | bytes, path: str = "<bytes>", grey: bool = False) -> np.ndarray:
    """HxWx3 RGB uint8 (or HxW grey with ``grey``) from encoded bytes; OSError names the file if undecodable."""
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else data
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
    if image is None:
        raise OSError(f"cannot decode image {path} (missing or undecodable; re-run image_index to quarantine it)")
    image = to_uint8(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if grey:
        if image.ndim == 2:
            return image
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        return cv2.cvtColor(image, code)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """HxWx3 uint8 RGB of an image file (local or object store); OSError when it cannot be decoded."""
    try:
        data = _bytes_of(path)
    except (OSError, FileNotFoundError) as error:
        raise OSError(f"cannot read image {path}: {error}") from error
    return decode_image(data, str(path))


def read_rgb_of(path: str | os.PathLike[str], image_id: str, size: int | None = None,
                mtime: float | None = None) -> np.ndarray:
    """Like :func:`read_rgb`, but only if the file still holds the content indexed as ``image_id``.

    A file replaced in place after indexing would otherwise give its new pixels to the old id's map row.
    As in rsync, the content is hashed only when the file's size or mtime differ from the index's.
    """
    from agssp_pipeline.sources.probe import image_id_of

    try:
        data = _bytes_of(path)
        local = artifact_io.local_path(path)
        stat = local.stat() if local is not None else None
    except (OSError, FileNotFoundError) as error:
        raise OSError(f"cannot read image {path}: {error}") from error
    unchanged = stat is not None and size is not None and mtime is not None and (
        stat.st_size == size and abs(stat.st_mtime - mtime) < 1e-3)
    found = image_id if unchanged else image_id_of(data.tobytes())
    if found != image_id:
        raise OSError(f"{path} changed since it was indexed (content {found}, index {image_id}): "
                      "re-run image_index for its source")
    return decode_image(data, str(path))


def read_grey(path: str | os.PathLike[str]) -> np.ndarray:
    """HxW uint8 grey of an image file; OSError when it cannot be decoded."""
    try:
        data = _bytes_of(path)
    except (OSError, FileNotFoundError) as error:
        raise OSError(f"cannot read image {path}: {error}") from error
    return decode_image(data, str(path), grey=True)


def read_bgr(path: str | os.PathLike[str]) -> np.ndarray:
    """HxWx3 uint8 BGR (what cv2 drawing code expects)."""
    return cv2.cvtColor(read_rgb(path), cv2.COLOR_RGB2BGR)
