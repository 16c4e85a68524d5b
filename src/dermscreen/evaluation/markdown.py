"""metrics.json → ``metrics.md``: the tables a model card needs (headline, per class, operating points,
subgroups), each value with its 95 % CI, ready to paste into docs/model-card.md or your own card."""
from __future__ import annotations

from typing import Any

from .. import DISCLAIMER

HEADLINE = ("balanced_accuracy", "accuracy", "macro_auc", "malignant_auc", "melanoma_auc", "ece", "ece_uncalibrated")
SUBGROUP_COLUMNS = ("balanced_accuracy", "malignant_auc", "melanoma_auc", "ece")


def fmt(entry: dict | None) -> str:
    """'0.551 (0.474–0.629)' for a {value, ci95} entry; '—' when absent."""
    if not entry or entry.get("value") is None:
        return "—"
    ci = entry.get("ci95")
    return f"{entry['value']:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(metrics: dict) -> str:
    """Markdown tables of an evaluation's metrics.json content."""
    overall = metrics["overall"]
    data = metrics.get("data", {})
    split = data.get("split") or {}
    model = metrics.get("model", {})
    parts = [f"Model `{model.get('name')}` {model.get('version', '')} (sha256 {str(model.get('sha256', ''))[:12]}), "
             f"{overall['n']} images" + (f" of split `{split.get('split')}` ({split.get('file')})" if split
                                         else f" ({data['selection']})" if data.get("selection") else "")
             + f", TTA {'on' if metrics.get('settings', {}).get('tta') else 'off'}; " + _ci_method(metrics)]
    parts += [f"> **Warning:** {w}" for w in metrics.get("warnings", [])]
    parts.append(f"*{DISCLAIMER}*")
    parts.append(_table(["metric", "value (95 % CI)"],
                        [[k, fmt(overall["headline"].get(k))] for k in HEADLINE if k in overall["headline"]]))
    parts.append(_table(["class", "n", "sensitivity", "specificity", "AUC"],
                        [[code, c["n"], fmt(c.get("sensitivity")), fmt(c.get("specificity")), fmt(c.get("auc"))]
                         for code, c in overall["per_class"].items()]))
    points = overall.get("operating_points") or {}
    if points:
        rows = []
        for name, p in points.items():
            val = p.get("validation") or {}
            rows.append([name, f"{p['threshold']:.4f}",
                         f"{val.get('sensitivity', float('nan')):.3f} / {val.get('specificity', float('nan')):.3f}",
                         fmt(p.get("sensitivity")), fmt(p.get("specificity"))])
        parts.append(_table(["operating point (P(malignant) ≥ t)", "t", "validation sens / spec",
                             "sensitivity", "specificity"], rows))
    sub_rows = []
    for attribute, groups in (metrics.get("subgroups") or {}).items():
        for value, g in groups.items():
            h = g.get("headline", {})
            sub_rows.append([f"{attribute}: {value}", g["n"], *(fmt(h.get(k)) for k in SUBGROUP_COLUMNS)])
    if sub_rows:
        parts.append(_table(["subgroup", "n", *SUBGROUP_COLUMNS], sub_rows))
    ood = metrics.get("ood") or {}
    if ood.get("available"):
        parts.append(f"In distribution (OOD score ≤ threshold {ood['threshold']:.4g}): {ood['in_distribution']} of "
                     f"{overall['n']} ({100 * ood['share_in_distribution']:.1f} %).")
    return "\n\n".join(parts) + "\n"


def _ci_method(metrics: dict[str, Any]) -> str:
    """How the CIs were made, as the evaluation made them (resampled unit; none when the bootstrap was off)."""
    boot = metrics.get("bootstrap", {})
    if not boot.get("resamples"):
        return "no confidence intervals (bootstrap off)."
    return f"95 % CIs from {boot['resamples']} bootstrap resamples by {boot.get('unit', 'image')}."
