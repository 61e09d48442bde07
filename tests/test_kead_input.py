"""Aspect-preserving input for the CNN few-shot encoder (``kead.input: aspect``, issue 12 item 2a).

Squashing a 500x1260 tile to a square stretches every defect 2.5x along one axis; aspect input resizes
keeping the ratio, scores on that undistorted grid and averages the map down to the store's square grid.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from agssp_pipeline.kead.cnn_encoder import CnnFewShotEncoder, aspect_shape
from agssp_pipeline.kead.encoders import build_encoder
from agssp_pipeline.kead.maps import batch_images
from agssp_pipeline.kead.runner import by_input_shape, compute_anomaly_maps, store_version_for
from agssp_pipeline.kead.settings import KeadSettings
from agssp_pipeline.kead.store import read_map_table

SIZE = 64  # short side: an 8x8 store grid, cheap on CPU


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """Isotropic blurred-noise texture (grey, as RGB uint8): normal everywhere, the same in any crop."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 1.5)
    image = np.clip(128 + 22 * noise, 0, 255).astype(np.uint8)
    return np.repeat(image[:, :, None], 3, axis=2)


def with_square(image: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    out = image.copy()
    out[top : top + side, left : left + side] = (out[top : top + side, left : left + side] * 0.3).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def aspect_encoder() -> CnnFewShotEncoder:
    return CnnFewShotEncoder(image_size=SIZE, input="aspect")


def test_aspect_shape_keeps_the_ratio_rounds_and_caps():
    assert aspect_shape(500, 1260, 320, 32, 4.0) == (320, 800)  # 806 rounded to a multiple of 32
    assert aspect_shape(1260, 500, 320, 32, 4.0) == (800, 320)  # tall: the same, transposed
    assert aspect_shape(200, 200, 320, 32, 4.0) == (320, 320)
    assert aspect_shape(100, 2000, 320, 32, 4.0) == (320, 1280)  # 1:20 strip capped at 4x
    assert aspect_shape(300, 310, 320, 32, 4.0) == (320, 320)  # never shorter than the short side


def test_aspect_input_scales_both_axes_alike(aspect_encoder):
    """The resized input is the image at one scale (no stretch), unlike squash."""
    wide = texture(128, 512, seed=0)
    tensor = aspect_encoder.preprocess(wide)
    assert tuple(tensor.shape) == (3, SIZE, 4 * SIZE)
    expected = cv2.resize(wide, (4 * SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    torch.testing.assert_close(tensor.permute(1, 2, 0), torch.from_numpy((expected - 0.5) / 0.5))
    squash = CnnFewShotEncoder(image_size=SIZE, input="squash")
    assert tuple(squash.preprocess(wide).shape) == (3, SIZE, SIZE)


def test_wide_and_tall_maps_have_the_store_grid_and_find_a_square_defect(aspect_encoder):
    """A square defect in a wide (and a tall) image is found by aspect input at its place on the store grid."""
    references = [texture(96, 288, seed=s) for s in (1, 2, 3)] + [texture(288, 96, seed=4)]
    aspect_encoder.set_references("tile", [aspect_encoder.preprocess(i) for i in references])
    wide = with_square(texture(96, 288, seed=10), top=36, left=200, side=24)  # centre (48, 212) of 96x288
    tall = with_square(texture(288, 96, seed=11), top=40, left=36, side=24)  # centre (52, 48) of 288x96
    clean = texture(96, 288, seed=12)
    result = aspect_encoder.score([aspect_encoder.preprocess(i) for i in (wide, tall, clean)], "tile")
    grid = aspect_encoder.grid_size
    assert result.maps.shape == (3, grid, grid)
    for number, (image, (cy, cx)) in enumerate(((wide, (48, 212)), (tall, (52, 48)))):
        row, col = np.unravel_index(int(result.maps[number].argmax()), (grid, grid))
        height, width = image.shape[:2]  # readers upsample the store grid to image size
        assert abs((row + 0.5) * height / grid - cy) <= height / grid * 1.5, (number, row, col)
        assert abs((col + 0.5) * width / grid - cx) <= width / grid * 1.5, (number, row, col)
    assert float(result.image_score[2]) < min(float(result.image_score[0]), float(result.image_score[1]))


def test_mixed_shapes_in_one_batch_score_as_each_alone(aspect_encoder):
    images = [texture(96, 288, seed=20), texture(64, 64, seed=21), texture(288, 96, seed=22),
              texture(96, 290, seed=23)]
    tensors = [aspect_encoder.preprocess(i) for i in images]
    assert isinstance(batch_images(tensors), list) and isinstance(batch_images(tensors[:1]), torch.Tensor)
    aspect_encoder.set_references("mixed", tensors[1:3])
    together = aspect_encoder.score(tensors, "mixed")
    alone = torch.cat([aspect_encoder.score([t], "mixed").maps for t in tensors])
    torch.testing.assert_close(together.maps, alone, rtol=1e-4, atol=1e-5)
    residuals = aspect_encoder.residuals(tensors, "mixed")  # the ADPretrain adaptor's input, same grid
    assert residuals.shape[:3] == (4, aspect_encoder.grid_size, aspect_encoder.grid_size)


def test_input_mode_enters_the_identity_and_the_store_version():
    squash = build_encoder(KeadSettings(image_size=SIZE, input="squash"), device="cpu")
    aspect = build_encoder(KeadSettings(image_size=SIZE, input="aspect"), device="cpu")
    wider = build_encoder(KeadSettings(image_size=SIZE, input="aspect", max_aspect=2.0), device="cpu")
    assert squash.identity.extra["input"] == "squash" and "max_aspect" not in squash.identity.extra
    assert aspect.identity.extra["input"] == "aspect" and aspect.identity.extra["max_aspect"] == 4.0
    references = pd.DataFrame({"category": ["c"], "image_id": ["r1"], "path": ["r1.png"], "source": ["s"],
                               "reason": ["normal"]})
    versions = {store_version_for(e, references, ["c"])[0] for e in (squash, aspect, wider)}
    assert len(versions) == 3
    with pytest.raises(ValueError, match="input must be one of"):
        CnnFewShotEncoder(image_size=SIZE, input="letterbox")


def test_runner_maps_an_index_of_mixed_aspect_ratios(tmp_path, aspect_encoder):
    """compute_anomaly_maps: batches ordered by input shape, every image mapped on the store grid."""
    shapes = [(96, 288), (64, 64), (288, 96), (96, 288), (70, 200), (64, 64)]
    rows = []
    for number, (height, width) in enumerate(shapes):
        path = tmp_path / f"img{number}.png"
        cv2.imwrite(str(path), texture(height, width, seed=30 + number))
        rows.append({"image_id": f"i{number}", "path": str(path), "category": "tile", "height": height,
                     "width": width, "duplicate_of": None})
    index = pd.DataFrame(rows)
    ordered = by_input_shape(index, aspect_encoder)
    keys = [aspect_encoder.input_shape(h, w) for h, w in zip(ordered["height"], ordered["width"], strict=True)]
    assert keys == sorted(keys)
    references = index.iloc[[0, 2]].assign(source="s", reason="normal")
    store = str(tmp_path / "maps")
    stats = compute_anomaly_maps(index, aspect_encoder, store, references, batch_size=4, num_workers=0)
    assert stats.computed == len(index) and not stats.failed
    table = read_map_table(store)
    assert table.maps.shape == (len(index), aspect_encoder.grid_size, aspect_encoder.grid_size)
    single = aspect_encoder.score([aspect_encoder.preprocess(cv2.imread(rows[4]["path"])[:, :, ::-1])], "tile")
    position = table.image_id.tolist().index("i4")
    np.testing.assert_allclose(table.maps[position], single.maps[0].numpy(), atol=2e-3)  # float16 store


def test_one_set_of_defaults_for_the_encoder_init_and_demo():
    """The encoder's own defaults, KeadSettings (a user's config), ``agssp init`` and the demo agree on what
    bench_kead_eval.py measured; the demo differs only in its documented smaller image size."""
    import yaml

    from agssp_pipeline.demo.corpus import render_config
    from agssp_pipeline.init_config import PRODUCTION_SETTINGS

    plain = CnnFewShotEncoder()
    configured = build_encoder(KeadSettings(), device="cpu")
    assert configured.identity.as_dict() == plain.identity.as_dict()
    assert plain.identity.extra["input"] == "aspect" and plain.identity.extra["layers"] == [2, 3]
    assert plain.image_size == 320
    written = KeadSettings.model_validate(yaml.safe_load(PRODUCTION_SETTINGS)["kead"])
    assert (written.input, written.cnn_layers or [2, 3], written.image_size) == ("aspect", [2, 3], None)
    demo = KeadSettings.model_validate(yaml.safe_load(render_config())["kead"])
    assert (demo.input, demo.cnn_layers, demo.max_aspect) == ("aspect", None, KeadSettings().max_aspect)
    assert demo.image_size == 224  # said in the demo config's header and kead block
