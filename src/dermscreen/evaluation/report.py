"""A one-page, self-contained HTML evaluation report (inline CSS, plots as data URLs, nothing fetched)."""
from __future__ import annotations

import base64
from html import escape
from typing import Any

from ..taxonomy import Taxonomy
from .metrics import ECE_NOTE

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1c2430;max-width:1120px;
margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5dbe3}
.muted{color:#5b6675}.warn{background:#fff4d6;border:1px solid #e6c35c;padding:10px 14px;border-radius:6px}
table{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d5dbe3;padding:4px 9px;text-align:right}th{background:#f1f4f8}
td:first-child,th:first-child{text-align:left}.ci{color:#5b6675;font-size:12px}
.skip{color:#8a5a00;font-style:italic}img{max-width:100%;border:1px solid #e3e7ee;margin:6px 0}
.kv td{text-align:left}.kv td:first-child{background:#f1f4f8}code{font-size:12px;word-break:break-all}
.grid{display:flex;gap:16px;flex-wrap:wrap}
"""

_HEADLINE_NAMES = {
    "balanced_accuracy": "Balanced accuracy (mean per-class recall, ISIC 2018)",
    "accuracy": "Accuracy",
    "macro_auc": "Macro AUC (one-vs-rest, classes present)",
    "malignant_auc": "Malignant vs benign AUC (P(malignant))",
    "melanoma_auc": "Melanoma AUC",
    "ece": "ECE after temperature scaling",
    "ece_uncalibrated": "ECE before temperature scaling",
}


def _fmt(entry: dict | None) -> str:
    if not entry:
        return '<span class="skip">n/a</span>'
    ci = entry.get("ci95")
    ci_text = f' <span class="ci">[{ci[0]:.3f}, {ci[1]:.3f}]</span>' if ci else ""
    return f"{entry['value']:.3f}{ci_text}"


def _table(header: list[str] | None, rows: list[list[str]]) -> str:
    """An HTML table; cells are trusted HTML (escape before), ``header=None`` gives a key-value table."""
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    css = "" if header else ' class="kv"'
    return f"<table{css}>{head}<tbody>{body}</tbody></table>"


def _model_section(m: dict[str, Any]) -> str:
    rows = [["Name", escape(m["model"]["name"])], ["Version", escape(m["model"]["version"])],
            ["Bundle sha256", f"<code>{escape(m['model']['sha256'])}</code>"],
            ["Backbone", escape(m["model"]["backbone"])], ["Temperature", f"{m['model']['temperature']:.3f}"],
            ["Source", f"<code>{escape(m['model']['source'])}</code>"], ["Licence", escape(m["model"]["licence"])]]
    return "<h2>Model</h2>" + _table(None, rows)


def _data_section(m: dict[str, Any], taxonomy_names: dict[str, str]) -> str:
    data = m["data"]
    rows = [["Labels", f"<code>{escape(str(data['source']))}</code> ({escape(data['format'])})"],
            ["Images", str(data["images"])], [f"Independent units ({escape(m['bootstrap']['unit'])}s)",
                                               str(m["overall"]["units"])]]
    if data.get("split"):
        s = data["split"]
        rows.append(["Split", f"{escape(s['split'])} of <code>{escape(s['file'])}</code>: {s['evaluated']} of "
                              f"{s['listed']} listed images ({s['missing_from_labels']} not in the labels)"])
    if m["ood"].get("available"):
        rows.append(["Inside the training distribution",
                     f"{m['ood']['share_in_distribution']:.1%} (OOD threshold {m['ood']['threshold']:.3g})"])
    counts = [[escape(c), escape(taxonomy_names.get(c, c)), str(n)] for c, n in data["class_counts"].items()]
    note = ""
    if m["classes_absent"]:
        note = (f'<p class="warn">Evaluated on the classes present in the labels only: '
                f'{escape(", ".join(m["classes_evaluated"]))}. Absent, not evaluated: '
                f'{escape(", ".join(m["classes_absent"]))}. Predictions may still name an absent class.</p>')
    return "<h2>Data</h2>" + _table(None, rows) + note + _table(["Code", "Class", "Images"], counts)


def _headline_section(overall: dict[str, Any]) -> str:
    rows = [[escape(_HEADLINE_NAMES[k]), _fmt(v)] for k, v in overall["headline"].items()]
    rows += [[escape(k), f'<span class="skip">skipped: {escape(r)}</span>'] for k, r in overall["skipped"].items()
             if k in _HEADLINE_NAMES]
    return ("<h2>Headline metrics</h2>" + _table(["Metric", "Value [95% CI]"], rows)
            + f'<p class="muted">{escape(ECE_NOTE)}</p>')


def _per_class_section(overall: dict[str, Any], taxonomy_names: dict[str, str]) -> str:
    rows = [[escape(code), escape(taxonomy_names.get(code, code)), str(s["n"]), _fmt(s.get("sensitivity")),
             _fmt(s.get("specificity")), _fmt(s.get("auc"))] for code, s in overall["per_class"].items()]
    return "<h2>Per class</h2>" + _table(["Code", "Class", "n", "Sensitivity", "Specificity", "AUC"], rows)


def _operating_points_section(overall: dict[str, Any]) -> str:
    rows = [[escape(name), f"{op['threshold']:.4f}", f"{op['validation']['sensitivity']:.3f}",
             f"{op['validation']['specificity']:.3f}", _fmt(op.get("sensitivity")), _fmt(op.get("specificity"))]
            for name, op in overall["operating_points"].items()]
    if not rows:
        return "<h2>Operating points</h2><p>This bundle stores no operating points.</p>"
    return ("<h2>Operating points (refer when P(malignant) &ge; threshold)</h2>"
            + _table(["Name", "Threshold", "Val. sens.", "Val. spec.", "Sensitivity here", "Specificity here"], rows))


def _subgroup_rows(attribute: str, table: dict[str, Any], ops: list[str]) -> list[list[str]]:
    rows = []
    for value, s in table.items():
        label = [escape(attribute), escape(value), str(s["n"])]
        if "headline" not in s:
            rows.append(label + [f'<span class="skip">{escape(s["skipped"])}</span>'] + [""] * (2 + 2 * len(ops)))
            continue
        h, o = s["headline"], s["operating_points"]
        rows.append(label + [_fmt(h.get("balanced_accuracy")), _fmt(h.get("malignant_auc")), _fmt(h.get("ece"))]
                    + [_fmt(o[name].get(m)) for name in ops for m in ("sensitivity", "specificity")])
    return rows


def _subgroup_section(m: dict[str, Any]) -> str:
    if not m["subgroups"]:
        return "<h2>Subgroups</h2><p>The labels carry no sex, age or site.</p>"
    ops = list(m["overall"]["operating_points"])
    header = ["Attribute", "Group", "n", "Balanced acc.", "Malignant AUC", "ECE"]
    header += [f"{name} {x}" for name in ops for x in ("sens.", "spec.")]
    rows = [row for attribute, table in m["subgroups"].items() for row in _subgroup_rows(attribute, table, ops)]
    return "<h2>Subgroups</h2>" + _table(header, rows)


def _plots_section(plots: dict[str, bytes]) -> str:
    imgs = "".join(
        f'<img alt="{escape(name.replace("_", " "))}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in plots.items())
    return f'<h2>Plots</h2><div class="grid">{imgs}</div>'


def _header(metrics: dict[str, Any]) -> str:
    boot, model = metrics["bootstrap"], metrics["model"]
    ci = (f"95% CIs: percentile bootstrap, {boot['resamples']} resamples of {escape(boot['unit'])}s "
          f"(seed {boot['seed']})" if boot["resamples"] else "no confidence intervals (bootstrap off)")
    return (f"<h1>Evaluation of {escape(model['name'])} {escape(model['version'])}</h1>"
            f"<p class=\"muted\">{escape(metrics['created'])} &middot; dermscreen "
            f"{escape(metrics['dermscreen_version'])} &middot; {ci} &middot; test-time augmentation: "
            f"{escape(metrics['settings']['tta'] or 'off')}</p>"
            f"<p class=\"warn\"><strong>{escape(metrics['disclaimer'])}</strong></p>"
            + "".join(f'<p class="warn"><strong>Not held-out:</strong> {escape(w)}</p>'
                      for w in metrics.get("warnings", [])))


def render_report(metrics: dict[str, Any], plots: dict[str, bytes], taxonomy: Taxonomy | None = None) -> str:
    """metrics.json content + {plot name: PNG bytes} → one self-contained HTML page (str)."""
    names = {c.code: c.name for c in taxonomy.classes} if taxonomy else {}
    overall = metrics["overall"]
    return "".join([
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>Evaluation: {escape(metrics['model']['name'])}</title><style>{_CSS}</style></head><body>",
        _header(metrics), _model_section(metrics), _data_section(metrics, names), _headline_section(overall),
        _per_class_section(overall, names), _operating_points_section(overall), _subgroup_section(metrics),
        _plots_section(plots), "</body></html>",
    ])
