"""The KeAD prompt knowledge base: built-in categories, lookup, prompt building, hashing, truncation."""

from __future__ import annotations

import open_clip
import pytest
import torch

from agssp_pipeline.kead.prompts import (
    FALLBACK_CATEGORY,
    PROMPTS_DIR,
    PromptConfigError,
    class_text_embeddings,
    find_truncated,
    load_knowledge_base,
)

REQUIRED = ["brushed_steel", "rolled_strip", "cast_billet", "steel_strip", "steel_pipe", "casting_billet",
            "aluminium_plate", "rail", "magnetic_tile", FALLBACK_CATEGORY]


@pytest.fixture(scope="module")
def base():
    return load_knowledge_base()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16-plus-240")


def test_builtin_categories_present_and_fit_the_text_context(base, tokenizer):
    assert set(REQUIRED) <= set(base.categories)
    for category in REQUIRED:
        prompts = base.prompt_set(category)
        assert len(prompts.anomalous_knowledge) >= 4
        assert len(prompts.normal) == len(base.generic.normal_states) * len(base.generic.templates)
        assert find_truncated(prompts.all_prompts, tokenizer) == [], category


def test_lookup_by_alias_spelling_and_fallback(base):
    assert base.lookup("NEU-DET").category == "steel_strip"
    assert base.lookup("Aluminum Plate").category == "aluminium_plate"
    assert base.lookup("MT").category == "magnetic_tile"
    assert base.lookup("line_7_unknown_product").category == FALLBACK_CATEGORY


def test_knowledge_sentence_format(base):
    prompts = base.prompt_set("magnetic_tile")
    assert "A photo of magnetic tile with blowhole defect, it appears as small dark round holes in the tile surface." \
        in prompts.anomalous_knowledge
    assert "a photo of a flawless magnetic tile." in prompts.normal
    assert "a close-up photo of a magnetic tile with damage." in prompts.anomalous_generic
    assert "a photo of a ." in prompts.redundant  # the empty-object ("redundant") ensemble


def test_prompt_hash_tracks_descriptions(tmp_path, base):
    override = tmp_path / "rail.yaml"
    override.write_text(
        "category: rail\nobject: steel rail head\ndefects:\n  - type: squat\n    features: a dark oval dent\n"
    )
    changed = load_knowledge_base(override)
    assert changed.prompt_set("rail").hash != base.prompt_set("rail").hash
    assert changed.prompt_set("magnetic_tile").hash == base.prompt_set("magnetic_tile").hash
    assert changed.hash != base.hash
    assert load_knowledge_base().hash == base.hash  # deterministic


def test_user_file_with_several_categories(tmp_path):
    custom = tmp_path / "plant.yaml"
    custom.write_text(
        "categories:\n"
        "  - category: galvanised coil\n    object: galvanised steel coil\n    aliases: [gi_coil]\n"
        "    defects:\n      - {type: zinc dross, features: small raised grey lumps}\n"
        "  - category: tinplate\n    object: tinplate sheet\n"
        "    defects:\n      - {type: pinhole, features: tiny bright dots}\n"
    )
    kb = load_knowledge_base(custom)
    assert kb.lookup("GI coil").category == "galvanised_coil"
    assert kb.prompt_set("tinplate").anomalous_knowledge == (
        "A photo of tinplate sheet with pinhole defect, it appears as tiny bright dots.",
    )


def test_malformed_knowledge_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("category: x\nobject: y\ndefects:\n  - type: crack\n")
    with pytest.raises(PromptConfigError, match=r"bad.yaml.*defects\[0\].*features"):
        load_knowledge_base(bad)
    with pytest.raises(PromptConfigError, match="does not exist"):
        load_knowledge_base(tmp_path / "missing.yaml")


def test_truncation_detection_with_context_length(tokenizer):
    short = "A photo of steel strip with scratch defect, it appears as thin lines."
    long = short + " " + " ".join(["additional faint irregular marks"] * 20)
    assert find_truncated([short, long], tokenizer) == [long]
    assert find_truncated([short], tokenizer, context_length=8) == [short]


def test_class_embeddings_recipe():
    """normalise-average-renormalise per group, knowledge mixed in, empty-prompt embedding removed."""
    torch.manual_seed(0)
    vocab: dict[str, torch.Tensor] = {}

    def fake_encode(prompts):
        return torch.stack([vocab.setdefault(p, torch.randn(8)) for p in prompts])

    kb = load_knowledge_base()
    prompt_set = kb.prompt_set("rail")
    result = class_text_embeddings(fake_encode, prompt_set)

    def ensemble(prompts):
        return torch.nn.functional.normalize(
            torch.nn.functional.normalize(fake_encode(prompts), dim=-1).mean(0), dim=0)

    normal = ensemble(prompt_set.normal)
    anomalous = torch.nn.functional.normalize(
        ensemble(prompt_set.anomalous_generic) + ensemble(prompt_set.anomalous_knowledge), dim=0)
    redundant = ensemble(prompt_set.redundant)
    expected = torch.nn.functional.normalize(torch.stack([normal, anomalous]) - redundant, dim=-1)
    torch.testing.assert_close(result, expected)


def test_every_builtin_file_parses():
    kb = load_knowledge_base()
    files = [p for p in PROMPTS_DIR.glob("*.yaml") if not p.name.startswith("_")]
    assert {kb.lookup(p.stem).category for p in files} == {p.stem for p in files}
