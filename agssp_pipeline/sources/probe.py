"""Probing one image file: content hash, size, bands, and proof that it decodes completely.

Plant folders collect whatever the line cameras and operators drop there: empty files, half-copied
JPEGs, PDFs renamed to .jpg, 16-bit TIFFs, CMYK scans. The probe turns each of those into a reason
instead of an exception, reads every byte once (the hash needs them anyway) and decodes JPEGs at 1/8
scale (``draft``), which still walks the whole entropy-coded stream and so still catches truncation.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})

# modes that are more than 8 bits per sample: kept in the index, probed through an 8-bit conversion
HIGH_DEPTH_MODES = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
# bands a loader gets after the usual conversion (cv2.imread / PIL convert("RGB") or "L")
CHANNELS_BY_MODE = {"1": 1, "L": 1, "P": 3, "PA": 4, "LA": 2, "RGB": 3, "RGBA": 4, "RGBX": 3, "CMYK": 3,
                    "YCbCr": 3, "LAB": 3, "HSV": 3}


@dataclass(frozen=True)
class ImageProbe:
    """What ingestion knows about one file; ``error`` set means the file is quarantined."""

    path: str
    bytes: int
    mtime: float
    image_id: str | None = None
    width: int = 0
    height: int = 0
    channels: int = 0
    error: str | None = None
    conversion: str | None = None  # set when the file needs a conversion (16-bit, CMYK) to load as 8-bit


def image_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def jpeg_is_complete(data: bytes) -> bool:
    """True when an end-of-image marker follows the last start-of-scan marker.

    Entropy-coded data escapes 0xFF, so a real SOS/EOI pair cannot appear inside it; an EXIF thumbnail
    sits before the main scan and cannot fake the final EOI. Trailing bytes after EOI are tolerated.
    """
    last_scan = data.rfind(b"\xff\xda")
    return last_scan >= 0 and data.find(b"\xff\xd9", last_scan) >= 0


def to_uint8(image: Image.Image) -> np.ndarray:
    """Min-max scale a high-depth single-band image to uint8 (what the probe decodes for a preview)."""
    array = np.asarray(image, dtype=np.float64)
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip((array - low) * scale, 0, 255).astype(np.uint8)


def source_bit_depth(image: Image.Image) -> int | None:
    """16 when PIL reads a 16-bit-per-sample colour file into an 8-bit mode (rawmode 'RGB;16B' etc.)."""
    for tile in getattr(image, "tile", None) or []:
        args = tile.args if isinstance(tile.args, tuple) else (tile.args,)
        rawmode = args[0] if args and isinstance(args[0], str) else ""
        if ";16" in rawmode:
            return 16
    return None


EXIF_ORIENTATIONS = {2: "mirrored", 3: "rotated 180", 4: "mirrored vertically", 5: "transposed",
                     6: "rotated 90 clockwise", 7: "transversed", 8: "rotated 90 counter-clockwise"}


def exif_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag (1 = as stored) or None when the file has none or it is unreadable."""
    try:
        value = image.getexif().get(0x0112)
    except Exception:  # a malformed EXIF block is not a reason to lose the image
        return None
    return int(value) if isinstance(value, int) else None


def probe_image(path: str | os.PathLike[str]) -> ImageProbe:
    """Hash and fully decode one file; never raises for a bad file (the reason goes in ``error``)."""
    path = str(path)
    try:
        stat = os.stat(path)
        data = Path(path).read_bytes()
    except OSError as error:
        return ImageProbe(path, 0, 0.0, error=f"unreadable file: {error.strerror or error}")
    size, mtime = stat.st_size, stat.st_mtime
    if not data:
        return ImageProbe(path, 0, mtime, error="empty file (0 bytes)")
    image_id = image_id_of(data)
    base = {"path": path, "bytes": size, "mtime": mtime, "image_id": image_id}
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, ImportError):
        # ImportError: ultralytics patches Image.open to load an optional HEIF plugin on unknown bytes
        return ImageProbe(**base, error=f"not an image: no decoder recognises the bytes of this {Path(path).suffix} file")
    except Exception as error:  # PIL raises many types for malformed headers
        return ImageProbe(**base, error=f"unreadable image header: {type(error).__name__}: {error}")
    width, height, mode, fmt = image.width, image.height, image.mode, image.format
    deep_colour = mode not in HIGH_DEPTH_MODES and source_bit_depth(image) == 16  # tile list is gone after load
    if width <= 0 or height <= 0:
        return ImageProbe(**base, error=f"image has no pixels ({width}x{height})")
    orientation = exif_orientation(image)
    if orientation not in (None, 1):
        return ImageProbe(**base, error=(
            f"EXIF orientation {orientation} ({EXIF_ORIENTATIONS.get(orientation, 'unknown')}): viewers rotate this "
            "image but its pixels, annotations and masks are stored unrotated, so stages would disagree about "
            "where a defect is; write an upright copy (e.g. `exiftran -ai` or `mogrify -auto-orient` on a copy) "
            "and index that"))
    if fmt == "JPEG" and not jpeg_is_complete(data):
        return ImageProbe(**base, error="truncated JPEG: no end-of-image marker after the last scan")
    try:
        if fmt == "JPEG":
            image.draft(mode, (max(1, width // 8), max(1, height // 8)))
        image.load()
    except Exception as error:
        return ImageProbe(**base, error=f"undecodable or truncated image: {type(error).__name__}: {error}")
    conversion = None
    channels = CHANNELS_BY_MODE.get(mode)
    try:
        if mode in HIGH_DEPTH_MODES:
            to_uint8(image)
            conversion = f"{HIGH_DEPTH_MODES[mode]}-bit image (mode {mode}) converted to 8-bit for probing"
            channels = 1
        elif deep_colour:
            conversion = f"16-bit {mode} image read as 8-bit for probing"
        elif mode == "CMYK":
            image.convert("RGB")
            conversion = "CMYK image converted to RGB for probing"
        elif channels is None:
            channels = len(image.convert("RGB").getbands())
            conversion = f"mode {mode} converted to RGB for probing"
    except Exception as error:
        return ImageProbe(**base, error=f"image mode {mode} cannot be converted to 8-bit: {error}")
    return ImageProbe(**base, width=width, height=height, channels=channels, conversion=conversion)
