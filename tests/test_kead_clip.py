"""KeAD CLIP engine on the tiny model: V-V taps vs open_clip, scoring, fusion, WinCLIP windows, caching."""

from __future__ import annotations

import logging

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from agssp_pipeline.kead.base import AnomalyEncoder
from agssp_pipeline.kead.clip_encoder import ClipEngine, ClipKeadEncoder
from agssp_pipeline.kead.open_clip_models import TINY_MODEL_NAME, load_clip_model
from agssp_pipeline.kead.prompts import TextEmbeddingCache
from agssp_pipeline.kead.settings import KeadSettings
from agssp_pipeline.kead.surgery import (
    dual_path_forward,
    embed_tokens,
    fused_dual_block,
    supports_fused_block,
    vv_attention,
    window_embeddings,
    window_indices,
)
from agssp_pipeline.kead.winclip import WinClipEncoder, coverage_matrix, harmonic_aggregation

CATEGORY = "rolled_strip"


def _perturbed_tiny(seed: int):
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL_NAME, pretrained=None)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def settings():
    return KeadSettings(encoder="clip", clip_model=TINY_MODEL_NAME, allow_random_weights=True, batch_size=4)


@pytest.fixture(scope="module")
def kead(settings):
    return ClipKeadEncoder.from_settings(settings, "cpu")


@pytest.fixture(scope="module")
def images(kead):
    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 256, size=(80 + 10 * i, 120, 3), dtype=np.uint8) for i in range(5)]
    return torch.stack([kead.preprocess(image) for image in raw])


