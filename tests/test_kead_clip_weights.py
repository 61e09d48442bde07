"""CLIP weight loading: local file, local directory (HF layout or bare weights), fail-fast without weights."""

from __future__ import annotations

import json
import time

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from agssp_pipeline.kead.open_clip_models import (
    RANDOM_INIT,
    TINY_MODEL_NAME,
    WeightsUnavailableError,
    load_clip_model,
    resolve_weights,
)


def _trained_like_tiny(seed: int) -> torch.nn.Module:
    """A tiny model whose weights differ from the seeded random init, so loading is really tested."""
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL_NAME, pretrained=None)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def reference_model():
    return _trained_like_tiny(seed=123)


@pytest.fixture(scope="module")
def probe():
    torch.manual_seed(0)
    return torch.randn(2, 3, 96, 96)


def _same_outputs(model_a, model_b, images) -> bool:
    with torch.no_grad():
        return torch.equal(model_a.encode_image(images), model_b.encode_image(images))


def test_load_from_state_dict_file(tmp_path, reference_model, probe):
    path = tmp_path / "tiny_clip.pt"
    torch.save(reference_model.state_dict(), path)
    loaded = load_clip_model(TINY_MODEL_NAME, str(path))
    assert loaded.weights.kind == "file"
    assert loaded.weights.identity.startswith("sha256:")
    assert _same_outputs(loaded.model, reference_model, probe)
    random_model = load_clip_model(TINY_MODEL_NAME, None, allow_random_weights=True).model
    assert not _same_outputs(random_model, reference_model, probe)


def test_load_from_hf_layout_directory(tmp_path, reference_model, probe):
    folder = tmp_path / "tiny_dir"
    folder.mkdir()
    config = {"model_cfg": open_clip.get_model_config(TINY_MODEL_NAME),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in reference_model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    loaded = load_clip_model(TINY_MODEL_NAME, str(folder))
    assert loaded.weights.kind == "dir"
    assert loaded.mean == (0.5, 0.5, 0.5)  # preprocess config of the folder is honoured
    assert _same_outputs(loaded.model, reference_model, probe)


def test_load_from_directory_with_bare_weights(tmp_path, reference_model, probe):
    folder = tmp_path / "bare"
    folder.mkdir()
    torch.save({"state_dict": reference_model.state_dict()}, folder / "pytorch_model.bin")
    loaded = load_clip_model(TINY_MODEL_NAME, str(folder))
    assert _same_outputs(loaded.model, reference_model, probe)
    assert loaded.weights.identity == resolve_weights(TINY_MODEL_NAME, str(folder / "pytorch_model.bin")).identity


def test_random_weights_need_explicit_flag_and_are_named():
    with pytest.raises(WeightsUnavailableError, match="kead.weights"):
        resolve_weights(TINY_MODEL_NAME, None)
    source = resolve_weights(TINY_MODEL_NAME, None, allow_random_weights=True)
    assert source.identity == RANDOM_INIT


def test_missing_weights_fail_fast_with_instructions(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the hub must not be contacted")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", no_network)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as error:
        resolve_weights("ViT-B-16-plus-240", "laion400m_e32", cache_dir=str(tmp_path / "empty_cache"))
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message and "local checkpoint file" in message and "laion400m_e32" in message
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_clip_model("ViT-B-16-plus-240", str(tmp_path / "missing" / "clip.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="unknown pretrained tag"):
        resolve_weights("ViT-B-16-plus-240", "no_such_tag")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(WeightsUnavailableError, match="holds no checkpoint"):
        resolve_weights(TINY_MODEL_NAME, str(empty))
    assert time.perf_counter() - started < 5.0


def test_cached_tag_is_used_without_network(tmp_path, monkeypatch, reference_model):
    """A tag whose file sits in the hub cache resolves to that file (what an offline plant relies on)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pretrained_cfg = open_clip.get_pretrained_cfg("ViT-B-16-plus-240", "laion400m_e32")
    repo_id = pretrained_cfg["hf_hub"].rstrip("/")
    snapshot = tmp_path / ("models--" + repo_id.replace("/", "--")) / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"placeholder")
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    source = resolve_weights("ViT-B-16-plus-240", "laion400m_e32", cache_dir=str(tmp_path))
    assert source.kind == "tag" and source.identity == "laion400m_e32"
    assert source.checkpoint == str(snapshot / "open_clip_model.safetensors")


def test_presets_follow_the_paper():
    from agssp_pipeline.kead.open_clip_models import PRESETS

    assert PRESETS["ViT-B-16-plus-240"].tap_layers == (3, 6, 9, 12)
    assert PRESETS["ViT-B-16-plus-240"].vv_start_block == 3  # last 9 of 12 blocks
    assert PRESETS["ViT-L-14-336"].tap_layers == (6, 12, 18, 24)
    assert PRESETS["ViT-H-14-378-quickgelu"].tap_layers == (8, 16, 24, 32)
    for preset in PRESETS.values():
        assert open_clip.get_model_config(preset.model_name)["vision_cfg"]["layers"] == preset.depth
        if preset.pretrained_tag:
            assert preset.pretrained_tag in open_clip.list_pretrained_tags_by_model(preset.model_name)


def test_config_resolves_relative_weights_next_to_the_config(tmp_path, reference_model):
    from agssp_pipeline.config import load_config

    (tmp_path / "models").mkdir()
    torch.save(reference_model.state_dict(), tmp_path / "models" / "clip.pt")
    (tmp_path / "agssp.yaml").write_text(
        "kead:\n  encoder: clip\n  clip_model: agssp-tiny-clip\n  weights: models/clip.pt\n"
        "  prompts_file: plant_prompts.yaml\n"
    )
    config = load_config(tmp_path / "agssp.yaml")
    assert config.kead.weights == str(tmp_path / "models" / "clip.pt")
    assert config.kead.prompts_file == str(tmp_path / "plant_prompts.yaml")
    assert resolve_weights(config.kead.clip_model, config.kead.weights).kind == "file"
    (tmp_path / "tag.yaml").write_text("kead:\n  weights: laion400m_e32\n")
    assert load_config(tmp_path / "tag.yaml").kead.weights == "laion400m_e32"
