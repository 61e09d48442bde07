"""Previews a person can read: grid layout without white gaps, captions drawn, ground truth in green and
pseudo boxes in red, JPEGs small enough for Dagster metadata, and each stage's preview built from its tables."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pandas as pd
import pytest
from sources_fixtures import make_masks, make_voc

from agssp_pipeline.boxes.plots import box_preview
from agssp_pipeline.sources import ingest_source
from agssp_pipeline.sources.preview import (
    BACKGROUND_BGR,
    GROUND_TRUTH_BGR,
    LINE_HEIGHT,
    PREDICTION_BGR,
    Tile,
    contact_sheet,
    encode_jpeg,
    jpeg_markdown,
    labelled_grid,
    render_tile,
)


def _decode(data: bytes) -> np.ndarray:
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def _near(image: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> np.ndarray:
    return (np.abs(image.astype(int) - np.array(colour)) <= tolerance).all(axis=-1)


def _grey(height: int, width: int, value: int = 120) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def test_grid_has_rows_of_equal_tiles_and_no_white_gaps():
    tiles = [Tile(_grey(30, 60), ["a.png", "x"]) for _ in range(5)]  # wide images: letterboxed
    image = _decode(labelled_grid(tiles, side=64, columns=3))
    assert image.shape == (2 * (64 + 2 * LINE_HEIGHT), 3 * 64, 3)
    cell = 64 + 2 * LINE_HEIGHT
    pictures = np.vstack([image[:64], image[cell : cell + 64]])  # captions are light text on dark
    assert not _near(pictures, (255, 255, 255), 60).any(), "white gaps in the grid"
    assert _near(pictures[:16, :64], BACKGROUND_BGR, 12).all()  # letterbox band above a wide image: dark
    assert _near(image[cell:, 128:], BACKGROUND_BGR, 12).all()  # the empty sixth cell: dark
    assert labelled_grid([]) is None


def test_caption_text_is_drawn_and_cut_to_the_tile():
    plain = render_tile(Tile(_grey(64, 64)), side=64, caption_lines=2)
    labelled = render_tile(Tile(_grey(64, 64), ["scratch_0001.png", "score 0.812"]), side=64, caption_lines=2)
    assert plain.shape == labelled.shape == (64 + 2 * LINE_HEIGHT, 64, 3)
    assert np.array_equal(plain[:64], labelled[:64])  # the image itself is untouched by its caption
    band = labelled[64:]
    assert (band.max(axis=-1) > 150).sum() > 20, "no caption text in the band"
    assert not np.array_equal(plain, labelled)
    long = render_tile(Tile(_grey(64, 64), ["x" * 200]), side=64, caption_lines=1)
    assert (long[64:, -2:].max(axis=-1) < 100).all(), "a long caption runs past the tile edge"


def test_ground_truth_is_outlined_green_and_pseudo_boxes_red():
    mask = np.zeros((100, 100), bool)
    mask[20:60, 30:70] = True
    tile = Tile(_grey(100, 100), gt_mask=mask, pred_boxes=np.array([[5.0, 70.0, 40.0, 95.0]]),
                gt_boxes=np.array([[60.0, 5.0, 95.0, 15.0]]))
    canvas = render_tile(tile, side=200, caption_lines=0)
    green, red = _near(canvas, GROUND_TRUTH_BGR, 10), _near(canvas, PREDICTION_BGR, 10)
    assert green[40, 60:140].any() and green[40:120, 60].any(), "mask outline (scaled x2) not drawn in green"
    assert not green[60:100, 80:120].any(), "the mask is outlined, not filled"
    assert green[10, 120:190].any(), "ground-truth box not drawn"
    assert red[140, 10:80].any() and not red[40:120, 60:140].any(), "pseudo box not drawn in red where it is"


def test_jpeg_stays_under_the_byte_limit():
    noise = np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
    data = encode_jpeg(noise, max_bytes=150_000)
    assert len(data) <= 150_000 and _decode(data).shape[2] == 3
    markdown = jpeg_markdown(data, "alt", legend="green: truth")
    assert markdown.startswith("![alt](data:image/jpeg;base64,") and markdown.endswith("green: truth")
    assert base64.b64decode(markdown.split(",", 1)[1].split(")", 1)[0]) == data


def test_contact_sheet_labels_images_and_outlines_ground_truth(tmp_path):
    result = ingest_source(make_voc(tmp_path / "voc"))
    sheet = _decode(contact_sheet(result.images, result.annotations, count=4, tile=128, columns=2))
    assert sheet.shape == (2 * (128 + 3 * LINE_HEIGHT), 256, 3)
    unboxed = _decode(contact_sheet(result.images, result.annotations.iloc[0:0], count=4, tile=128, columns=2))
    green = _near(sheet, GROUND_TRUTH_BGR, 45).sum()
    assert green > _near(unboxed, GROUND_TRUTH_BGR, 45).sum() + 100  # VOC boxes in green (noise images)
    masks = ingest_source(make_masks(tmp_path / "masks"))
    no_boxes = masks.annotations.iloc[0:0]  # mask boxes coincide with these rectangular masks: leave them out
    with_masks = _decode(contact_sheet(masks.images, no_boxes, count=8, tile=128, columns=4))
    no_masks = _decode(contact_sheet(masks.images.assign(mask_path=None), no_boxes, count=8, tile=128, columns=4))
    assert _near(with_masks, GROUND_TRUTH_BGR, 45).sum() > _near(no_masks, GROUND_TRUTH_BGR, 45).sum() + 30


def test_box_preview_draws_pseudo_and_ground_truth_boxes(tmp_path):
    path = tmp_path / "img" / "steel_07.png"
    path.parent.mkdir()
    cv2.imwrite(str(path), _grey(60, 80))  # flat grey: any green or red pixel is a drawn outline
    rows = pd.DataFrame({"image_id": ["i1"], "path": [str(path)], "category": ["steel"], "mask_path": [None]})
    boxes = pd.DataFrame({"image_id": ["i1"], "score": [0.91], "x1": [5.0], "y1": [5.0], "x2": [30.0], "y2": [30.0]})
    truth = pd.DataFrame({"path": [str(path)], "class_name": ["scratch"], "x1": [40.0], "y1": [30.0],
                          "x2": [75.0], "y2": [55.0]})
    with_truth = _decode(box_preview(rows, boxes, truth, side=160, columns=4))
    assert with_truth.shape == (160 + 4 * LINE_HEIGHT, 160, 3)
    assert _near(with_truth, PREDICTION_BGR, 45)[:90].sum() > 30
    assert _near(with_truth, GROUND_TRUTH_BGR, 45)[:130].sum() > 30
    without = _decode(box_preview(rows, boxes, None, side=160))
    assert _near(without, GROUND_TRUTH_BGR, 45)[:130].sum() < 5
    missing = rows.assign(path=str(tmp_path / "gone.png"))
    assert box_preview(missing, boxes) is None  # unreadable images are skipped, never an error


@pytest.mark.parametrize("score", [0.123, 0.987])
def test_top_anomalous_tiles_carry_file_score_and_mask(tmp_path, score):
    from assets.kead import anomaly_tile

    result = ingest_source(make_masks(tmp_path / "masks"))
    row = result.images[result.images["path"].str.endswith("c1.jpg")].iloc[0]
    tile = anomaly_tile(row, np.full((4, 4), 0.5, np.float32), score, rank=1)
    assert tile.caption[0] == "c1.jpg" and f"{score:.3f}" in tile.caption[2] and "mask" in tile.caption[3]
    assert tile.gt_mask is not None and tile.gt_mask.any() and tile.heat is not None


def test_asset_descriptions_keep_their_placeholders_visible():
    """Dagster renders descriptions as markdown, where a bare ``<source>`` is an HTML tag and vanishes
    ("Writes evaluations/.parquet"): placeholders must sit in code spans."""
    import re

    import dagster as dg

    from assets import ASSET_MODULES

    texts = {}
    for item in dg.load_assets_from_modules(ASSET_MODULES):
        specs = getattr(item, "specs", None)
        for spec in specs if specs is not None else [item]:
            texts[str(getattr(spec, "key", item))] = getattr(spec, "description", None) or ""
    for check in dg.load_asset_checks_from_modules(ASSET_MODULES):
        for spec in check.check_specs:
            texts[spec.name] = spec.description or ""
    assert any("`index/<source>.parquet`" in text for text in texts.values())
    bare = {key: re.findall(r"<[a-z_]+>", re.sub(r"`[^`]*`", "", text)) for key, text in texts.items()}
    assert not {k: v for k, v in bare.items() if v}, "placeholders outside code spans"
