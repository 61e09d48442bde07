"""Offline CNN few-shot encoder: real ImageNet weights load strictly, maps find planted defects."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from agssp_pipeline.kead.base import AnomalyEncoder
from agssp_pipeline.kead.cnn_encoder import (
    PACKAGE_WEIGHTS,
    RANDOM_WEIGHTS,
    CnnFewShotEncoder,
    fold_batchnorm,
    load_lite0_classifier,
    package_weights_path,
)
from agssp_pipeline.kead.encoders import ENCODERS, build_encoder, resolve_device
from agssp_pipeline.kead.settings import KeadSettings


def _imagenet_top5(model: torch.nn.Module, path: Path) -> list[int]:
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    image = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    tensor = torch.from_numpy((image - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model(tensor)[0].topk(5).indices.tolist()


def test_package_weights_are_real_imagenet_weights():
    """Strict key mapping + ImageNet sanity: the package's EfficientNet-Lite0 classifies photos with known
    classes (matplotlib's Grace Hopper portrait -> 652 'military uniform', ultralytics' bus.jpg ->
    654 'minibus'), which random weights never do. Proves key mapping, normalisation and weights at once."""
    import matplotlib
    import ultralytics

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    bus = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
    if not hopper.is_file() or not bus.is_file():
        pytest.skip("sample photos not shipped with this matplotlib/ultralytics build")
    model, tag = load_lite0_classifier(PACKAGE_WEIGHTS)
    assert tag.startswith(PACKAGE_WEIGHTS + ":") and len(tag.split(":")[1]) == 12
    assert 652 in _imagenet_top5(model, hopper)
    assert 654 in _imagenet_top5(model, bus)
    random_model, random_tag = load_lite0_classifier(RANDOM_WEIGHTS)
    assert random_tag == RANDOM_WEIGHTS
    torch.manual_seed(0)
    random_model = random_model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    assert 652 not in _imagenet_top5(random_model.eval(), hopper)


def test_weights_file_in_either_key_layout(tmp_path):
    """A user-supplied file (timm keys, safetensors) loads; a file with wrong keys fails loudly."""
    from safetensors.torch import save_file

    model, _ = load_lite0_classifier(PACKAGE_WEIGHTS)
    timm_file = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(timm_file))
    reloaded, tag = load_lite0_classifier(str(timm_file))
    assert tag.startswith("lite0.safetensors:")
    assert torch.equal(reloaded.conv_stem.weight, model.conv_stem.weight)
    broken = tmp_path / "broken.pth"
    torch.save({"conv_stem.weight": model.conv_stem.weight}, broken)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_lite0_classifier(str(broken))
    with pytest.raises(FileNotFoundError):
        load_lite0_classifier(str(tmp_path / "absent.pth"))
    assert package_weights_path().is_file()


def planted_defect_images(count: int, seed: int, size: int = 96, defect: bool = True):
    """Brushed-metal-like texture (blurred noise + vertical streaks) with an optional dark blob/scratch."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(count):
        noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 1.5)
        streaks = np.repeat(rng.normal(0, 0.6, (1, size)).astype(np.float32), size, axis=0)
        image = np.clip(128 + 18 * noise + 12 * streaks, 0, 255)
        mask = np.zeros((size, size), np.uint8)
        if defect:
            cx, cy = rng.integers(20, size - 20, size=2)
            if rng.random() < 0.5:
                cv2.ellipse(mask, (int(cx), int(cy)), (int(rng.integers(5, 9)), int(rng.integers(4, 8))),
                            float(rng.uniform(0, 180)), 0, 360, 1, -1)
            else:
                angle = rng.uniform(0, np.pi)
                dx, dy = int(14 * np.cos(angle)), int(14 * np.sin(angle))
                cv2.line(mask, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), 1, 3)
            image = np.where(mask > 0, image * 0.45, image)
        images.append(np.repeat(image.astype(np.uint8)[:, :, None], 3, axis=2))
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module")
def cnn_encoder() -> CnnFewShotEncoder:
    torch.manual_seed(0)
    return CnnFewShotEncoder(image_size=128)


