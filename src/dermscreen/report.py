"""ScreeningResult → JSON schema, a self-contained HTML report, and an HL7 FHIR R4 DiagnosticReport.

The HTML report embeds the image and the heatmap as data URLs and uses no external resource
(no script, font or stylesheet from elsewhere), so it can be saved, mailed or printed as one file.
The FHIR report is one DiagnosticReport whose ``contained`` resources are the Observations
(malignancy score, risk tier, top diagnoses) and the AI model as a Device.
"""
from __future__ import annotations

import html
import io
import uuid
from typing import Any

import numpy as np
from PIL import Image

from .evaluation.held_out import held_out_for, referral_sentence
from .explain import data_url
from .lesion import draw_outline
from .screening import ScreeningResult

_SYSTEM = "https://github.com/dermscreen/dermscreen"  # namespace for dermscreen's own codes
_OBS_CATEGORY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                             "code": "imaging", "display": "Imaging"}]}


def json_schema() -> dict[str, Any]:
    """The JSON schema of a ScreeningResult (what the API returns and ``predict --json`` prints)."""
    return ScreeningResult.model_json_schema()


# ---- HTML --------------------------------------------------------------------------------------------
def _jpeg_url(rgb: np.ndarray, max_side: int = 768) -> str:
    """A downscaled JPEG data URL of an RGB array (keeps the report small)."""
    img = Image.fromarray(rgb)
    img.thumbnail((max_side, max_side), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return data_url(buf.getvalue(), "image/jpeg")


def _figures(result: ScreeningResult, image_rgb: np.ndarray | None) -> str:
    """The image and its heatmap blends as <figure> elements."""
    e = html.escape
    figs = []
    if image_rgb is not None:
        seg = result.segmentation if result.segmentation is not None and result.segmentation.found else None
        shown, caption = image_rgb, "Analysed image"
        if seg is not None:
            shown, caption = draw_outline(image_rgb, seg), "Analysed image, lesion outline in cyan"
        figs.append(f'<figure><img src="{_jpeg_url(shown)}" alt="{e(caption)}"><figcaption>{e(caption)}'
                    "</figcaption></figure>")
        maps = result.heatmaps
        if maps is not None:
            for which, caption in (("malignant", "Evidence for a malignant lesion"),
                                   ("top_class", f"Evidence for {maps.top_class}")):
                blended = maps.blended(image_rgb, which)
                if seg is not None:
                    blended = draw_outline(blended, seg)
                # an empty map looks like the plain image: say so rather than leave the reader to wonder
                empty = "" if maps.has_evidence(which) else ": no area of the image raised it, so the map is empty"
                figs.append(f'<figure><img src="{_jpeg_url(blended)}" alt="{e(caption)}">'
                            f"<figcaption>{e(caption)} (heatmap){e(empty)}</figcaption></figure>")
    return f'<div class="figs">{"".join(figs)}</div>' if figs else ""


def _lesion_section(result: ScreeningResult) -> str:
    """The lesion outline note, smart crop and ABCD descriptors as HTML ("" when not measured)."""
    e = html.escape
    lesion = result.lesion
    if lesion is None:
        return ""
    rows = ""
    if lesion.abcd is not None:
        a = lesion.abcd
        items = [("Asymmetry", f"{a.asymmetry.asymmetric_axes} of 2 axes", a.asymmetry.explanation),
                 ("Border", f"compactness {a.border.compactness:.2f}", a.border.explanation),
                 ("Colours", ", ".join(a.colours.present) or "none clear", a.colours.explanation),
                 ("Diameter", f"{a.diameter.mm:.1f} mm" if a.diameter.mm is not None else f"{a.diameter.pixels:.0f} px",
                  a.diameter.explanation)]
        rows = "".join(f"<tr><th scope='row'>{e(k)}</th><td>{e(v)}</td><td>{e(x)}</td></tr>" for k, v, x in items)
        rows = f"<table class='abcd'><tr><th>Cue</th><th>Measured</th><th>What it means</th></tr>{rows}</table>" \
               f"<p class='meta'>{e(a.note)}</p>"
    crop = ""
    if lesion.crop_box is not None:
        crop = f" Model input: the square {e(str(tuple(lesion.crop_box)))} of the image."
    return f"<h2>Lesion (ABCD)</h2><p>{e(lesion.message)}{crop}</p>{rows}"


def _findings(result: ScreeningResult) -> str:
    """Probability table, image checks and model identity as HTML."""
    e = html.escape
    rows = "".join(f"<tr><td>{e(c.name)} <small>({e(c.code)}, {e(c.group)})</small></td>"
                   f"<td>{100 * c.probability:.1f} %</td></tr>"
                   for c in sorted(result.probabilities, key=lambda c: c.probability, reverse=True))
    table = f"<h2>Diagnoses</h2><table><tr><th>Diagnosis</th><th>Probability</th></tr>{rows}</table>" if rows else ""
    checks = [f'<li class="warn">{e(w)}</li>' for w in result.quality.warnings]
    checks += [f'<li class="refuse">{e(r)}</li>' for r in result.reasons]
    if not checks:
        checks = ["<li>Image quality adequate; the image resembles the model's training images.</li>"]
    m = result.model
    # how the model did on images it never saw, where that is recorded for exactly this model (its sha256)
    performance = referral_sentence(held_out_for(m.sha256))
    return (f"{table}{_lesion_section(result)}<h2>Image checks</h2><ul>{''.join(checks)}</ul>"
            f"<p class='meta'>Model {e(m.name)} {e(m.version)} ({e(m.backbone)}), sha256 {e(m.sha256[:16])}…; "
            f"analysed {e(result.analysed_at)}; {result.timings_ms.get('total', 0):.0f} ms."
            + (f" Model licence: {e(m.licence)}" if m.licence else "")
            + (f" {e(performance)}" if performance else "") + "</p>")


_CSS = """body{font-family:system-ui,sans-serif;max-width:56rem;margin:2rem auto;padding:0 1rem;color:#222}
.tier{color:#fff;padding:.8rem 1rem;border-radius:.4rem;font-size:1.3rem}
.figs{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0}figure img{max-width:17rem;border-radius:.3rem}
table{border-collapse:collapse}td,th{padding:.25rem .8rem;border-bottom:1px solid #ddd;text-align:left}
.warn{color:#8a5300}.refuse{color:#b71c1c}.meta{color:#555;font-size:.9rem}
.disclaimer{border-left:4px solid #999;padding-left:.8rem;color:#333}"""


def to_html(result: ScreeningResult, image_rgb: np.ndarray | None = None, title: str = "Skin lesion screening") -> str:
    """A self-contained HTML page for one result; the image (default: ``result.image_rgb``) and heatmaps embedded."""
    e = html.escape
    image_rgb = result.image_rgb if image_rgb is None else image_rgb
    score = "" if result.malignancy_score is None else \
        f"<p><strong>Malignancy score: {result.malignancy_score:.0f} / 100</strong> (calibrated probability " \
        f"that the lesion belongs to a malignant class)</p>"
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{e(title)}</h1>"
        f"<div class='tier' style='background:{e(result.risk.colour)}'>{e(result.risk.label)}</div>"
        f"<p>{e(result.risk.recommendation)}</p>{score}{_figures(result, image_rgb)}{_findings(result)}"
        f"<p class='disclaimer'>{e(result.disclaimer)}</p></body></html>"
    )


