"""Temperature scaling, expected calibration error and malignancy operating points (numpy only)."""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

# scipy and sklearn are imported inside the two fitting functions: the serving path imports this
# module (OperatingPoint, softmax) and must start fast; importing them costs seconds on 2 cores.


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    p = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T in [0.05, 20] minimising validation NLL of softmax(logits / T)."""
    labels = np.asarray(labels, dtype=int)
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(res.x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al. 2017)."""
    probs = np.asarray(probs)
    labels = np.asarray(labels, dtype=int)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


class OperatingPoint(BaseModel):
    """A threshold on P(malignant) with the sensitivity/specificity it achieved on validation."""

    name: str
    threshold: float = Field(ge=0, le=1, allow_inf_nan=False)  # a probability (checked when a bundle is read)
    sensitivity: float = Field(ge=0, le=1)
    specificity: float = Field(ge=0, le=1)
    description: str = ""


def operating_points(p_malignant: np.ndarray, is_malignant: np.ndarray, target_sensitivity: float = 0.95,
                     data: str = "validation") -> list[OperatingPoint]:
    """Sensitivity-first (highest specificity with sensitivity >= target) and balanced (Youden J) points.

    A case is called positive when P(malignant) >= threshold. ``data`` names the images in the descriptions.
    """
    y = np.asarray(is_malignant, dtype=int)
    s = np.asarray(p_malignant, dtype=np.float64)
    if y.min() == y.max():
        raise ValueError("operating points need both malignant and benign validation images")
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    thr = np.clip(thr, 0.0, 1.0)  # roc_curve's first threshold is +inf
    ok = np.flatnonzero(tpr >= target_sensitivity)
    i_sens = ok[np.argmin(fpr[ok])]  # among those, the lowest false-positive rate
    i_youden = int(np.argmax(tpr - fpr))
    return [
        OperatingPoint(
            name="sensitivity_first",
            threshold=float(thr[i_sens]),
            sensitivity=float(tpr[i_sens]),
            specificity=float(1 - fpr[i_sens]),
            description=f"Refer when P(malignant) >= threshold; chosen for >= {target_sensitivity:.0%} sensitivity on "
                        f"{data}.",
        ),
        OperatingPoint(
            name="balanced",
            threshold=float(thr[i_youden]),
            sensitivity=float(tpr[i_youden]),
            specificity=float(1 - fpr[i_youden]),
            description=f"Maximises sensitivity + specificity (Youden's J) on {data}.",
        ),
    ]
