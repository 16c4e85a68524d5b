"""Post-fit calibration on the validation split: temperature, operating points, OOD statistics, metrics."""
from __future__ import annotations

import logging

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from ..bundle import Calibration
from ..calibration import OperatingPoint, expected_calibration_error, fit_temperature, operating_points, softmax
from ..ood import MahalanobisOOD
from ..taxonomy import Taxonomy

log = logging.getLogger("dermscreen.training")


def calibrate(logits: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy, target_sensitivity: float = 0.95,
              data: str = "validation") -> tuple[Calibration, list[OperatingPoint]]:
    """Fit the temperature and malignancy operating points on validation (logits, labels); ``data`` names the
    images in the points' descriptions (dermscreen calibrate fits on a user's own)."""
    labels = np.asarray(labels, dtype=int)
    temperature = fit_temperature(logits, labels)
    calibration = Calibration(
        temperature=temperature,
        ece_before=expected_calibration_error(softmax(logits), labels),
        ece_after=expected_calibration_error(softmax(logits, temperature), labels),
    )
    is_mal = taxonomy.malignant_mask[labels]
    points: list[OperatingPoint] = []
    if is_mal.any() and not is_mal.all():
        points = operating_points(taxonomy.p_malignant(softmax(logits, temperature)), is_mal, target_sensitivity, data)
    else:
        log.warning("validation split has only %s images: no malignancy operating points stored",
                    "malignant" if is_mal.all() else "benign")
    return calibration, points


def validation_metrics(logits: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy, temperature: float) -> dict:
    """Balanced accuracy, accuracy, AUCs and NLL of calibrated validation predictions (JSON-ready)."""
    labels = np.asarray(labels, dtype=int)
    probs = softmax(logits, temperature)
    pred = probs.argmax(axis=1)
    present = np.unique(labels)
    out = {
        "split": "val",
        "images": int(len(labels)),
        "classes_present": [taxonomy.codes[i] for i in present],
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "accuracy": float((pred == labels).mean()),
        "nll": float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)))),
    }
    aucs = {}
    for c in present:
        y = labels == c
        if 0 < y.sum() < len(y):
            aucs[taxonomy.codes[c]] = float(roc_auc_score(y, probs[:, c]))
    if aucs:
        out["auc_per_class"] = aucs
        out["macro_auc"] = float(np.mean(list(aucs.values())))
    is_mal = taxonomy.malignant_mask[labels]
    if is_mal.any() and not is_mal.all():
        out["malignant_auc"] = float(roc_auc_score(is_mal, taxonomy.p_malignant(probs)))
    return out


def fit_ood(train_embeddings: np.ndarray, train_labels: np.ndarray) -> MahalanobisOOD:
    """Mahalanobis OOD statistics of the training embeddings (``ood_fit.colour_check`` chooses the thresholds)."""
    n_components = int(min(128, train_embeddings.shape[1], max(2, len(train_embeddings) // 4)))
    return MahalanobisOOD.fit(train_embeddings, train_labels, n_components=n_components)