# ---- FHIR R4 -----------------------------------------------------------------------------------------
def _code(text: str, code: str | None = None) -> dict[str, Any]:
    """A CodeableConcept with dermscreen's own code (when given) and text."""
    concept: dict[str, Any] = {"text": text}
    if code:
        concept["coding"] = [{"system": _SYSTEM, "code": code, "display": text}]
    return concept


def _observation(obs_id: str, code: dict, value: dict, result: ScreeningResult, **extra) -> dict[str, Any]:
    """One contained, final Observation produced by the model Device."""
    return {"resourceType": "Observation", "id": obs_id, "status": "final", "category": [_OBS_CATEGORY],
            "code": code, "effectiveDateTime": result.analysed_at, "device": {"reference": "#model"},
            **value, **extra}


def _device(result: ScreeningResult) -> dict[str, Any]:
    """The AI model as a contained Device, identified by the bundle's sha256."""
    m = result.model
    return {"resourceType": "Device", "id": "model",
            "identifier": [{"system": f"{_SYSTEM}/model-sha256", "value": m.sha256}],
            "deviceName": [{"name": m.name, "type": "model-name"}],
            "type": _code("Software: AI screening aid for dermoscopic images", "ai-model"),
            "version": [{"value": m.version}],
            "note": [{"text": f"Backbone {m.backbone}." + (f" Licence: {m.licence.rstrip('.')}." if m.licence else "")
                      + f" {result.disclaimer}"}]}


def _observations(result: ScreeningResult) -> list[dict[str, Any]]:
    """Risk tier, malignancy score and top-diagnosis Observations."""
    obs = [_observation("risk-tier", _code("Skin lesion risk tier (AI screening)", "risk-tier"),
                        {"valueCodeableConcept": _code(result.risk.label, result.risk.tier)}, result,
                        note=[{"text": result.risk.recommendation}])]
    if result.malignancy_score is not None:
        obs.append(_observation(
            "malignancy-score", _code("Malignancy score (100 x calibrated probability of a malignant class)",
                                      "malignancy-score"),
            {"valueQuantity": {"value": result.malignancy_score, "unit": "%", "system": "http://unitsofmeasure.org",
                               "code": "%"}}, result))
    for rank, c in enumerate(result.top_diagnoses, 1):
        obs.append(_observation(
            f"diagnosis-{rank}", _code(f"Probability of diagnosis: {c.name}", f"p-{c.code}"),
            {"valueQuantity": {"value": round(100 * c.probability, 2), "unit": "%",
                               "system": "http://unitsofmeasure.org", "code": "%"}}, result,
            interpretation=[_code(f"rank {rank} of {len(result.top_diagnoses)}; group {c.group}")]))
    return obs


def to_fhir(result: ScreeningResult, *, subject_reference: str | None = None) -> dict[str, Any]:
    """An HL7 FHIR R4 DiagnosticReport (dict) with contained Observations and the model as a Device."""
    observations = _observations(result)
    conclusion = f"{result.risk.label}. {result.risk.recommendation}"
    if result.reasons:
        conclusion += " Reason: " + " ".join(result.reasons)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "id": str(uuid.uuid4()), "status": "final",
        "category": [_code("Dermoscopy AI screening", "dermoscopy-ai")],
        "code": _code("AI screening of a dermoscopic skin-lesion image", "skin-lesion-screening"),
        "effectiveDateTime": result.analysed_at, "issued": result.analysed_at,
        "contained": [_device(result), *observations],
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": f"{conclusion} {result.disclaimer}",
        "conclusionCode": [_code(result.risk.label, result.risk.tier)],
    }
    if subject_reference:
        report["subject"] = {"reference": subject_reference}
    return report
