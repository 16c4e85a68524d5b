"""Reports: FHIR R4 DiagnosticReport validated with fhir.resources, self-contained HTML, JSON schema."""
from __future__ import annotations

import re

import numpy as np
import pytest

from dermscreen.report import json_schema, to_fhir, to_html
from dermscreen.screening import Screener, ScreenerSettings

fhir = pytest.importorskip("fhir.resources.R4B.diagnosticreport")


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:150, 0:200]
    img = np.stack([185 + 0 * xx, 135 + 0 * xx, 115 + 0 * xx], -1) + rng.normal(0, 12, (150, 200, 1))
    img[((yy - 75) ** 2 + (xx - 100) ** 2) < 40**2] *= 0.4
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def results(tiny_bundle):
    ok = Screener(tiny_bundle, ScreenerSettings(ood_refusal=False)).analyze_image(_image())
    refused = Screener(tiny_bundle, ScreenerSettings(ood_threshold=0.0)).analyze_image(_image())
    return ok, refused


def test_fhir_report_validates(results):
    for result in results:
        doc = to_fhir(result, subject_reference="Patient/example")
        report = fhir.DiagnosticReport.model_validate(doc)
        kinds = [type(r).__name__ for r in report.contained]
        assert kinds[0] == "Device" and set(kinds[1:]) == {"Observation"}
        assert [r.reference for r in report.result] == [f"#{o.id}" for o in report.contained[1:]]
        assert report.contained[0].identifier[0].value == result.model.sha256
        assert result.risk.label in report.conclusion and "not a diagnosis" in report.conclusion
        note = report.contained[0].note[0].text
        assert f"Licence: {result.model.licence.rstrip('.')}." in note and ".." not in note


def test_fhir_observations_carry_score_tier_and_diagnoses(results):
    ok, refused = results
    obs = {o["id"]: o for o in to_fhir(ok)["contained"][1:]}
    assert obs["malignancy-score"]["valueQuantity"]["value"] == ok.malignancy_score
    assert obs["risk-tier"]["valueCodeableConcept"]["coding"][0]["code"] == ok.risk.tier
    assert [k for k in obs if k.startswith("diagnosis-")] == ["diagnosis-1", "diagnosis-2", "diagnosis-3"]
    refused_ids = [o["id"] for o in to_fhir(refused)["contained"][1:]]
    assert refused_ids == ["risk-tier"]  # no score or diagnoses for an image the model cannot assess


@pytest.mark.parametrize("breakage", ["drop report code", "drop observation code", "text as quantity", "extra field"])
def test_fhir_validator_catches_a_broken_report(results, breakage):
    """Negative control: the validation above would notice a structurally wrong report."""
    from pydantic import ValidationError

    doc = to_fhir(results[0])
    {"drop report code": lambda: doc.pop("code"),
     "drop observation code": lambda: doc["contained"][1].pop("code"),
     "text as quantity": lambda: doc["contained"][2]["valueQuantity"].update(value="high"),
     "extra field": lambda: doc.update(riskTier="high")}[breakage]()
    with pytest.raises(ValidationError):
        fhir.DiagnosticReport.model_validate(doc)


def test_html_is_self_contained_and_escaped(results):
    ok, refused = results
    page = to_html(ok, title="<script>alert(1)</script>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert ok.risk.label in page and ok.disclaimer in page and ok.top_diagnoses[0].name in page
    assert page.count("data:image/jpeg;base64,") == 3  # image + two heatmap blends
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    refused_page = to_html(refused, np.zeros((150, 200, 3), np.uint8))
    assert "Cannot assess" in refused_page and refused.reasons[0] in refused_page
    # the model's licence (the tiny bundle's is the default card's non-commercial one) travels with every report
    assert "non-commercial" in ok.model.licence and f"Model licence: {ok.model.licence}" in page


def test_the_shipped_models_results_carry_its_non_commercial_licence():
    result = Screener().analyze_image(_image())
    assert "CC BY-NC-SA" in result.model.licence and "non-commercial" in result.model.licence.lower()
    assert result.to_json()["model"]["licence"] == result.model.licence
    # its HTML report says how it did on held-out images (recorded for its sha256), as the web page does
    html = to_html(result, _image())
    assert "On 855 held-out test images, its referral threshold flagged 95.5 % (95 % CI 91–99 %) of malignant" in html
    assert "it can miss a skin cancer" in html


def test_a_model_without_held_out_results_claims_none(results):
    assert "held-out test images" not in to_html(results[0], _image())


def test_json_schema_is_documented():
    schema = json_schema()
    assert schema["title"] == "ScreeningResult" and "risk" in schema["required"]
    assert schema["$defs"]["Risk"]["properties"]["tier"]["enum"] == ["high", "moderate", "low", "cannot_assess"]
