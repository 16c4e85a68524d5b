from collections import Counter

import pytest

from dermscreen.manifests import LabelledSet, Sample, load_labels
from dermscreen.splits import assert_no_group_leak, grouped_split


@pytest.mark.data
def test_real_split_is_grouped_stratified_and_deterministic(ham_dir):
    data = load_labels(ham_dir / "HAM10000_metadata.csv")
    split = grouped_split(data, 0.15, 0.15, seed=0)
    # no lesion crosses train/val/test
    lesions = {name: {data.samples[i].lesion_id for i in idx} for name, idx in split.items()}
    assert not lesions["train"] & lesions["val"]
    assert not lesions["train"] & lesions["test"]
    assert not lesions["val"] & lesions["test"]
    assert_no_group_leak(data, split)
    # every image used once
    all_idx = sorted(i for idx in split.values() for i in idx)
    assert all_idx == list(range(len(data)))
    # sizes near the fractions and every class in every split (stratified)
    for name, frac in (("val", 0.15), ("test", 0.15)):
        assert abs(len(split[name]) / len(data) - frac) < 0.03
        counts = Counter(data.samples[i].dx for i in split[name])
        assert set(counts) == set(data.taxonomy.codes)
        mel_share = counts["mel"] / len(split[name])
        assert abs(mel_share - 1113 / 10015) < 0.02
    assert grouped_split(data, 0.15, 0.15, seed=0) == split
    assert grouped_split(data, 0.15, 0.15, seed=1) != split


def test_assert_no_group_leak_catches_a_leak(tmp_path):
    samples = [Sample(f"i{k}", tmp_path / f"i{k}.jpg", "nv", lesion_id="L1") for k in range(2)]
    data = LabelledSet(samples)
    with pytest.raises(AssertionError, match="lesion:L1"):
        assert_no_group_leak(data, {"train": [0], "val": [1], "test": []})


def test_patient_grouping_without_lesion_ids(tmp_path):
    samples = [Sample(f"i{k}", tmp_path / "x.jpg", ["nv", "mel"][k % 2], patient_id=f"P{k // 4}") for k in range(80)]
    data = LabelledSet(samples)
    split = grouped_split(data, 0.2, 0.2, seed=3)
    assert_no_group_leak(data, split)
    assert all(split[n] for n in ("train", "val", "test"))


def test_zero_fractions_leave_splits_empty(tmp_path):
    samples = [Sample(f"i{k}", tmp_path / "x.jpg", ["nv", "mel"][k % 2]) for k in range(40)]
    split = grouped_split(LabelledSet(samples), 0.25, 0.0, seed=0)
    assert split["test"] == [] and len(split["val"]) + len(split["train"]) == 40


def test_too_few_images_for_the_fractions_is_a_sentence_naming_the_class(tmp_path):
    from dermscreen.errors import ConfigError

    # 3 classes x 6 images: a 15% test split needs 7 images of one class (sklearn raised a bare ValueError)
    samples = [Sample(f"i{k}", tmp_path / "x.jpg", ["nv", "mel", "bkl"][k % 3]) for k in range(18)]
    with pytest.raises(ConfigError, match=r"test split of 15%.*largest class, '(nv|mel|bkl)', has only 6 images.*"
                                          r"at least 7.*test_fraction"):
        grouped_split(LabelledSet(samples), 0.15, 0.15, seed=0)
    # a larger fraction needs fewer images per class
    split = grouped_split(LabelledSet(samples), 0.3, 0.3, seed=0)
    assert all(split[n] for n in ("train", "val", "test"))
    with pytest.raises(ConfigError, match="validation split"):
        grouped_split(LabelledSet(samples[:5]), 0.15, 0.0, seed=0)
