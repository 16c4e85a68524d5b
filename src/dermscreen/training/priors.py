"""Class-prior correction (logit adjustment) for a model trained under a re-weighted class prior.

A class-balanced sampler (or loss weighting) with power p trains the classifier as if classes had
prior ∝ count^(1-p); its argmax still leans towards frequent classes when p < 1. Subtracting
``tau * log(prior)`` from the logits (Menon et al., "Long-tail learning via logit adjustment", 2021)
moves the decision towards equal per-class recall, which is what balanced accuracy rewards.
tau is chosen on the validation split only; the shift is folded into the classifier bias before
export, so every front end gets it without knowing about it.
"""
from __future__ import annotations

import numpy as np

TAU_GRID = tuple(round(0.125 * k, 3) for k in range(17))  # 0 … 2


def training_prior(labels, num_classes: int, balance: str, power: float) -> np.ndarray:
    """The class distribution the model saw in training: counts re-weighted by count^-power (sampler/loss)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(np.float64)
    counts = np.maximum(counts, 1.0)  # an absent class must not give log(0)
    if balance in ("sampler", "loss"):
        counts = counts ** (1.0 - power)
    return counts / counts.sum()


def balanced_accuracy(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``labels`` (sklearn's balanced_accuracy_score, vectorised)."""
    labels = np.asarray(labels, dtype=int)
    hits = np.bincount(labels[pred == labels], minlength=num_classes)
    totals = np.bincount(labels, minlength=num_classes)
    present = totals > 0
    return float(np.mean(hits[present] / totals[present]))


def choose_tau(logits: np.ndarray, labels: np.ndarray, prior: np.ndarray, setting: str | float,
               max_ece: float | None = None) -> tuple[float, dict[float, float]]:
    """(tau, validation balanced accuracy for each tau tried) for ``setting`` ("auto" | "none" | a number).

    With ``max_ece``, "auto" only accepts a tau whose shifted logits can still be calibrated (temperature
    scaling) to an ECE of at most ``max_ece``: the correction moves probabilities away from the class
    frequencies the validation set really has, and calibrated probabilities matter more than the argmax.
    """
    from ..calibration import expected_calibration_error, fit_temperature, softmax

    labels = np.asarray(labels, dtype=int)
    log_prior = np.log(prior)
    if setting == "none":
        grid: tuple[float, ...] = (0.0,)
    elif setting == "auto":
        grid = TAU_GRID
    else:
        grid = (float(setting),)
    scores, allowed = {}, []
    for tau in grid:
        shifted = logits - tau * log_prior
        scores[tau] = balanced_accuracy(labels, shifted.argmax(1), logits.shape[1])
        if setting != "auto" or max_ece is None or tau == 0.0:
            allowed.append(tau)
        elif expected_calibration_error(softmax(shifted, fit_temperature(shifted, labels)), labels) <= max_ece:
            allowed.append(tau)
    # the smallest tau among the best: the least change to the trained model that reaches the score
    best = max(scores[t] for t in allowed)
    tau = min(t for t in allowed if scores[t] >= best - 1e-12)
    return float(tau), scores


def shift(prior: np.ndarray, tau: float) -> np.ndarray:
    """The additive logit shift for ``tau``: ``-tau * log(prior)`` (float32)."""
    return (-tau * np.log(prior)).astype(np.float32)