@hypothesis_settings(max_examples=12, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 3),
    taps=st.sets(st.integers(1, 4), min_size=1),
    vv_start=st.none() | st.integers(0, 3),
)
def test_taps_without_vv_equal_open_clip_forward_intermediates(seed, batch, taps, vv_start):
    """Property: for any weights, batch and taps, the original path equals open_clip's own forward
    (bit for bit with the V-V path off or unfused, to float rounding with the fused V-V blocks)."""
    model = _perturbed_tiny(seed)
    visual = model.visual
    torch.manual_seed(100 + seed)
    images = torch.randn(batch, 3, 96, 96)
    taps = tuple(sorted(taps))
    with torch.no_grad():
        theirs = visual.forward_intermediates(
            images, indices=[t - 1 for t in taps], normalize_intermediates=True, output_fmt="NLC"
        )
        plain = dual_path_forward(visual, images, taps, vv_start_block=None)
        assert torch.equal(plain.image_embedding, theirs["image_features"])
        assert torch.equal(plain.image_embedding, model.encode_image(images))
        for mine, reference in zip(plain.original_tokens, theirs["image_intermediates"], strict=True):
            torch.testing.assert_close(mine, reference @ visual.proj, rtol=0, atol=0)
        for mine_vv, mine in zip(plain.vv_tokens, plain.original_tokens, strict=True):
            assert torch.equal(mine_vv, mine)  # V-V disabled: the surgery side is the original path
        if vv_start is None:
            return
        unfused = dual_path_forward(visual, images, taps, vv_start_block=vv_start, fused=False)
        fused = dual_path_forward(visual, images, taps, vv_start_block=vv_start)
        assert torch.equal(unfused.image_embedding, theirs["image_features"])
        torch.testing.assert_close(fused.image_embedding, theirs["image_features"], rtol=1e-5, atol=1e-5)
        for a, b, reference in zip(unfused.original_tokens, fused.original_tokens, theirs["image_intermediates"],
                                   strict=True):
            assert torch.equal(a, reference @ visual.proj)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for a, b in zip(unfused.vv_tokens, fused.vv_tokens, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _reference_vv(block, hidden):
    """Independent V-V attention with explicit per-head einsum/softmax, for checking ``vv_attention``."""
    attn = block.attn
    width, heads = attn.embed_dim, attn.num_heads
    head_dim = width // heads
    value = hidden @ attn.in_proj_weight[2 * width :].T + attn.in_proj_bias[2 * width :]
    value = value.view(*hidden.shape[:2], heads, head_dim)
    weights = torch.einsum("bihd,bjhd->bhij", value, value) * head_dim**-0.5
    mixed = torch.einsum("bhij,bjhd->bihd", weights.softmax(dim=-1), value).reshape(hidden.shape)
    return mixed @ attn.out_proj.weight.T + attn.out_proj.bias


def test_vv_path_reuses_weights_and_leaves_original_path_untouched():
    model = _perturbed_tiny(7)
    visual = model.visual
    torch.manual_seed(3)
    batch = torch.randn(2, 3, 96, 96)
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        plain = dual_path_forward(visual, batch, (1, 2, 3, 4), None)
        dual = dual_path_forward(visual, batch, (1, 2, 3, 4), vv_start_block=2, fused=False)
        fused = dual_path_forward(visual, batch, (1, 2, 3, 4), vv_start_block=2)
        block = visual.transformer.resblocks[1]
        hidden = block.ln_1(embed_tokens(visual, batch))
        torch.testing.assert_close(vv_attention(block, hidden), _reference_vv(block, hidden), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == n_params
    # unfused: the original path runs through the model's own modules, bit for bit
    assert torch.equal(dual.image_embedding, plain.image_embedding)
    for a, b in zip(dual.original_tokens, plain.original_tokens, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(dual.vv_tokens[1], plain.vv_tokens[1])  # tap 2 is before the first V-V block (0-based 2)
    assert not torch.allclose(dual.vv_tokens[2], plain.vv_tokens[2])
    assert not torch.allclose(dual.vv_tokens[3], plain.vv_tokens[3])
    # fused (shared in_proj/out_proj, the default): the same numbers up to float rounding
    torch.testing.assert_close(fused.image_embedding, plain.image_embedding, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused.original_tokens, plain.original_tokens, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused.vv_tokens, dual.vv_tokens, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.vv_tokens[1], plain.vv_tokens[1])  # blocks before V-V run as modules


def test_fused_dual_block_equals_the_module_and_falls_back_for_unpacked_projections():
    model = _perturbed_tiny(5)
    visual = model.visual
    block = visual.transformer.resblocks[3]
    assert supports_fused_block(block)
    x = embed_tokens(visual, torch.randn(2, 3, 96, 96))
    with torch.no_grad():
        out, vv_update = fused_dual_block(block, x)
        torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vv_update, _reference_vv(block, block.ln_1(x)), rtol=1e-4, atol=1e-5)
    unpacked = torch.nn.MultiheadAttention(block.attn.embed_dim, block.attn.num_heads, kdim=7, vdim=7)
    assert unpacked.in_proj_weight is None
    block_copy = type(block).__new__(type(block))
    block_copy.__dict__.update(block.__dict__)
    block_copy._modules = {**block._modules, "attn": unpacked}
    assert not supports_fused_block(block_copy)


def test_vv_surgery_path_recursion_matches_clip_surgery():
    """x_s(l+1) = x_s(l) + out_proj(vv(ln_1(x_orig(l)))), FFN skipped; starts at the original stream."""
    model = _perturbed_tiny(11)
    visual = model.visual
    batch = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        out = dual_path_forward(visual, batch, (4,), vv_start_block=2)
        x = embed_tokens(visual, batch)
        blocks = visual.transformer.resblocks
        for block in blocks[:2]:
            x = block(x)
        surgery = x
        for block in blocks[2:]:
            surgery = surgery + _reference_vv(block, block.ln_1(x))
            x = block(x)
        expected = visual.ln_post(surgery[:, 1:]) @ visual.proj
    torch.testing.assert_close(out.vv_tokens[0], expected, rtol=1e-4, atol=1e-5)


def test_encoder_protocol_identity_and_map_shapes(kead, images):
    assert isinstance(kead, AnomalyEncoder)
    assert kead.identity.weights == "random-init"
    assert kead.identity.prompt_hash == kead.engine.knowledge.hash
    assert kead.identity.extra["tap_layers"] == [1, 2, 3, 4]
    kead.clear_references()
    out = kead.score(images, CATEGORY)
    assert out.maps.shape == (5, kead.grid_size, kead.grid_size) == (5, 6, 6)
    assert out.maps.dtype == torch.float32 and torch.isfinite(out.maps).all()
    assert ((out.maps >= 0) & (out.maps <= 1)).all()
    assert ((out.zero_shot_score > 0) & (out.zero_shot_score < 1)).all()
    torch.testing.assert_close(out.image_score, (out.zero_shot_score + out.maps.amax(dim=(1, 2))) / 2)
    assert out.maps.flatten(1).std(dim=1).min() > 0  # a real map, not a constant


def test_zero_shot_image_score_is_the_cls_softmax(kead, images):
    text = kead.engine.text_embeddings(CATEGORY)
    with torch.no_grad():
        embedding = F.normalize(kead.engine.model.encode_image(images), dim=-1)
    expected = (embedding @ text.T / 0.07).softmax(dim=-1)[:, 1]
    out = kead.score(images, CATEGORY)
    torch.testing.assert_close(out.zero_shot_score, expected, rtol=1e-4, atol=1e-5)


def test_few_shot_fusion_and_self_reference_scores_zero(kead, images):
    kead.clear_references()
    zero_shot = kead.score(images, CATEGORY)
    kead.set_references(CATEGORY, images[:2])
    fused = kead.score(images, CATEGORY)
    few_shot = fused.maps - zero_shot.maps
    assert torch.allclose(fused.zero_shot_score, zero_shot.zero_shot_score)
    assert few_shot[:2].abs().max() < 1e-5  # a reference against itself: distance 0 everywhere
    assert few_shot[2:].amax(dim=(1, 2)).min() > 1e-3  # other images are not in the memory
    assert (few_shot > -1e-6).all() and (few_shot <= 1.0 + 1e-6).all()
    torch.testing.assert_close(fused.image_score, (fused.zero_shot_score + fused.maps.amax(dim=(1, 2))) / 2)
    assert kead.reference_counts[CATEGORY] == 2
    other = kead.score(images, "magnetic_tile")  # categories keep separate memories
    assert not kead.has_references("magnetic_tile")
    assert ((other.maps >= 0) & (other.maps <= 1)).all()
    kead.clear_references()


def test_batches_are_independent(kead, images):
    kead.clear_references()
    whole = kead.score(images, CATEGORY)
    single = kead.score(images[3:4], CATEGORY)
    torch.testing.assert_close(single.maps[0], whole.maps[3], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_path_runs_and_tracks_fp32(settings, images):
    engine = ClipEngine.from_settings(settings.model_copy(update={"precision": "bf16"}), "cpu")
    bf16 = ClipKeadEncoder(engine).score(images, CATEGORY)
    fp32 = ClipKeadEncoder(ClipEngine.from_settings(settings, "cpu")).score(images, CATEGORY)
    assert torch.isfinite(bf16.maps).all()
    assert (bf16.maps - fp32.maps).abs().max() < 0.1


def test_preprocess_handles_gray_rgba_and_rejects_bad_input(kead):
    gray = np.full((50, 70), 128, dtype=np.uint8)
    rgba = np.zeros((300, 200, 4), dtype=np.uint8)
    assert kead.preprocess(gray).shape == (3, 96, 96)
    assert kead.preprocess(rgba).shape == (3, 96, 96)
    with pytest.raises(ValueError, match="uint8"):
        kead.preprocess(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="preprocessed images"):
        kead.score(torch.zeros(1, 3, 64, 64), CATEGORY)


def test_text_embeddings_cached_per_model_and_prompts(tmp_path, monkeypatch):
    model = _perturbed_tiny(5)
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    calls = {"n": 0}
    original = ClipEngine.encode_text

    def counting(self, prompts):
        calls["n"] += 1
        return original(self, prompts)

    monkeypatch.setattr(ClipEngine, "encode_text", counting)
    cache_dir = tmp_path / "text_cache"
    first = ClipEngine(load_clip_model(TINY_MODEL_NAME, str(weights)), "cpu",
                       text_cache=TextEmbeddingCache(cache_dir))
    embeddings = first.text_embeddings(CATEGORY)
    assert calls["n"] > 0 and first.text_cache.misses == 1
    n_calls = calls["n"]
    again = first.text_embeddings(CATEGORY)
    assert calls["n"] == n_calls and first.text_cache.hits == 1 and torch.equal(again, embeddings)
    assert embeddings.shape == (2, 32)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    # a fresh process (new cache object) on the same model reads the disk cache: no text pass
    second = ClipEngine(load_clip_model(TINY_MODEL_NAME, str(weights)), "cpu",
                        text_cache=TextEmbeddingCache(cache_dir))
    torch.testing.assert_close(second.text_embeddings(CATEGORY), embeddings)
    assert calls["n"] == n_calls and second.text_cache.hits == 1
    # another category is another prompt set: computed once more
    second.text_embeddings("magnetic_tile")
    assert calls["n"] > n_calls and second.text_cache.misses == 1


def test_truncated_descriptions_are_reported(tmp_path, settings, caplog):
    long_features = ", ".join(["a very long meandering description of faint irregular streaks"] * 6)
    custom = tmp_path / "prompts.yaml"
    custom.write_text(
        "category: coated_coil\nobject: coated steel coil\ndefects:\n"
        f"  - type: streak\n    features: {long_features}\n"
        "  - type: blister\n    features: small raised bubbles\n"
    )
    engine = ClipEngine.from_settings(settings.model_copy(update={"prompts_file": str(custom)}), "cpu")
    with caplog.at_level(logging.WARNING, logger="agssp_pipeline.kead.prompts"):
        engine.text_embeddings("coated_coil")
    truncated = engine.truncated_prompts["coated_coil"]
    assert len(truncated) == 1 and "streak" in truncated[0]
    assert any("truncated" in record.message for record in caplog.records)
    engine.text_embeddings(CATEGORY)
    assert engine.truncated_prompts[CATEGORY] == []


# -- WinCLIP mode -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def winclip(kead):
    return WinClipEncoder(kead.engine, windows=(2, 3))


def test_window_indices_and_harmonic_aggregation():
    idx = window_indices(4, 2)
    assert idx.shape == (9, 4)
    assert idx[0].tolist() == [0, 1, 4, 5] and idx[-1].tolist() == [10, 11, 14, 15]
    coverage = coverage_matrix(idx, 16)
    assert coverage.sum(dim=0).tolist()[:5] == [1, 2, 2, 1, 2]
    scores = torch.rand(3, 9) + 0.1
    fast = harmonic_aggregation(scores, coverage)
    for patch in range(16):  # reference with an explicit loop (test only)
        covering = (idx == patch).any(dim=1)
        expected = covering.sum() / (1.0 / scores[:, covering]).sum(dim=1)
        torch.testing.assert_close(fast[:, patch], expected)


def test_window_embeddings_differ_between_windows_and_images(winclip, images):
    _, _, windows = winclip.encode(images[:3])
    for size, embeddings in windows.items():
        n_windows = (6 - size + 1) ** 2
        assert embeddings.shape == (3, n_windows, 32)
        unit = F.normalize(embeddings, dim=-1)
        between_windows = unit[0] @ unit[0].T
        off_diagonal = between_windows[~torch.eye(n_windows, dtype=torch.bool)]
        assert off_diagonal.max() < 0.9999, "every window got the same embedding"
        assert (unit[0] - unit[1]).norm(dim=-1).min() > 1e-3, "images got the same window embeddings"


def test_window_embedding_equals_running_the_model_on_the_window_tokens(winclip, images):
    visual = winclip.engine.visual
    idx = window_indices(6, 3)
    with torch.no_grad():
        tokens = embed_tokens(visual, images[:2])
        batched = window_embeddings(visual, tokens, idx)
        w = 7
        seq = torch.cat([tokens[1:2, :1], tokens[1:2, 1:][:, idx[w]]], dim=1)
        alone = visual.transformer(seq)
        expected = visual.ln_post(alone[:, 0]) @ visual.proj
    torch.testing.assert_close(batched[1, w], expected[0], rtol=1e-4, atol=1e-5)


def test_winclip_scores_zero_and_few_shot(winclip, images):
    assert isinstance(winclip, AnomalyEncoder)
    assert winclip.identity.mode == "winclip" and winclip.identity.weights == "random-init"
    zero = winclip.score(images, CATEGORY)
    assert zero.maps.shape == (5, 6, 6) and torch.isfinite(zero.maps).all()
    assert ((zero.maps > 0) & (zero.maps < 1)).all()
    torch.testing.assert_close(zero.image_score, zero.zero_shot_score)
    winclip.set_references(CATEGORY, images[:2])
    fused = winclip.score(images, CATEGORY)
    few_shot = 2 * fused.maps - zero.maps
    assert few_shot[:2].abs().max() < 1e-4  # references against themselves
    assert few_shot[2:].amax(dim=(1, 2)).min() > 1e-3
    torch.testing.assert_close(fused.image_score, (fused.zero_shot_score + few_shot.amax(dim=(1, 2))) / 2,
                               rtol=1e-4, atol=1e-5)


def test_winclip_from_settings_rejects_windows_larger_than_grid(settings):
    with pytest.raises(ValueError, match="window sizes"):
        WinClipEncoder.from_settings(settings.model_copy(update={"winclip_windows": [2, 7]}), "cpu")


def test_settings_overrides_and_validation(kead):
    engine = kead.engine
    custom = ClipKeadEncoder(engine, vv_start_block=0, tap_layers=[4, 2])
    assert custom.tap_layers == (2, 4) and custom.identity.extra["vv_start_block"] == 0
    assert custom.identity.as_dict() != kead.identity.as_dict()
    with pytest.raises(ValueError, match="tap_layers"):
        ClipKeadEncoder(engine, tap_layers=[0, 5])
    with pytest.raises(ValueError, match="vv_start_block"):
        ClipKeadEncoder(engine, vv_start_block=4)
