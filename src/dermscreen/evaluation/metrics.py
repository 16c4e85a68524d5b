"""Evaluation metrics with bootstrap 95 % confidence intervals, overall and by subgroup.

Point estimates come from scikit-learn (``recall_score``, ``multilabel_confusion_matrix``,
``roc_auc_score``, ``accuracy_score``) and :func:`dermscreen.calibration.expected_calibration_error`.

Confidence intervals are percentile bootstraps that resample whole lesions (or patients, or images:
whatever ``groups`` holds), so the several images of one lesion move together. A resample is a
column of per-image counts, and every metric is evaluated on all resamples at once as a weighted
statistic. Calling scikit-learn once per resample would take minutes per subgroup (each call costs
milliseconds of input validation); the weighted forms here compute exactly what
``roc_auc_score(..., sample_weight=counts)`` and friends compute on each resample, and the tests
check them against scikit-learn resample by resample.

Only classes present in the labels are evaluated: balanced accuracy (the ISIC 2018 metric: mean
per-class recall) averages over them, while predictions may still be any class of the taxonomy.
A metric that is undefined on a set (one class only, no malignant images ...) is left out and its
reason recorded under ``skipped``.
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, multilabel_confusion_matrix, recall_score, roc_auc_score

from ..calibration import OperatingPoint, expected_calibration_error
from ..manifests import Sample
from ..taxonomy import Taxonomy

ECE_BINS = 15  # the default of calibration.expected_calibration_error, which the bootstrap mirrors
AGE_BANDS = ((30, "<30"), (45, "30-44"), (60, "45-59"), (75, "60-74"), (float("inf"), "75+"))
UNKNOWN = "unknown"
ECE_NOTE = ("ECE is biased upward under resampling (duplicated images widen each bin's gap), so its interval "
            "can lie above the point estimate; read it as the spread of ECE, not as a bound on it.")
HEADLINE = ("balanced_accuracy", "accuracy", "macro_auc", "malignant_auc", "melanoma_auc", "ece", "ece_uncalibrated")


# ---- subgroups ---------------------------------------------------------------------------------

def age_band(age: float | None) -> str:
    """Age in years → its band label (``<30``, ``30-44``, ``45-59``, ``60-74``, ``75+``) or ``unknown``."""
    if age is None or np.isnan(age):
        return UNKNOWN
    return next(label for upper, label in AGE_BANDS if age < upper)


def subgroup_columns(samples: Sequence[Sample]) -> dict[str, list[str]]:
    """Per-sample subgroup labels for ``sex``, ``age_band`` and ``site``; attributes unknown for all are left out."""
    columns = {
        "sex": [s.sex or UNKNOWN for s in samples],
        "age_band": [age_band(s.age) for s in samples],
        "site": [s.site or UNKNOWN for s in samples],
    }
    return {name: values for name, values in columns.items() if any(v != UNKNOWN for v in values)}


def _subgroup_order(attribute: str, values: Sequence[str]) -> list[str]:
    present = set(values)
    if attribute == "age_band":
        order = [label for _, label in AGE_BANDS] + [UNKNOWN]
        return [v for v in order if v in present]
    counts = {v: list(values).count(v) for v in present}
    # largest groups first, "unknown" last: the table reads from the best-supported rows down
    return sorted(present, key=lambda v: (v == UNKNOWN, -counts[v], v))


# ---- the data being scored ---------------------------------------------------------------------

@dataclass
class EvalData:
    """Labels and predictions of one evaluation; derived arrays are computed once."""

    y: np.ndarray  # (N,) true class index
    probs: np.ndarray  # (N, C) calibrated probabilities
    taxonomy: Taxonomy
    operating_points: Sequence[OperatingPoint] = ()
    probs_uncalibrated: np.ndarray | None = None
    pred: np.ndarray = field(init=False)
    p_malignant: np.ndarray = field(init=False)
    is_malignant: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.y = np.asarray(self.y, dtype=int)
        self.probs = np.asarray(self.probs, dtype=np.float64)
        if self.probs.shape != (len(self.y), self.taxonomy.num_classes):
            raise ValueError(f"probs must be (N, {self.taxonomy.num_classes}); got {self.probs.shape}")
        self.pred = self.probs.argmax(axis=1)
        self.p_malignant = self.taxonomy.p_malignant(self.probs)
        self.is_malignant = self.taxonomy.malignant_mask[self.y]

    def codes_present(self, idx: np.ndarray) -> list[str]:
        """Taxonomy codes with at least one true label among rows ``idx``, in taxonomy order."""
        present = set(np.unique(self.y[idx]).tolist())
        return [c for i, c in enumerate(self.taxonomy.codes) if i in present]


# ---- point estimates (scikit-learn) -----------------------------------------------------------

def _per_class_point(d: EvalData, idx: np.ndarray, out: dict, skipped: dict) -> None:
    y, pred, probs = d.y[idx], d.pred[idx], d.probs[idx]
    codes = d.taxonomy.codes
    mcm = multilabel_confusion_matrix(y, pred, labels=list(range(len(codes))))
    aucs = []
    for code in d.codes_present(idx):
        c = codes.index(code)
        (tn, fp), (fn, tp) = mcm[c]
        out[f"class.{code}.sensitivity"] = tp / (tp + fn)
        if tn + fp == 0:
            skipped[f"class.{code}.specificity"] = skipped[f"class.{code}.auc"] = f"every image is {code}"
            continue
        out[f"class.{code}.specificity"] = tn / (tn + fp)
        out[f"class.{code}.auc"] = roc_auc_score(y == c, probs[:, c])
        aucs.append(out[f"class.{code}.auc"])
    if aucs:
        out["macro_auc"] = float(np.mean(aucs))
    else:
        skipped["macro_auc"] = "only one class is present"


def _malignancy_point(d: EvalData, idx: np.ndarray, out: dict, skipped: dict) -> None:
    is_mal, p_mal = d.is_malignant[idx], d.p_malignant[idx]
    no_mal, no_ben = not is_mal.any(), is_mal.all()
    if no_mal or no_ben:
        skipped["malignant_auc"] = "no malignant images" if no_mal else "no benign images"
    else:
        out["malignant_auc"] = roc_auc_score(is_mal, p_mal)
    for op in d.operating_points:
        called = p_mal >= op.threshold
        if no_mal:
            skipped[f"op.{op.name}.sensitivity"] = "no malignant images"
        else:
            out[f"op.{op.name}.sensitivity"] = recall_score(is_mal, called, pos_label=True)
        if no_ben:
            skipped[f"op.{op.name}.specificity"] = "no benign images"
        else:
            out[f"op.{op.name}.specificity"] = recall_score(is_mal, called, pos_label=False)


def point_metrics(d: EvalData, idx: np.ndarray) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics on rows ``idx`` → ({metric key: value}, {metric key: why it was skipped})."""
    out: dict[str, float] = {}
    skipped: dict[str, str] = {}
    present = [d.taxonomy.index(c) for c in d.codes_present(idx)]
    out["accuracy"] = accuracy_score(d.y[idx], d.pred[idx])
    out["balanced_accuracy"] = recall_score(d.y[idx], d.pred[idx], labels=present, average="macro", zero_division=0)
    _per_class_point(d, idx, out, skipped)
    _malignancy_point(d, idx, out, skipped)
    if "mel" not in d.taxonomy.codes:
        skipped["melanoma_auc"] = "the taxonomy has no 'mel' class"
    elif "class.mel.auc" in out:
        out["melanoma_auc"] = out["class.mel.auc"]
    else:
        skipped["melanoma_auc"] = skipped.get("class.mel.auc", "no melanoma (mel) images")
    out["ece"] = expected_calibration_error(d.probs[idx], d.y[idx], n_bins=ECE_BINS)
    if d.probs_uncalibrated is not None:
        out["ece_uncalibrated"] = expected_calibration_error(d.probs_uncalibrated[idx], d.y[idx], n_bins=ECE_BINS)
    return {k: float(v) for k, v in out.items()}, skipped


