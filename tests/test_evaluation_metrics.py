"""Metrics on synthetic predictions with known answers; the bootstrap engine against scikit-learn."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score

from dermscreen.calibration import OperatingPoint, expected_calibration_error
from dermscreen.evaluation.metrics import (
    EvalData, age_band, bootstrap_weights, compute_metrics, point_metrics, subgroup_columns, weighted_auc,
    weighted_ece, weighted_metrics,
)
from dermscreen.manifests import Sample
from dermscreen.taxonomy import HAM10000, DiagnosisClass, Taxonomy

CODES = HAM10000.codes
OPS = [OperatingPoint(name="sensitivity_first", threshold=0.2, sensitivity=0.95, specificity=0.5),
       OperatingPoint(name="balanced", threshold=0.5, sensitivity=0.8, specificity=0.8)]
BINARY = Taxonomy(name="binary", classes=[DiagnosisClass(code="benign", name="Benign", group="benign"),
                                          DiagnosisClass(code="cancer", name="Cancer", group="malignant")])


def _confident(y: np.ndarray, predicted: np.ndarray, num_classes: int = 7, top: float = 0.94) -> np.ndarray:
    """Probabilities putting ``top`` on ``predicted`` and spreading the rest evenly."""
    probs = np.full((len(y), num_classes), (1 - top) / (num_classes - 1))
    probs[np.arange(len(y)), predicted] = top
    return probs


def _noisy(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, n)
    logits = rng.normal(0, 1, (n, 7))
    logits[np.arange(n), y] += 1.2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, np.round(probs, 3) / np.round(probs, 3).sum(axis=1, keepdims=True)  # rounding makes ties


def test_perfect_classifier_scores_one_with_degenerate_ci():
    y = np.repeat(np.arange(7), 20)
    d = EvalData(y, _confident(y, y), HAM10000, OPS)
    m = compute_metrics(d, n_boot=200)["overall"]
    for key in ("balanced_accuracy", "accuracy", "macro_auc", "malignant_auc", "melanoma_auc"):
        assert m["headline"][key]["value"] == 1.0
        assert m["headline"][key]["ci95"] == [1.0, 1.0]
    for code in CODES:
        assert m["per_class"][code]["sensitivity"]["value"] == 1.0
        assert m["per_class"][code]["specificity"]["value"] == 1.0
        assert m["per_class"][code]["n"] == 20
    assert m["operating_points"]["balanced"]["sensitivity"]["value"] == 1.0
    assert m["operating_points"]["balanced"]["specificity"]["value"] == 1.0
    assert m["skipped"] == {}


def test_reversed_scores_give_auc_zero():
    y = np.array([0] * 30 + [1] * 20)
    probs = np.where(y[:, None] == 1, [0.9, 0.1], [0.1, 0.9])  # always the wrong class, confidently
    m = compute_metrics(EvalData(y, probs, BINARY, OPS), n_boot=100)["overall"]
    assert m["headline"]["malignant_auc"]["value"] == 0.0
    assert m["per_class"]["cancer"]["auc"]["value"] == 0.0
    assert m["headline"]["balanced_accuracy"]["value"] == 0.0
    assert m["operating_points"]["balanced"]["sensitivity"]["value"] == 0.0
    assert m["skipped"]["melanoma_auc"] == "the taxonomy has no 'mel' class"


def test_point_estimates_match_sklearn():
    y, probs = _noisy()
    d = EvalData(y, probs, HAM10000, OPS)
    values, _ = point_metrics(d, np.arange(len(y)))
    pred = probs.argmax(axis=1)
    assert values["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    mal = HAM10000.malignant_mask[y]
    assert values["malignant_auc"] == pytest.approx(roc_auc_score(mal, HAM10000.p_malignant(probs)))
    assert values["melanoma_auc"] == pytest.approx(roc_auc_score(y == 4, probs[:, 4]))
    assert values["ece"] == pytest.approx(expected_calibration_error(probs, y))


def test_ci_contains_point_estimate_and_is_seeded():
    y, probs = _noisy()
    d = EvalData(y, probs, HAM10000, OPS, probs_uncalibrated=probs ** 1.3 / (probs ** 1.3).sum(1, keepdims=True))
    groups = np.arange(len(y)) // 2  # two images per "lesion"
    a = compute_metrics(d, groups, n_boot=300, seed=1)["overall"]
    b = compute_metrics(d, groups, n_boot=300, seed=1)["overall"]
    c = compute_metrics(d, groups, n_boot=300, seed=2)["overall"]
    # ECE is left out: it is biased upward under resampling (duplicates widen each bin's gap), so its
    # percentile interval may sit above the point estimate; metrics.json says so
    entries = [v for k, v in a["headline"].items() if not k.startswith("ece")]
    entries += [s for pc in a["per_class"].values() for k, s in pc.items() if k != "n"]
    entries += [op[m] for op in a["operating_points"].values() for m in ("sensitivity", "specificity")]
    for entry in entries:
        lo, hi = entry["ci95"]
        assert lo <= entry["value"] <= hi
        assert hi - lo < 0.35  # ~85 images per class: wide, but not vacuous
    assert a["headline"]["ece"]["ci95"][1] >= a["headline"]["ece"]["value"]
    assert a == b
    assert a["headline"]["macro_auc"]["ci95"] != c["headline"]["macro_auc"]["ci95"]


def test_weighted_engine_equals_sklearn_on_each_resample():
    y, probs = _noisy(n=300, seed=3)
    d = EvalData(y, probs, HAM10000, OPS)
    idx = np.arange(len(y))
    values, _ = point_metrics(d, idx)
    unit = weighted_metrics(d, idx, np.ones((len(y), 1)), set(values))
    for key, value in values.items():
        assert unit[key][0] == pytest.approx(value, abs=1e-12), key
    w = bootstrap_weights(np.arange(len(y)) // 3, 5, np.random.default_rng(0))
    boot = weighted_metrics(d, idx, w, set(values))
    for b in range(w.shape[1]):
        rows = np.repeat(idx, w[:, b].astype(int))
        assert boot["class.mel.auc"][b] == pytest.approx(roc_auc_score(y == 4, probs[:, 4], sample_weight=w[:, b]))
        assert boot["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(y[rows], probs[rows].argmax(1)))
        assert boot["ece"][b] == pytest.approx(expected_calibration_error(probs[rows], y[rows]))
        called = HAM10000.p_malignant(probs[rows]) >= 0.5
        mal = HAM10000.malignant_mask[y[rows]]
        assert boot["op.balanced.specificity"][b] == pytest.approx(recall_score(mal, called, pos_label=False))


def test_weighted_auc_handles_ties_and_undefined_rows():
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.5])
    positive = np.array([False, True, False, True, False])
    w = np.array([[1, 1, 1, 1, 1], [2, 0, 1, 3, 1], [1, 0, 1, 0, 1]], dtype=float).T  # one column per resample
    got = weighted_auc(scores, positive, w)
    assert got[0] == pytest.approx(roc_auc_score(positive, scores))
    assert got[1] == pytest.approx(roc_auc_score(positive, scores, sample_weight=w[:, 1]))
    assert np.isnan(got[2])  # no positive image drawn
    assert weighted_ece(np.array([[0.7, 0.3]]), np.array([0]), np.ones((1, 1)))[0] == pytest.approx(0.3)


def test_bootstrap_keeps_lesions_together():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    w = bootstrap_weights(groups, 50, np.random.default_rng(0))
    assert w.shape == (6, 50)
    assert (w[0] == w[1]).all() and (w[3] == w[5]).all()
    group_draws = w[0] + w[2] + w[3]  # one image per group
    assert (group_draws == 3).all()


def test_subset_of_classes_is_evaluated_on_present_classes():
    bkl, mel, nv, bcc = (CODES.index(c) for c in ("bkl", "mel", "nv", "bcc"))
    y = np.array([nv] * 10 + [mel] * 10 + [bkl] * 10)
    pred = y.copy()
    pred[:5] = bcc  # half the nevi called bcc, an absent class: still errors
    pred[10:12] = nv
    m = compute_metrics(EvalData(y, _confident(y, pred), HAM10000, OPS), n_boot=50)
    assert m["classes_evaluated"] == ["bkl", "mel", "nv"]
    assert m["classes_absent"] == ["akiec", "bcc", "df", "vasc"]
    overall = m["overall"]
    assert set(overall["per_class"]) == {"bkl", "mel", "nv"}
    assert overall["headline"]["balanced_accuracy"]["value"] == pytest.approx((0.5 + 0.8 + 1.0) / 3)
    assert overall["per_class"]["nv"]["sensitivity"]["value"] == 0.5
    assert "macro_auc" in overall["headline"]


def test_single_class_set_skips_undefined_metrics_with_reasons():
    y = np.full(30, CODES.index("nv"))
    m = compute_metrics(EvalData(y, _confident(y, y), HAM10000, OPS), n_boot=20)["overall"]
    assert m["skipped"]["malignant_auc"] == "no malignant images"
    assert m["skipped"]["macro_auc"] == "only one class is present"
    assert m["skipped"]["class.nv.auc"] == "every image is nv"
    assert m["skipped"]["op.balanced.sensitivity"] == "no malignant images"
    assert m["skipped"]["melanoma_auc"] == "no melanoma (mel) images"
    assert "sensitivity" not in m["operating_points"]["balanced"]
    assert m["operating_points"]["balanced"]["specificity"]["value"] == 1.0


def test_subgroup_breakdown_reports_n_and_skips_small_groups():
    y = np.array([0, 1] * 40)
    right = _confident(y, y, num_classes=2)
    wrong = _confident(y, 1 - y, num_classes=2)
    sex = np.array(["female"] * 40 + ["male"] * 30 + ["unknown"] * 10)
    probs = np.where((sex == "female")[:, None], right, wrong)
    m = compute_metrics(EvalData(y, probs, BINARY, OPS), subgroups={"sex": sex.tolist()}, n_boot=50,
                        min_subgroup=20)
    table = m["subgroups"]["sex"]
    assert list(table) == ["female", "male", "unknown"]
    assert table["female"]["n"] == 40 and table["female"]["headline"]["balanced_accuracy"]["value"] == 1.0
    assert table["male"]["n"] == 30 and table["male"]["headline"]["malignant_auc"]["value"] == 0.0
    assert table["unknown"] == {"n": 10, "skipped": "fewer than 20 images"}
    json.dumps(m, allow_nan=False)


def test_age_bands_and_subgroup_columns(tmp_path):
    assert [age_band(a) for a in (None, 5, 29.9, 30, 44, 45, 60, 74.5, 75, 90)] == [
        "unknown", "<30", "<30", "30-44", "30-44", "45-59", "60-74", "60-74", "75+", "75+"]
    samples = [Sample("a", tmp_path / "a.jpg", "nv", age=50, sex="male"), Sample("b", tmp_path / "b.jpg", "mel")]
    cols = subgroup_columns(samples)
    assert cols == {"sex": ["male", "unknown"], "age_band": ["45-59", "unknown"]}  # no site known: left out


def test_probs_shape_is_checked():
    with pytest.raises(ValueError, match="probs must be"):
        EvalData(np.array([0, 1]), np.ones((2, 3)) / 3, HAM10000)


@pytest.mark.parametrize("data_format, source, ham", [
    ("ham10000", "data/HAM10000_metadata.csv", True),
    ("isic", "ISIC2018_Task3_Training_GroundTruth.csv", True),
    ("plain", "my_clinic/labels.csv", False),  # the HAM10000 codes do not make the images HAM10000's
])
def test_model_card_claims_the_ham10000_licence_only_for_ham10000_data(data_format, source, ham):
    pytest.importorskip("torch")  # training.export imports torch
    from dermscreen.training.export import HAM_CITATION, build_card

    summary = {"source": source, "images": 40, "groups": 20, "class_counts": {"mel": 20, "nv": 20}}
    card = build_card(summary, data_format, 96)
    assert ("CC BY-NC-SA" in card.licence) is ham and ("HAM10000" in card.licence) is ham
    assert (card.citation == HAM_CITATION) is ham
    if not ham:
        assert card.citation == "" and "owner" in card.licence and "Fill it in" in card.licence
    assert "40 images of 20 lesions" in card.training_data  # a summary without grouped_by: HAM-style lesions
    card = build_card({**summary, "grouped_by": "images", "groups": 40}, data_format, 96)
    assert "lesions" not in card.training_data and "each image was split on its own" in card.training_data


@pytest.mark.parametrize("main_format, extra_formats, other_data", [
    ("plain", ["ham10000"], True),  # own CSV + HAM10000 as extra_train (configs/default-3x3.yaml on your data)
    ("plain", ["isic"], True),
    ("ham10000", ["ham10000"], False),  # both copies of HAM10000: the shipped recipe
    ("ham10000", ["plain"], True),  # HAM10000 + your own images as extra_train
])
def test_model_card_inherits_the_ham10000_licence_from_extra_training_manifests(main_format, extra_formats,
                                                                              other_data):
    pytest.importorskip("torch")
    from dermscreen.training.export import HAM_CITATION, build_card

    summary = {"source": "my_clinic/labels.csv", "images": 40, "groups": 20, "class_counts": {"mel": 20, "nv": 20}}
    card = build_card(summary, main_format, 96, extra_training="It was split by lesion ...",
                      extra_formats=extra_formats)
    assert "CC BY-NC-SA 4.0" in card.licence and "non-commercial" in card.licence and "HAM10000" in card.licence
    assert card.citation == HAM_CITATION
    assert ("owner must state" in card.licence and "Fill it in" in card.licence) is other_data
    assert ("HAM10000 images (extra_train)" in card.training_data) is (main_format == "plain")
    # an extra manifest that gave no training image does not change the card
    assert build_card(summary, main_format, 96, extra_formats=[]) == build_card(summary, main_format, 96)


def test_model_card_counts_only_extra_manifests_that_gave_training_images():
    pytest.importorskip("torch")
    from types import SimpleNamespace as NS

    from dermscreen.training.finish import _contributing_formats

    ham = NS(format="ham10000", samples=[NS(image_id="a"), NS(image_id="b")])
    plain = NS(format="plain", samples=[NS(image_id="b"), NS(image_id="c")])
    assert _contributing_formats([ham, plain], [NS(image_id="a")]) == ["ham10000"]
    assert _contributing_formats([ham, plain], [NS(image_id="b")]) == ["ham10000"]  # the first copy was kept
    assert _contributing_formats([ham, plain], [NS(image_id="b"), NS(image_id="c")]) == ["ham10000", "plain"]
    assert _contributing_formats([ham, None], []) == []
    assert _contributing_formats([None], [NS(image_id="z")]) == ["plain"]  # no longer loads: licence unknown
