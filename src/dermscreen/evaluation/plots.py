"""Evaluation plots as PNG bytes: confusion matrix, ROC curves, reliability diagram.

Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas, no pyplot state, no display),
so plotting is safe in servers and threads; callers decide whether the bytes go to a file or inline
into the HTML report.
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from .metrics import ECE_BINS, EvalData

_DPI = 110


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    return buf.getvalue()


def _matrix_panel(ax, matrix: np.ndarray, rows: list[str], cols: list[str], title: str, fmt: str) -> None:
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(float(np.nanmax(matrix)), 1e-9))
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = np.nanmax(matrix) if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                color="white" if top and v > 0.6 * top else "black")


def confusion_matrix_png(d: EvalData) -> bytes:
    """Confusion matrix of ``d`` (rows: classes present in the labels; columns: every class) → PNG bytes."""
    codes = d.taxonomy.codes
    cm = confusion_matrix(d.y, d.pred, labels=list(range(len(codes))))
    present = d.codes_present(np.arange(len(d.y)))
    rows = cm[[codes.index(c) for c in present]]
    normalised = rows / rows.sum(axis=1, keepdims=True)
    fig = Figure(figsize=(11, 4.6))
    ax_counts, ax_norm = fig.subplots(1, 2)
    _matrix_panel(ax_counts, rows, present, codes, "Counts", "d")
    _matrix_panel(ax_norm, normalised, present, codes, "Row-normalised (recall on the diagonal)", ".2f")
    return _png(fig)


def _class_roc_panel(ax, d: EvalData) -> None:
    for c, code in enumerate(d.taxonomy.codes):
        positive = d.y == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, d.probs[:, c])
        ax.plot(fpr, tpr, lw=1.3, label=f"{code} (AUC {roc_auc_score(positive, d.probs[:, c]):.3f})")
    ax.set_title("Each class vs the rest")


def _malignant_roc_panel(ax, d: EvalData) -> None:
    ax.set_title("Malignant vs benign: P(malignant)")
    if d.is_malignant.all() or not d.is_malignant.any():
        ax.text(0.5, 0.5, "undefined: the labels hold only one group", ha="center", va="center")
        return
    fpr, tpr, _ = roc_curve(d.is_malignant, d.p_malignant)
    ax.plot(fpr, tpr, color="black", lw=1.6, label=f"AUC {roc_auc_score(d.is_malignant, d.p_malignant):.3f}")
    markers = iter("osD^v<>")
    for op in d.operating_points:
        called = d.p_malignant >= op.threshold
        sens = called[d.is_malignant].mean()
        spec = (~called[~d.is_malignant]).mean()
        ax.plot(1 - spec, sens, next(markers, "o"), ms=8,
                label=f"{op.name} (t={op.threshold:.3f}): sens {sens:.2f}, spec {spec:.2f}")


def roc_png(d: EvalData) -> bytes:
    """ROC curves: one-vs-rest per class, and malignant-vs-benign with the stored operating points → PNG bytes."""
    fig = Figure(figsize=(11, 4.8))
    axes = fig.subplots(1, 2)
    _class_roc_panel(axes[0], d)
    _malignant_roc_panel(axes[1], d)
    for ax in axes:
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("1 - specificity (false-positive rate)")
        ax.set_ylabel("sensitivity (true-positive rate)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=7)
    return _png(fig)


def _reliability(probs: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy, count (bins as calibration.expected_calibration_error)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / count
    return mean_conf, accuracy, count


def reliability_png(d: EvalData, ece: float | None = None, ece_uncalibrated: float | None = None) -> bytes:
    """Reliability diagram (top-label confidence vs accuracy) before and after temperature scaling → PNG bytes."""
    fig = Figure(figsize=(5.6, 6.2))
    ax, ax_hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect calibration")
    curves = [("after temperature", d.probs, ece, "tab:blue")]
    if d.probs_uncalibrated is not None:
        curves.insert(0, ("before (T = 1)", d.probs_uncalibrated, ece_uncalibrated, "tab:orange"))
    width = 1.0 / ECE_BINS
    for i, (name, probs, value, colour) in enumerate(curves):
        mean_conf, accuracy, count = _reliability(probs, d.y, ECE_BINS)
        keep = count > 0
        label = name if value is None else f"{name}, ECE {value:.3f}"
        ax.plot(mean_conf[keep], accuracy[keep], "o-", color=colour, label=label)
        centres = (np.arange(ECE_BINS) + 0.5) * width + (i - 0.5) * width / 2.5
        ax_hist.bar(centres, count, width=width / 2.5, color=colour)
    ax.set_ylabel("accuracy of the top class")
    ax.set_ylim(0, 1.01)
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    ax_hist.set_xlabel("confidence of the top class")
    ax_hist.set_ylabel("images")
    ax_hist.set_xlim(0, 1)
    return _png(fig)
