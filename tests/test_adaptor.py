"""ADPretrain feature adaptor: losses (toy separation, sign flips detected), synthetic anomalies, training on
tiny demo-like images, checkpoint lineage, and map-store versions that keep adapted and plain maps apart."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from agssp_pipeline.kead import adaptor_losses
from agssp_pipeline.kead.adaptor import (
    ResidualProjector,
    fit_adaptor,
    load_adaptor,
    patch_labels,
    resolve_adaptor_setting,
    save_adaptor,
)
from agssp_pipeline.kead.adaptor_losses import adaptor_loss, angle_contrastive_loss, norm_loss
from agssp_pipeline.kead.settings import AdaptorTrainingSettings, KeadSettings
from agssp_pipeline.kead.synthetic import SyntheticRecipe, perlin_mask, synthesize


# ------------------------------------------------------------------ losses on a toy case
def _toy(seed: int = 0, count: int = 256, dim: int = 16):
    """Residuals whose only abnormal signal is a weak offset along one axis, hidden among noisy axes.

    Normal and abnormal residuals have the same norm distribution in the input space (the noise is
    larger on the other axes), so neither plain angle nor plain norm separates them: the projector must
    learn to.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(count) % 2).long()
    scale = torch.ones(dim) * 1.0
    scale[0] = 0.05
    base = torch.randn(count, dim, generator=generator) * scale
    base[:, 0] += labels.float() * 0.6
    view_a = base + 0.02 * torch.randn(count, dim, generator=generator)
    view_b = base + 0.02 * torch.randn(count, dim, generator=generator)
    return view_a, view_b, labels


