"""Ingestion of the synthetic demo corpus agrees with what the generator planted."""

from __future__ import annotations

from pathlib import Path

from agssp_pipeline.config import load_config
from agssp_pipeline.sources import ingest_source


def test_demo_sources_match_ground_truth(demo_corpus):
    config = load_config(demo_corpus.config_path)
    for source in config.sources:
        result = ingest_source(source)
        truth = demo_corpus.ground_truth_images(source.name)
        images = result.images
        assert set(images.image_id) == set(truth.image_id), source.name
        # every deliberately bad file is reported with a reason, none crashes the run
        reported = {Path(p).resolve() for p in result.quarantine.path}
        for bad in demo_corpus.bad_files.get(source.name, []):
            assert (Path(source.root) / bad).resolve() in reported, (source.name, bad)
        # copies are flagged against the first copy's image_id
        assert images.duplicate_of.notna().sum() == truth.duplicate_of_file.notna().sum()
        # where ingestion claims to know normality, it agrees with the planted truth
        merged = images.drop_duplicates("image_id").merge(truth.drop_duplicates("image_id")[["image_id", "is_normal"]],
                                                         on="image_id", suffixes=("", "_truth"))
        known = merged[merged.is_normal.notna()]
        assert (known.is_normal.astype(bool) == known.is_normal_truth.astype(bool)).all(), source.name
        if source.format != "image_folder":
            assert len(known) > 0.8 * len(merged), source.name
        if source.format == "mask_folder":
            assert images.mask_path.notna().all()


def test_demo_boxes_match_planted_boxes(demo_corpus):
    config = load_config(demo_corpus.config_path)
    for name in ("demo_rolled_voc", "demo_downstream", "demo_billet_masks"):
        result = ingest_source(config.source(name))
        truth = demo_corpus.ground_truth(name)
        originals = set(result.images.loc[result.images.duplicate_of.isna(), "path"])
        boxes = result.annotations[result.annotations.path.isin(originals)]
        assert len(boxes) == len(truth), name
        matched = boxes.merge(truth, on="image_id", suffixes=("", "_truth"))
        close = sum((matched[c] - matched[f"{c}_truth"]).abs() <= 1.0 for c in ("x1", "y1", "x2", "y2")) == 4
        assert close.sum() == len(truth), name  # every planted box found within a pixel (VOC clipping included)
        if name != "demo_billet_masks":  # mask sources name boxes by folder, not by native label
            assert (matched[close].class_name == matched[close].class_name_truth).all()
