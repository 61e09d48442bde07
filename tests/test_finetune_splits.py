"""Downstream splits: deterministic, stratified by dominant class, stored and reused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agssp_pipeline.storage import StorageLayout
from agssp_pipeline.training.splits import (
    NO_BOX_CLASS,
    SplitParams,
    dominant_class,
    load_or_create_split,
    make_split,
    split_path,
)


def _labelled_set(n_per_class=(40, 20, 10), seed=0):
    rng = np.random.default_rng(seed)
    rows, ids = [], []
    for c, n in enumerate(n_per_class):
        for i in range(n):
            image_id = f"{c}{i:05d}"
            ids.append(image_id)
            rows += [(image_id, f"class{c}", 1.0, 1.0, 9.0, 9.0)] * 2  # dominant: class c (2 boxes)
            rows.append((image_id, f"class{(c + 1) % 3}", 2.0, 2.0, 8.0, float(rng.integers(5, 9))))
    ids.append("empty00001")  # an image without boxes
    images = pd.DataFrame({"image_id": ids, "width": 10, "height": 10})
    annotations = pd.DataFrame(rows, columns=["image_id", "class_name", "x1", "y1", "x2", "y2"])
    return images, annotations


def test_dominant_class_counts_boxes_and_marks_unlabelled():
    images, annotations = _labelled_set()
    dominant = dominant_class(images["image_id"], annotations)
    assert dominant.iloc[0] == "class0" and dominant.iloc[45] == "class1"
    assert dominant.iloc[-1] == NO_BOX_CLASS


def test_split_is_stratified_and_seeded():
    images, annotations = _labelled_set()
    params = SplitParams(val_fraction=0.2, seed=3)
    split = make_split(images, annotations, params)
    counts = split.groupby(["dominant_class", "split"]).size().unstack(fill_value=0)
    assert counts.loc["class0", "val"] == 8 and counts.loc["class1", "val"] == 4 and counts.loc["class2", "val"] == 2
    assert (split["split"] == "val").sum() == round(len(images) * 0.2)
    again = make_split(images.sample(frac=1.0, random_state=1), annotations.sample(frac=1.0, random_state=2), params)
    pd.testing.assert_frame_equal(split, again)  # row order of the index does not matter
    other = make_split(images, annotations, SplitParams(val_fraction=0.2, seed=4))
    assert set(other.loc[other.split == "val", "image_id"]) != set(split.loc[split.split == "val", "image_id"])


def test_few_shot_subset_is_stratified_within_train():
    images, annotations = _labelled_set()
    split = make_split(images, annotations, SplitParams(val_fraction=0.2, seed=0, few_shot_train_images=14))
    few = split[split.few_shot]
    assert len(few) == 14 and (few.split == "train").all()
    assert few.dominant_class.value_counts()["class0"] == 8
    with pytest.raises(ValueError, match="few-shot asks for 500"):
        make_split(images, annotations, SplitParams(0.2, 0, few_shot_train_images=500))


def test_split_is_stored_reused_and_rebuilt_when_index_changes(tmp_path):
    layout = StorageLayout(str(tmp_path))
    images, annotations = _labelled_set()
    params = SplitParams(val_fraction=0.25, seed=0)
    first, meta = load_or_create_split(layout, "plates", images, annotations, params)
    assert not meta["reused"] and (tmp_path / "splits" / "plates.parquet").exists()
    assert meta["path"] == split_path(layout, "plates")
    second, meta2 = load_or_create_split(layout, "plates", images, annotations, params)
    assert meta2["reused"] and meta2["fingerprint"] == meta["fingerprint"]
    pd.testing.assert_frame_equal(first, second)
    grown = pd.concat([images, pd.DataFrame({"image_id": ["new0000001"], "width": [10], "height": [10]})])
    third, meta3 = load_or_create_split(layout, "plates", grown, annotations, params)
    assert not meta3["reused"] and len(third) == len(first) + 1
    _, meta4 = load_or_create_split(layout, "plates", grown, annotations, SplitParams(0.3, 0))
    assert not meta4["reused"]


def test_several_few_shot_sizes_are_nested_stratified_subsets_of_train():
    from agssp_pipeline.training.finetune import _regimes

    images, annotations = _labelled_set()
    single = make_split(images, annotations, SplitParams(0.2, 0, few_shot_train_images=14))
    split = make_split(images, annotations, SplitParams(0.2, 0, few_shot_train_images=[14, 28]))
    assert list(single.columns) == ["image_id", "split", "dominant_class", "few_shot"]  # single N: as before
    small, large = split["few_shot_14"], split["few_shot_28"]
    assert small.sum() == 14 and large.sum() == 28 and not (small & ~large).any()  # 14 within 28
    assert (split.loc[large, "split"] == "train").all() and split["few_shot"].equals(small)
    assert split.loc[large, "dominant_class"].value_counts()["class0"] == 16  # 40 : 20 : 10 of 28 (+ remainders)
    assert split["split"].equals(single["split"])  # same val images for every regime
    regimes = _regimes(split, [28, 14])
    assert list(regimes) == ["full", "few14", "few28"] and regimes["few28"].equals(large)
    assert SplitParams(0.2, 0, [28, 14]).as_dict()["few_shot_train_images"] == [14, 28]
    assert SplitParams(0.2, 0, 14).as_dict()["few_shot_train_images"] == 14
    with pytest.raises(ValueError, match="few-shot asks for 500 training images, the train split has"):
        make_split(images, annotations, SplitParams(0.2, 0, few_shot_train_images=[10, 500]))