def _train_toy(loss_fn, steps: int = 150, seed: int = 0) -> ResidualProjector:
    torch.manual_seed(seed)
    view_a, view_b, labels = _toy(seed)
    projector = ResidualProjector(view_a.shape[1], hidden=32, out_dim=8)
    optimiser = torch.optim.Adam(projector.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = loss_fn(projector(view_a), projector(view_b), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return projector.eval()


def _norm_auroc(projector: ResidualProjector, seed: int = 1) -> float:
    view_a, _, labels = _toy(seed)
    with torch.no_grad():
        norms = projector(view_a).norm(dim=1).numpy()
    return float(roc_auc_score(labels.numpy(), norms))


def _angle_gap(projector: ResidualProjector, seed: int = 1) -> float:
    """Mean cosine within kinds minus mean cosine across kinds, on held-out toy residuals."""
    view_a, _, labels = _toy(seed)
    with torch.no_grad():
        unit = torch.nn.functional.normalize(projector(view_a), dim=1)
    cosine = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    return float(cosine[same & off_diagonal].mean() - cosine[~same].mean())


def test_toy_inputs_are_not_separable_by_plain_norm():
    view_a, _, labels = _toy(1)
    assert 0.35 < roc_auc_score(labels.numpy(), view_a.norm(dim=1).numpy()) < 0.65


def test_norm_loss_separates_toy_anomalies_and_a_flipped_sign_does_not():
    def loss(a, b, y):
        return norm_loss(a, y, radius=1.0, margin=1.0) + norm_loss(b, y, radius=1.0, margin=1.0)

    trained = _train_toy(loss)
    assert _norm_auroc(trained) > 0.9
    flipped = _train_toy(lambda a, b, y: -loss(a, b, y))
    assert _norm_auroc(flipped) < 0.8


def test_angle_loss_separates_toy_anomalies_and_a_flipped_sign_does_not():
    def loss(a, b, y):
        return angle_contrastive_loss(a, b, y, temperature=0.15)

    trained = _train_toy(loss)
    assert _angle_gap(trained) > 0.5
    flipped = _train_toy(lambda a, b, y: -loss(a, b, y))
    assert _angle_gap(flipped) < 0.2


def test_losses_are_lower_when_kinds_are_apart():
    """Direct sign checks: a separated configuration costs less than a mixed one, for each loss."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    apart = torch.zeros(8, 4)
    apart[:4, 0], apart[4:, 1] = 0.5, 3.0  # normals short along x, abnormals long along y
    apart = apart + 0.01 * torch.randn(8, 4, generator=generator)
    mixed = apart[torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])]  # same points, labels no longer match them
    assert angle_contrastive_loss(apart, apart, labels) < angle_contrastive_loss(mixed, mixed, labels)
    assert norm_loss(apart, labels) < 1e-6 < norm_loss(mixed, labels)
    total_apart = adaptor_loss(apart, apart, labels)["total"]
    assert total_apart < adaptor_loss(mixed, mixed, labels)["total"]


def test_losses_reject_bad_shapes_and_are_zero_without_both_kinds():
    with pytest.raises(ValueError, match="views"):
        angle_contrastive_loss(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        norm_loss(torch.zeros(4, 3), torch.zeros(3))
    only_normal = torch.zeros(4, dtype=torch.long)
    assert float(angle_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), only_normal)) == 0.0


def test_module_exports_the_three_losses():
    assert {"angle_contrastive_loss", "norm_loss", "adaptor_loss"} <= set(dir(adaptor_losses))


# ------------------------------------------------------------------ synthetic anomalies
def test_synthetic_anomalies_change_only_masked_pixels_and_leave_the_input_alone():
    rng = np.random.default_rng(0)
    image = np.full((48, 64, 3), 120, np.uint8)
    original = image.copy()
    kinds = set()
    for seed in range(30):
        out, mask, kind = synthesize(image, SyntheticRecipe(), np.random.default_rng(seed), textures=None)
        kinds.add(kind)
        assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert mask.any(), kind
        changed = np.abs(out.astype(int) - image.astype(int)).max(axis=-1) > 0
        assert not (changed & ~mask).any(), kind  # nothing outside the mask moved
    assert kinds == {"perlin_texture", "perlin_intensity", "cutpaste"}
    assert np.array_equal(image, original)
    assert perlin_mask(32, 32, SyntheticRecipe(), rng).any()
    with pytest.raises(ValueError, match="uint8 RGB"):
        synthesize(np.zeros((8, 8), np.uint8), SyntheticRecipe(), rng)
    with pytest.raises(ValueError, match="kinds"):
        SyntheticRecipe(kinds=("nope",), weights=(1.0,))


def test_patch_labels_from_masks():
    mask = np.zeros((16, 16), bool)
    mask[:8, :8] = True
    mask[8, 8] = True  # a sliver: ambiguous cell, left out
    labels = patch_labels(mask, 2)
    assert labels.tolist() == [[1, 0], [0, -1]]
    assert (patch_labels(None, 3) == 0).all()


# ------------------------------------------------------------------ training on demo-like images
def _corpus(root, category: str = "tile", n_normal: int = 6, n_defect: int = 3) -> pd.DataFrame:
    from tests.test_kead_runner import _write_corpus

    frame = _write_corpus(root, n_normal=n_normal, n_defect=n_defect)
    return frame.assign(category=category)


@pytest.fixture(scope="module")
def small_encoder():
    from agssp_pipeline.kead.cnn_encoder import CnnFewShotEncoder

    return CnnFewShotEncoder(image_size=64, min_memory=256, layers=(2, 3, 4))  # 472-dim features, as below


def test_fit_adaptor_trains_saves_and_changes_the_store_version(tmp_path, small_encoder):
    from agssp_pipeline.kead.references import select_references
    from agssp_pipeline.kead.runner import load_reference_images, store_version_for
    from agssp_pipeline.storage import StorageLayout
    from agssp_pipeline.training import checkpoint as ckpt

    pool = _corpus(tmp_path / "tiles")
    references = select_references(pool, k=2, strategy="normal")
    training = AdaptorTrainingSettings(steps=8, batch_size=64, hidden=32, out_dim=16, max_images_per_category=3,
                                       synthetic_per_image=1, normal_cells_per_image=16)
    messages: list[str] = []
    small_encoder.set_adaptor(None)
    projector, report = fit_adaptor(small_encoder, pool, references, training, log=messages.append)
    assert report["patches"]["abnormal"] > 0 and report["patches"]["normal"] > 0
    assert report["images"] == {"normal": 3, "synthetic": 3, "real_mask": 3}
    assert report["steps"] == 8 and all(np.isfinite(h["total"]) for h in report["history"])
    assert any("adaptor step 8/8" in m for m in messages)

    layout = StorageLayout(str(tmp_path / "storage"))
    lineage = {**report, "sources": {"tiles": {"images": len(pool)}},
               "references": {"tile": sorted(references["image_id"])}}
    run = save_adaptor(layout, "cnn_fewshot", projector, lineage)
    loaded, saved = load_adaptor(run)
    assert saved["kind"] == "adaptor" and saved["synthetic_recipe"]["kinds"]
    assert saved["references"]["tile"] == sorted(references["image_id"])
    assert ckpt.read_latest_pointer(layout, "cnn_fewshot", kind="adaptor")["run_id"] == saved["run_id"]
    for key, value in projector.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)

    categories = ["tile"]
    plain_version, _ = store_version_for(small_encoder, references, categories)
    small_encoder.set_adaptor(loaded, saved)
    try:
        adapted_version, attrs = store_version_for(small_encoder, references, categories)
        assert adapted_version != plain_version
        assert attrs["identity"]["adaptor"]["run_id"] == saved["run_id"]
        small_encoder.set_references("tile", load_reference_images(small_encoder, references))
        batch = torch.stack([small_encoder.preprocess(np.full((64, 64, 3), 90, np.uint8))])
        result = small_encoder.score(batch, "tile")
        assert torch.isfinite(result.maps).all() and result.maps.shape == (1, 8, 8)
    finally:
        small_encoder.set_adaptor(None)
    assert store_version_for(small_encoder, references, categories)[0] == plain_version

    settings = KeadSettings(adaptor="latest")
    assert resolve_adaptor_setting(settings, layout).adaptor == run
    with pytest.raises(FileNotFoundError, match="feature_adaptor"):
        resolve_adaptor_setting(settings, StorageLayout(str(tmp_path / "empty")))


def test_adaptor_for_other_features_is_refused(small_encoder):
    projector = ResidualProjector(472, hidden=4, out_dim=2)
    identity = {**small_encoder.identity.as_dict(), "image_size": 320}
    with pytest.raises(ValueError, match="trained for encoder features"):
        small_encoder.set_adaptor(projector, {"run_id": "x", "encoder_identity": identity})
    assert "adaptor" not in small_encoder.identity.extra and small_encoder.adaptor is None


def test_load_adaptor_refuses_other_checkpoints(tmp_path):
    from agssp_pipeline.training import checkpoint as ckpt

    ckpt.save_checkpoint(str(tmp_path / "run"), {"w": torch.zeros(2)}, {"kind": "backbone"})
    with pytest.raises(ValueError, match="not a feature adaptor"):
        load_adaptor(str(tmp_path / "run"))


# ------------------------------------------------------------------ the asset, through Dagster
def test_feature_adaptor_asset_then_adapted_maps_in_a_new_store_version(tmp_path):
    """feature_adaptor trains on the pretraining-only source (not the downstream one); anomaly_maps with
    ``kead.adaptor: latest`` writes a new store version; kead_evaluation keeps both rows in its history."""
    import dagster as dg
    import yaml

    from agssp_pipeline.config import load_config
    from agssp_pipeline.kead.store import read_map_table
    from agssp_pipeline.training import checkpoint as ckpt
    from assets.kead import KeadModelResource, anomaly_maps, feature_adaptor, kead_evaluation
    from assets.resources import PipelineConfigResource

    kead = {"encoder": "cnn_fewshot", "k_shot": 2, "image_size": 64, "batch_size": 4, "num_workers": 0,
            "adaptor_training": {"steps": 5, "batch_size": 64, "hidden": 32, "out_dim": 16,
                                 "max_images_per_category": 2, "synthetic_per_image": 1}}
    config = {"storage_root": str(tmp_path / "storage"),
              "sources": [{"name": "tiles", "format": "mask_folder", "root": str(tmp_path / "tiles"),
                           "category": "tile"},
                          {"name": "customer", "format": "image_folder", "root": str(tmp_path / "customer"),
                           "category": "tile", "role": "downstream"}],
              "kead": kead}
    path = tmp_path / "agssp.yaml"
    path.write_text(yaml.safe_dump(config))
    layout = load_config(path).layout()
    layout.ensure_dir("index")
    _corpus(tmp_path / "tiles", n_normal=5, n_defect=2).to_parquet(layout.index("tiles"))
    customer = _corpus(tmp_path / "customer", n_normal=2, n_defect=2).assign(
        image_id=lambda f: "c" + f["image_id"].str[1:], source="customer")
    customer.to_parquet(layout.index("customer"))

    resources = {"pipeline_config": PipelineConfigResource(config_path=str(path)),
                 "kead_model": KeadModelResource(device="cpu")}
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("pretrain_source", ["tiles"])
    result = dg.materialize([feature_adaptor], instance=instance, resources=resources)
    assert result.success
    metadata = result.asset_materializations_for_node("feature_adaptor")[0].metadata
    assert metadata["sources"].value == ["tiles"] and metadata["abnormal_patches"].value > 0
    lineage = ckpt.read_lineage(ckpt.latest_checkpoint_dir(layout, "cnn_fewshot", kind="adaptor"))
    assert set(lineage["sources"]) == {"tiles"}
    assert all(i.startswith("free") for i in lineage["references"]["tile"])
    assert lineage["synthetic_recipe"]["kinds"] and lineage["settings"]["steps"] == 5
    assert [i["partition"] for i in ckpt.recorded_inputs(lineage)] == ["tiles"]

    def maps_and_evaluation() -> str:
        run = dg.materialize([anomaly_maps, kead_evaluation], instance=instance, resources=resources,
                             partition_key="tiles")
        assert run.success
        return str(read_map_table(layout.maps_store("tiles")).attrs["version"])

    plain = maps_and_evaluation()
    path.write_text(yaml.safe_dump({**config, "kead": {**kead, "adaptor": "latest"}}))
    adapted = maps_and_evaluation()
    assert adapted != plain
    table = read_map_table(layout.maps_store("tiles"))
    assert table.attrs["identity"]["adaptor"]["run_id"] == lineage["run_id"] and len(table) == 7
    history = pd.read_parquet(layout.evaluations("kead", "tiles"))
    overall = history[history["level"] == "overall"].set_index("store_version")
    assert set(overall.index) == {plain, adapted}
    assert overall.loc[adapted, "adaptor"] == lineage["run_id"] and overall.loc[plain, "adaptor"] == ""
    assert (overall["references_excluded"] == 2).all()


def test_untrained_skip_adaptor_ranks_patches_like_the_plain_encoder(tmp_path, small_encoder):
    """With the skip connection an adaptor starts as the plain score (a monotonic function of it), so
    training starts from the plain ranking; a projector without skip does not."""
    from scipy.stats import spearmanr

    from agssp_pipeline.kead.references import select_references
    from agssp_pipeline.kead.runner import load_reference_images
    from agssp_pipeline.sources.decode import read_rgb

    pool = _corpus(tmp_path / "tiles", n_normal=4, n_defect=2)
    references = select_references(pool, k=2, strategy="normal")
    batch = torch.stack([small_encoder.preprocess(read_rgb(p)) for p in pool["path"].iloc[-2:]])

    def raw(projector) -> np.ndarray:
        small_encoder.set_adaptor(projector, None)
        small_encoder.set_references("tile", load_reference_images(small_encoder, references))
        return small_encoder._raw_maps(small_encoder.patch_features(batch), small_encoder.memories["tile"]).numpy()

    blur = small_encoder.blur_sigma
    small_encoder.blur_sigma = 0.0  # the blur averages sqrt(2 d) instead of d: close, not rank-identical
    try:
        plain = raw(None).ravel()
        skip = raw(ResidualProjector(472, hidden=16, skip=True)).ravel()
        assert spearmanr(plain, skip)[0] > 0.9999 and np.allclose(skip, np.sqrt(2 * plain), atol=1e-3)
        assert spearmanr(plain, raw(ResidualProjector(472, hidden=16, out_dim=8)).ravel())[0] < 0.99
    finally:
        small_encoder.blur_sigma = blur
        small_encoder.set_adaptor(None)


def test_collect_training_images_skips_unreadable_files_and_keeps_references_out(tmp_path):
    from agssp_pipeline.kead.adaptor import collect_training_images
    from agssp_pipeline.kead.references import select_references

    pool = _corpus(tmp_path / "tiles", n_normal=4, n_defect=1)
    references = select_references(pool, k=2, strategy="normal")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    pool = pd.concat([pool, pool.iloc[[0]].assign(image_id="free999", path=str(broken))], ignore_index=True)
    messages: list[str] = []
    images = collect_training_images(pool, references, SyntheticRecipe(), max_images=8, synthetic_per_image=1,
                                     log=messages.append)
    assert any("broken.png" in m for m in messages)
    origins = [i.origin.split(":")[0] for i in images]
    assert origins.count("normal") == 2 and origins.count("synthetic") == 2 and origins.count("real_mask") == 1
    reference_pixels = {tuple(np.asarray(_read_rgb(p)).ravel()[:32]) for p in references["path"]}
    assert not any(tuple(i.image.ravel()[:32]) in reference_pixels for i in images if i.origin == "normal")


def _read_rgb(path: str) -> np.ndarray:
    from agssp_pipeline.sources.decode import read_rgb

    return read_rgb(path)