def test_few_shot_maps_rank_planted_defects_above_clean_pixels(cnn_encoder):
    assert isinstance(cnn_encoder, AnomalyEncoder)
    references, _ = planted_defect_images(4, seed=1, defect=False)
    defects, masks = planted_defect_images(6, seed=2)
    clean, _ = planted_defect_images(4, seed=3, defect=False)
    cnn_encoder.set_references("steel", torch.stack([cnn_encoder.preprocess(i) for i in references]))
    result = cnn_encoder.score(torch.stack([cnn_encoder.preprocess(i) for i in defects + clean]), "steel")
    assert result.maps.shape == (10, cnn_encoder.grid_size, cnn_encoder.grid_size)
    assert torch.isnan(result.zero_shot_score).all()  # few-shot only: no text path
    assert torch.isfinite(result.maps).all() and result.maps.min() >= 0 and result.maps.max() < 1

    labels = np.concatenate([m.ravel() for m in masks] + [np.zeros(96 * 96)] * len(clean))
    scores = np.concatenate([cv2.resize(m.numpy(), (96, 96)).ravel() for m in result.maps])
    pixel_auroc = roc_auc_score(labels, scores)
    image_auroc = roc_auc_score([1] * len(defects) + [0] * len(clean), result.image_score.numpy())
    assert pixel_auroc > 0.9, pixel_auroc
    assert image_auroc > 0.9, image_auroc
    # the per-category scale: clean images stay near the references' own leave-one-out level (~0.5)
    assert float(result.image_score[len(defects):].median()) < 0.6
    assert float(result.image_score[: len(defects)].median()) > float(result.image_score[len(defects):].max())


def test_scores_need_references_and_grey_inputs_work(cnn_encoder):
    with pytest.raises(KeyError, match="no references"):
        cnn_encoder.score(torch.zeros(1, 3, 128, 128), "unknown_category")
    grey = np.full((40, 70), 100, np.uint8)  # aspect input (the default): short side 128, 70/40 kept
    assert cnn_encoder.preprocess(grey).shape == (3, 128, 224)
    assert cnn_encoder.preprocess(np.zeros((40, 70, 4), np.uint8)).shape == (3, 128, 224)
    assert CnnFewShotEncoder(image_size=128, input="squash").preprocess(grey).shape == (3, 128, 128)
    with pytest.raises(ValueError, match="multiple of 16"):  # the coarsest default stage (2, 3) has stride 16
        CnnFewShotEncoder(image_size=100)
    with pytest.raises(ValueError, match="multiple of 32"):
        CnnFewShotEncoder(image_size=112, layers=(2, 3, 4))


def test_registry_builds_named_encoders():
    assert {"clip", "winclip", "cnn_fewshot"} <= set(ENCODERS)
    encoder = build_encoder(KeadSettings(encoder="cnn_fewshot", image_size=64), device="auto")
    assert encoder.identity.encoder == "cnn_fewshot" and encoder.grid_size == 8
    assert encoder.device == resolve_device("auto")
    deep = build_encoder(KeadSettings(encoder="cnn_fewshot", image_size=64, cnn_layers=[2, 3, 4]), device="cpu")
    # default layers (2, 3) since issue 12's measurement (cnn_encoder.py docstring); (2, 3, 4) on request
    assert deep.identity.extra["layers"] == [2, 3, 4] and encoder.identity.extra["layers"] == [2, 3]
    with pytest.raises(ValueError, match="unknown kead.encoder 'nope'"):
        build_encoder(KeadSettings(encoder="nope"))


def test_batchnorm_folding_keeps_the_features():
    """Folded convs + channels-last give the features of the plain timm model (random BN statistics)."""
    import copy

    import timm

    torch.manual_seed(0)
    plain = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3, 4))
    for norm in plain.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):  # non-trivial statistics, so a wrong fold shows
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.uniform_(-0.2, 0.2)
    plain.eval()
    folded = copy.deepcopy(plain)
    count = fold_batchnorm(folded)
    assert count == sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules()) > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = plain(images)
        got = folded.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last))
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
