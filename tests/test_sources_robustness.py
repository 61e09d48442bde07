"""Bad files never crash ingestion, nothing is modified, and outputs are deterministic."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import pytest
from sources_fixtures import make_voc, write_image

from agssp_pipeline.artifact_io import read_parquet
from agssp_pipeline.config import SourceConfig
from agssp_pipeline.sources import (
    folder_fingerprint,
    ingest_source,
    known_hashes_from,
    probe_image,
)
from agssp_pipeline.storage import StorageLayout


def plant_folder(root: Path) -> SourceConfig:
    write_image(root / "good.jpg", size=(160, 120), seed=1)
    data = (root / "good.jpg").read_bytes()
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(data[: int(len(data) * 0.8)])  # cut inside the scan data
    (root / "header_only.jpg").write_bytes(data[:300])
    (root / "pdf.jpg").write_bytes(b"%PDF-1.4\n" + b"x" * 200)
    write_image(root / "png_truncated.png", seed=2, fmt="PNG")
    png = (root / "png_truncated.png").read_bytes()
    (root / "png_truncated.png").write_bytes(png[: len(png) - 200])
    write_image(root / "deep.png", seed=3, mode="I;16", fmt="PNG")
    write_image(root / "cmyk.jpg", seed=4, mode="CMYK")
    write_image(root / "grey.tif", seed=5, mode="L", fmt="TIFF")
    (root / ".hidden.jpg").write_bytes(b"")  # hidden files are skipped silently
    return SourceConfig(name="line1", kind="plant", format="image_folder", root=str(root), category="brushed_steel")


def test_probe_reasons_for_each_bad_file(tmp_path):
    plant_folder(tmp_path)
    expected = {
        "zero.jpg": "empty file",
        "truncated.jpg": "truncated JPEG",
        "header_only.jpg": "runcated",
        "pdf.jpg": "not an image",
        "png_truncated.png": "truncated",
    }
    for name, fragment in expected.items():
        probe = probe_image(tmp_path / name)
        assert probe.error is not None and fragment in probe.error, (name, probe.error)
    deep = probe_image(tmp_path / "deep.png")
    assert deep.error is None and "16-bit" in deep.conversion and deep.channels == 1
    cmyk = probe_image(tmp_path / "cmyk.jpg")
    assert cmyk.error is None and "CMYK" in cmyk.conversion and cmyk.channels == 3
    assert probe_image(tmp_path / "grey.tif").channels == 1
    import cv2
    import numpy as np

    cv2.imwrite(str(tmp_path / "rgb16.png"), np.full((8, 9, 3), 40000, dtype=np.uint16))
    deep_rgb = probe_image(tmp_path / "rgb16.png")
    assert deep_rgb.error is None and deep_rgb.channels == 3 and "16-bit RGB" in deep_rgb.conversion
    assert probe_image(tmp_path / "good.jpg").conversion is None


def test_truncated_jpeg_detected_even_when_pil_is_lenient(tmp_path, monkeypatch):
    from PIL import ImageFile

    plant_folder(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert "truncated JPEG" in probe_image(tmp_path / "truncated.jpg").error


def test_bad_plant_folder_ingests_with_quarantine_and_touches_nothing(tmp_path):
    source = plant_folder(tmp_path)
    before = {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in tmp_path.rglob("*")}
    result = ingest_source(source, workers=3)
    after = {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in tmp_path.rglob("*")}
    assert before == after
    names = sorted(Path(p).name for p in result.images.path)
    assert names == ["cmyk.jpg", "deep.png", "good.jpg", "grey.tif"]
    q = result.quarantine
    quarantined = sorted(Path(p).name for p in q.loc[q.action == "quarantined", "path"])
    assert quarantined == ["header_only.jpg", "pdf.jpg", "png_truncated.png", "truncated.jpg", "zero.jpg"]
    assert sorted(Path(p).name for p in q.loc[q.action == "converted", "path"]) == ["cmyk.jpg", "deep.png"]
    assert result.counts()["quarantined_images"] == 5


def test_reingest_writes_byte_identical_parquet(tmp_path):
    source = make_voc(tmp_path / "data")
    layout = StorageLayout(str(tmp_path / "store"))
    paths = ingest_source(source).write(layout, source.name)
    first = {key: Path(p).read_bytes() for key, p in paths.items()}
    second_result = ingest_source(source, workers=1)
    second_result.write(layout, source.name)
    assert {key: Path(p).read_bytes() for key, p in paths.items()} == first
    assert second_result.content_hash() == ingest_source(source).content_hash()
    assert not list((tmp_path / "store" / "index").glob("*.tmp-*"))
    index = read_parquet(paths["index"])
    pd.testing.assert_frame_equal(index, second_result.images)
    assert list(read_parquet(paths["quarantine"]).columns) == ["path", "kind", "action", "reason"]
    assert list(read_parquet(paths["annotations"]).columns) == ["image_id", "path", "class_name", "x1", "y1", "x2", "y2"]


def test_cross_source_duplicates_via_known_hashes(tmp_path):
    write_image(tmp_path / "a" / "x.jpg", seed=7)
    write_image(tmp_path / "a" / "y.jpg", seed=8)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x_again.jpg").write_bytes((tmp_path / "a" / "x.jpg").read_bytes())
    write_image(tmp_path / "b" / "z.jpg", seed=9)
    first = SourceConfig(name="first", format="image_folder", root=str(tmp_path / "a"), category="c")
    second = SourceConfig(name="second", format="image_folder", root=str(tmp_path / "b"), category="c")
    layout = StorageLayout(str(tmp_path / "store"))
    ingest_source(first).write(layout, "first")
    known = known_hashes_from(layout, ["first", "not_yet_ingested"])
    assert len(known) == 2 and set(known.values()) == {"first"}
    result = ingest_source(second, known)
    images = result.images.set_index(result.images.path.map(lambda p: Path(p).name))
    assert images.loc["x_again.jpg", "duplicate_of"] == images.loc["x_again.jpg", "image_id"]
    assert pd.isna(images.loc["z.jpg", "duplicate_of"])
    assert "of source 'first'" in " ".join(result.quarantine.reason)
    # an index never flags its own images as cross-source duplicates
    assert ingest_source(first, known).counts()["duplicates"] == 0


def test_folder_fingerprint_tracks_listing_sizes_and_mtimes(tmp_path):
    write_image(tmp_path / "sub" / "a.jpg", seed=1)
    fingerprint = folder_fingerprint(tmp_path)
    assert folder_fingerprint(tmp_path) == fingerprint
    write_image(tmp_path / "sub" / "b.jpg", seed=2)
    added = folder_fingerprint(tmp_path)
    assert added != fingerprint
    stat = (tmp_path / "sub" / "b.jpg").stat()
    os.utime(tmp_path / "sub" / "b.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert folder_fingerprint(tmp_path) != added
    with pytest.raises(FileNotFoundError):
        folder_fingerprint(tmp_path / "missing")


def test_write_and_read_through_fsspec_urls(tmp_path):
    """storage_root may be s3://...; the memory filesystem stands in for it here."""
    import fsspec

    source = make_voc(tmp_path / "data")
    layout = StorageLayout(f"memory://agssp-test-{os.getpid()}")
    result = ingest_source(source)
    paths = result.write(layout, source.name)
    assert all(p.startswith("memory://") for p in paths.values())
    pd.testing.assert_frame_equal(read_parquet(paths["index"]), result.images)
    assert known_hashes_from(layout, [source.name]) == {i: source.name for i in result.images.image_id}
    fsspec.filesystem("memory").rm(layout.root, recursive=True)