# ---- the same metrics on many weighted resamples at once --------------------------------------

def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``scores`` for boolean ``positive`` per column of ``weights`` (N, B) → (B,), NaN if undefined.

    Equal to ``roc_auc_score(positive, scores, sample_weight=column)``: each positive wins over the
    negatives scored below it and half of those tied with it.
    """
    order = np.argsort(scores, kind="mergesort")
    s, pos, w = scores[order], positive[order], weights[order]
    first_of_tie = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    tie = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1  # tie group of each sorted image
    after_tie = np.r_[first_of_tie[1:], len(s)]
    neg_upto = np.cumsum(w * ~pos[:, None], axis=0)  # row i: negative weight among sorted images 0..i
    rows = np.flatnonzero(pos)
    below = neg_upto[first_of_tie[tie[rows]] - 1]
    below[first_of_tie[tie[rows]] == 0] = 0.0
    through_tie = neg_upto[after_tie[tie[rows]] - 1]
    wins = (w[rows] * (below + through_tie)).sum(axis=0) * 0.5
    return _ratio(wins, w[rows].sum(axis=0) * neg_upto[-1])


def weighted_ece(probs: np.ndarray, y: np.ndarray, weights: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Top-label ECE (binned as calibration.expected_calibration_error) under each column of ``weights`` → (B,)."""
    conf = probs.max(axis=1)
    gap = (probs.argmax(axis=1) == y) - conf
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    per_bin = np.zeros((n_bins, len(y)))
    per_bin[bins, np.arange(len(y))] = gap
    return _ratio(np.abs(per_bin @ weights).sum(axis=0), weights.sum(axis=0))


