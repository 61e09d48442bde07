"""One decoder for every stage: high-depth data scaled by its real range, float and int32 TIFFs readable,
EXIF-rotated files quarantined at the probe, masks under the same size guard as images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from agssp_pipeline.config import SourceConfig
from agssp_pipeline.sources import ingest_source, probe_image
from agssp_pipeline.sources.decode import data_bit_depth, read_grey, read_rgb, to_uint8
from agssp_pipeline.sources.regions import read_mask


def test_twelve_bit_data_in_a_sixteen_bit_png_is_not_near_black(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (8, 1))
    path = tmp_path / "camera12.png"
    Image.fromarray(ramp).save(path)
    grey = read_grey(path)
    assert data_bit_depth(ramp) == 12
    assert grey.max() == 255 and grey.min() == 0  # /16, not /256 (which would cap at 15)
    rgb = read_rgb(path)
    assert rgb.shape == (8, 64, 3) and (rgb[..., 0] == grey).all()
    full = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    assert to_uint8(full).max() == 255 and data_bit_depth(full) == 16


@pytest.mark.parametrize("array", [
    np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8),
    np.linspace(-3.0, 700.0, 64, dtype=np.float32).reshape(8, 8),
    np.linspace(0, 100_000, 64).astype(np.int32).reshape(8, 8),
])
def test_float_and_int32_tiffs_decode_to_full_range_8_bit(tmp_path, array):
    path = tmp_path / "deep.tif"
    Image.fromarray(array).save(path)
    probe = probe_image(path)
    assert probe.error is None and probe.conversion
    image = read_rgb(path)
    assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
    assert image.max() >= 250 and image.min() <= 5


def test_exif_rotated_images_are_quarantined_with_the_reason(tmp_path):
    upright = tmp_path / "src" / "upright.jpg"
    upright.parent.mkdir()
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(upright)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "src" / "rotated.jpg", exif=exif.tobytes())
    assert probe_image(upright).error is None
    error = probe_image(tmp_path / "src" / "rotated.jpg").error
    assert error and "EXIF orientation 6" in error and "upright copy" in error
    result = ingest_source(SourceConfig(name="p", kind="plant", format="image_folder",
                                        root=str(tmp_path / "src"), category="steel"))
    assert [p.rsplit("/", 1)[-1] for p in result.images["path"]] == ["upright.jpg"]
    assert result.quarantine["reason"].str.contains("EXIF orientation 6").any()


def test_masks_get_the_image_size_guard(tmp_path, monkeypatch):
    path = tmp_path / "mask.png"
    Image.fromarray(np.full((40, 50), 255, np.uint8)).save(path)
    assert read_mask(str(path)).sum() == 2000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # refused above 2x: 1000 pixels < 2000
    with pytest.raises(ValueError, match="above the image size guard"):
        read_mask(str(path))


def test_undecodable_file_names_itself(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG not really")
    with pytest.raises(OSError, match="broken.png"):
        read_rgb(path)