def test_contact_sheet_is_a_small_jpeg_grid(tmp_path):
    import cv2
    import numpy as np

    from agssp_pipeline.sources.preview import contact_sheet

    result = ingest_source(make_voc(tmp_path))
    sheet = contact_sheet(result.images, result.annotations, count=6, tile=32, columns=3)
    image = cv2.imdecode(np.frombuffer(sheet, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (2 * (32 + 3 * 15), 96, 3) and sheet[:2] == b"\xff\xd8"  # 3 caption lines per tile
    assert contact_sheet(result.images.iloc[0:0], result.annotations) is None


def test_probe_cache_reuses_unchanged_files_with_identical_output(tmp_path):
    from agssp_pipeline.sources import ProbeCache, previous_probe_cache

    source = plant_folder(tmp_path / "line")
    layout = StorageLayout(str(tmp_path / "store"))
    ingest_source(source).write(layout, source.name)
    write_image(tmp_path / "line" / "new.jpg", seed=77)
    stat = (tmp_path / "line" / "grey.tif").stat()
    os.utime(tmp_path / "line" / "grey.tif", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    cache = previous_probe_cache(layout, source.name)
    assert isinstance(cache, ProbeCache) and len(cache) == 4
    cached, fresh = ingest_source(source, cache=cache), ingest_source(source)
    assert cache.hits == 3  # good.jpg, deep.png, cmyk.jpg; grey.tif was touched, new.jpg is new
    assert cached.content_hash() == fresh.content_hash()
    assert "converted" in set(cached.quarantine.action)  # conversions of reused probes are kept
    assert previous_probe_cache(layout, "never_ingested") is None