def _weighted_counts(d: EvalData, idx: np.ndarray, w: np.ndarray, codes: list[str]) -> dict[str, np.ndarray]:
    """Weighted counts behind every rate (hits and totals per class and operating point) in one matrix product."""
    y, pred = d.y[idx], d.pred[idx]
    rows = {"all": np.ones(len(idx), bool), "correct": pred == y}
    for code in codes:
        c = d.taxonomy.index(code)
        rows.update({f"tp.{code}": (y == c) & (pred == c), f"pos.{code}": y == c,
                     f"tn.{code}": (y != c) & (pred != c), f"neg.{code}": y != c})
    is_mal, p_mal = d.is_malignant[idx], d.p_malignant[idx]
    rows.update({"mal": is_mal, "ben": ~is_mal})
    for op in d.operating_points:
        called = p_mal >= op.threshold
        rows.update({f"tp.op.{op.name}": is_mal & called, f"tn.op.{op.name}": ~is_mal & ~called})
    sums = np.stack(list(rows.values())).astype(np.float64) @ w
    return dict(zip(rows, sums))


def weighted_metrics(d: EvalData, idx: np.ndarray, w: np.ndarray, keys: set[str]) -> dict[str, np.ndarray]:
    """The metrics named in ``keys`` (as from :func:`point_metrics`) on rows ``idx`` under weights (len(idx), B)."""
    codes = [c for c in d.taxonomy.codes if f"class.{c}.sensitivity" in keys]
    n = _weighted_counts(d, idx, w, codes)
    out = {"accuracy": _ratio(n["correct"], n["all"])}
    for code in codes:
        out[f"class.{code}.sensitivity"] = _ratio(n[f"tp.{code}"], n[f"pos.{code}"])
        if f"class.{code}.auc" in keys:
            out[f"class.{code}.specificity"] = _ratio(n[f"tn.{code}"], n[f"neg.{code}"])
            c = d.taxonomy.index(code)
            out[f"class.{code}.auc"] = weighted_auc(d.probs[idx, c], d.y[idx] == c, w)
    for op in d.operating_points:
        out[f"op.{op.name}.sensitivity"] = _ratio(n[f"tp.op.{op.name}"], n["mal"])
        out[f"op.{op.name}.specificity"] = _ratio(n[f"tn.op.{op.name}"], n["ben"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN resample is meant to give NaN
        out["balanced_accuracy"] = np.nanmean([out[f"class.{c}.sensitivity"] for c in codes], axis=0)
        aucs = [out[k] for k in out if k.endswith(".auc")]
        if aucs:
            out["macro_auc"] = np.nanmean(aucs, axis=0)
    if "malignant_auc" in keys:
        out["malignant_auc"] = weighted_auc(d.p_malignant[idx], d.is_malignant[idx], w)
    if "melanoma_auc" in keys:
        out["melanoma_auc"] = out["class.mel.auc"]
    out["ece"] = weighted_ece(d.probs[idx], d.y[idx], w)
    if d.probs_uncalibrated is not None:
        out["ece_uncalibrated"] = weighted_ece(d.probs_uncalibrated[idx], d.y[idx], w)
    return {k: v for k, v in out.items() if k in keys}


def bootstrap_weights(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(N, n_boot) per-image counts, one column per resample drawing whole groups with replacement."""
    _, inverse = np.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    # images along axis 0: the sorts and cumulative sums of weighted_auc then run over contiguous rows
    return np.ascontiguousarray(counts.T, dtype=np.float64)[inverse]


def bootstrap(d: EvalData, idx: np.ndarray, groups: np.ndarray, keys: set[str], n_boot: int,
              seed: int, chunk: int = 200) -> dict[str, np.ndarray]:
    """{metric key: (n_boot,) values on group-bootstrap resamples of rows ``idx``} (NaN where undefined)."""
    rng = np.random.default_rng(seed)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_boot, chunk):
        w = bootstrap_weights(groups[idx], min(chunk, n_boot - start), rng)
        parts.append(weighted_metrics(d, idx, w, keys))
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


# ---- putting a scope (everything, or one subgroup) together -------------------------------------

def _with_ci(value: float, samples: np.ndarray | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"value": value, "ci95": None}
    if samples is not None:
        valid = samples[~np.isnan(samples)]
        if len(valid):
            lo, hi = np.percentile(valid, [2.5, 97.5])
            entry["ci95"] = [float(lo), float(hi)]
        entry["resamples"] = int(len(valid))
    return entry


def _nest(d: EvalData, idx: np.ndarray, values: dict, boot: dict | None) -> dict[str, Any]:
    def metric(key: str) -> dict[str, Any]:
        return _with_ci(values[key], boot[key] if boot else None)

    headline = {k: metric(k) for k in HEADLINE if k in values}
    per_class = {}
    for code in d.codes_present(idx):
        stats = {m: metric(f"class.{code}.{m}") for m in ("sensitivity", "specificity", "auc")
                 if f"class.{code}.{m}" in values}
        per_class[code] = {"n": int((d.y[idx] == d.taxonomy.index(code)).sum()), **stats}
    ops = {}
    for op in d.operating_points:
        ops[op.name] = {"threshold": op.threshold,
                        "validation": {"sensitivity": op.sensitivity, "specificity": op.specificity},
                        **{m: metric(f"op.{op.name}.{m}") for m in ("sensitivity", "specificity")
                           if f"op.{op.name}.{m}" in values}}
    return {"headline": headline, "per_class": per_class, "operating_points": ops}


def scope_metrics(d: EvalData, idx: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Point estimates, bootstrap CIs and skip reasons for rows ``idx``, as a JSON-ready dict."""
    values, skipped = point_metrics(d, idx)
    boot = bootstrap(d, idx, groups, set(values), n_boot, seed) if n_boot > 0 else None
    return {
        "n": int(len(idx)),
        "units": int(len(np.unique(groups[idx]))),
        "classes_present": d.codes_present(idx),
        **_nest(d, idx, values, boot),
        "skipped": skipped,
    }


def _scope_seed(seed: int, name: str) -> int:
    # each scope gets its own stream, so a subgroup's CI does not depend on which others were computed
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


def compute_metrics(d: EvalData, groups: Sequence | None = None, subgroups: dict[str, Sequence[str]] | None = None,
                    n_boot: int = 1000, seed: int = 0, min_subgroup: int = 20, unit: str = "image") -> dict[str, Any]:
    """All metrics, overall and for each subgroup, with bootstrap CIs over ``groups`` (one id per row).

    ``subgroups`` maps an attribute (``sex`` ...) to one label per row; subgroups smaller than
    ``min_subgroup`` report their size and why they were skipped.
    """
    n = len(d.y)
    groups_arr = np.asarray(groups if groups is not None else np.arange(n)).astype(str)
    everything = np.arange(n)
    present = d.codes_present(everything)
    result: dict[str, Any] = {
        "classes_evaluated": present,
        "classes_absent": [c for c in d.taxonomy.codes if c not in present],
        "bootstrap": {"resamples": n_boot, "unit": unit, "seed": seed, "interval": "percentile 95%",
                      "note": ECE_NOTE},
        "overall": scope_metrics(d, everything, groups_arr, n_boot, _scope_seed(seed, "overall")),
        "subgroups": {},
    }
    for attribute, labels in (subgroups or {}).items():
        labels_arr = np.asarray(labels).astype(str)
        table = {}
        for value in _subgroup_order(attribute, labels_arr.tolist()):
            idx = np.flatnonzero(labels_arr == value)
            if len(idx) < min_subgroup:
                table[value] = {"n": int(len(idx)), "skipped": f"fewer than {min_subgroup} images"}
                continue
            table[value] = scope_metrics(d, idx, groups_arr, n_boot, _scope_seed(seed, f"{attribute}={value}"))
        result["subgroups"][attribute] = table
    return result
