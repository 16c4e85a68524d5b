"""The Screener end to end on the tiny bundle: result contract, refusals, tiers, TTA, metadata, heatmaps, threads."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from dermscreen.bundle import Bundle
from dermscreen.calibration import softmax
from dermscreen.errors import BundleError, ImageError, InputError
from dermscreen.screening import ScreeningResult, Screener, ScreenerSettings


def _lesion(seed: int = 0, w: int = 200, h: int = 150) -> np.ndarray:
    """A synthetic lesion-like image that passes the quality gate."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([185 + 0 * xx, 135 + 0 * xx, 115 + 0 * xx], -1).astype(np.float32) + rng.normal(0, 12, (h, w, 1))
    blob = ((yy - h / 2 - seed) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 4) ** 2
    img[blob] *= 0.4 + 0.05 * seed
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def screener(tiny_bundle) -> Screener:
    """The tiny model fits its OOD statistics on random embeddings, so OOD refusal is tested separately."""
    return Screener(tiny_bundle, ScreenerSettings(ood_refusal=False))


def test_result_contract(screener):
    result = screener.analyze(_jpeg(_lesion()))
    assert result.status == "ok" and result.reasons == []
    codes = [p.code for p in result.probabilities]
    assert codes == screener.bundle.manifest.taxonomy.codes
    probs = np.array([p.probability for p in result.probabilities])
    assert np.isclose(probs.sum(), 1.0)
    expected = softmax(np.array(result.debug.logits)[None], screener.bundle.manifest.calibration.temperature)[0]
    assert np.allclose(probs, expected)
    p_mal = probs[screener.bundle.manifest.taxonomy.malignant_mask].sum()
    assert result.p_malignant == pytest.approx(p_mal) and result.malignancy_score == round(100 * p_mal, 1)
    assert [t.code for t in result.top_diagnoses] == [codes[i] for i in np.argsort(-probs)[:3]]
    assert result.model.sha256 == screener.bundle.sha256 and result.model.name == "tiny-test-model"
    assert {"decode", "quality", "preprocess", "model", "postprocess", "heatmap", "total"} <= set(result.timings_ms)
    assert result.image.format == "JPEG" and (result.image.width, result.image.height) == (200, 150)
    assert "not a diagnosis" in result.disclaimer
    ScreeningResult.model_validate(result.to_json())  # the JSON form validates against the schema's model


def test_tier_follows_operating_points(screener):
    high, moderate = screener.tier_points
    assert (high.name, moderate.name) == ("balanced", "sensitivity_first")
    assert screener._tier(high.threshold) == "high"
    assert screener._tier((high.threshold + moderate.threshold) / 2) == "moderate"
    assert screener._tier(moderate.threshold - 1e-6) == "low"
    result = screener.analyze(_jpeg(_lesion(1)))
    assert result.risk.tier == screener._tier(result.p_malignant)
    assert result.risk.recommendation and result.risk.colour.startswith("#")


def test_ood_refusal_uses_bundle_threshold(tiny_bundle):
    data = _jpeg(_lesion())
    outlier = Screener(tiny_bundle, ScreenerSettings(ood_threshold=0.0)).analyze(data)
    assert outlier.status == "cannot_assess" and outlier.risk.tier == "cannot_assess"
    assert outlier.ood.in_distribution is False and outlier.ood.score > 0
    assert outlier.reasons and "does not look like" in outlier.reasons[0]
    assert outlier.probabilities == [] and outlier.malignancy_score is None
    assert outlier.debug.logits  # the debug view still shows what the model said
    inside = Screener(tiny_bundle, ScreenerSettings(ood_threshold=1e12)).analyze(data)
    assert inside.status == "ok" and inside.ood.in_distribution is True
    assert inside.ood.score == pytest.approx(outlier.ood.score)
    default = Screener(tiny_bundle)
    assert default.ood_threshold == Bundle.load(tiny_bundle).manifest.ood.threshold


def test_quality_refusal_skips_the_model(screener):
    result = screener.analyze(_jpeg(np.full((150, 200, 3), 128, np.uint8)))
    assert result.status == "cannot_assess" and not result.quality.passed
    assert "uniform" in result.reasons[0] and "model" not in result.timings_ms


def test_tta_averages_flipped_logits(screener):
    rgb = _lesion(2, 64, 64)  # the tiny model's input size: no resampling, so flips are exact
    tta = screener.analyze_image(rgb, tta=True)
    flips = [rgb, rgb[:, ::-1], rgb[::-1, :], rgb[::-1, ::-1]]
    mean = np.mean([screener.analyze_image(f.copy(), heatmap=False).debug.logits for f in flips], axis=0)
    assert np.allclose(tta.debug.logits, mean, atol=1e-4)
    assert tta.debug.tta and not screener.analyze_image(rgb).debug.tta


def test_tta_keeps_the_ood_score_its_threshold_was_chosen_on(tiny_bundle):
    # The threshold was chosen on single (unflipped) views; the mean embedding of four views lies nearer the
    # training mean, so scoring it would let out-of-distribution images through when TTA is on.
    judge = Screener(tiny_bundle)
    rgb = _lesion(2, 64, 64)
    plain, tta = judge.analyze_image(rgb, heatmap=False), judge.analyze_image(rgb, heatmap=False, tta=True)
    assert plain.ood.score is not None and tta.ood.score == pytest.approx(plain.ood.score, rel=1e-5)
    assert tta.ood.in_distribution == plain.ood.in_distribution


def test_metadata_reaches_models_that_take_it(tiny_bundle_meta, screener):
    meta_screener = Screener(tiny_bundle_meta, ScreenerSettings(ood_refusal=False))
    data = _jpeg(_lesion())
    a = meta_screener.analyze(data, age=30, sex="female", site="back")
    b = meta_screener.analyze(data, age=80, sex="male", site="face")
    assert a.debug.metadata_used and not np.allclose(a.debug.logits, b.debug.logits)
    plain = screener.analyze(data, age=30, sex="female", site="back")
    assert not plain.debug.metadata_used
    assert plain.debug.logits == screener.analyze(data).debug.logits
    for bad in ({"site": "moon"}, {"age": 300}, {"sex": "x"}, {"age": "old"}):
        with pytest.raises(InputError):
            meta_screener.analyze(data, **bad)


def test_heatmap_is_optional_and_embedded_only_when_asked(screener):
    data = _jpeg(_lesion())
    result = screener.analyze(data)
    dumped = result.to_json()
    assert dumped["heatmap"]["overlay_png"] is None and dumped["heatmap"]["box"] == [25, 0, 175, 150]
    embedded = result.to_json(include_heatmap=True)["heatmap"]
    png = base64.b64decode(embedded["overlay_png"].split(",", 1)[1])
    overlay = Image.open(io.BytesIO(png)).convert("RGBA")
    assert overlay.size == (200, 150)
    assert np.asarray(overlay)[:, :25, 3].max() == 0  # outside the region the model saw: transparent
    assert result.heatmaps.raw_malignant.shape == (2, 2)  # 64 px input / stride 32
    assert embedded["top_class"] == result.top_diagnoses[0].code
    none = screener.analyze(data, heatmap=False)
    assert none.heatmap is None and none.heatmaps is None and "heatmap" not in none.timings_ms
    json.dumps(result.to_json(include_heatmap=True))


def test_bad_bytes_raise_image_errors(screener):
    with pytest.raises(ImageError) as info:
        screener.analyze(b"not an image at all", filename="notes.txt")
    assert info.value.http_status == 415 and "notes.txt" in str(info.value)


def test_thread_safe(screener):
    images = [_jpeg(_lesion(i % 4)) for i in range(16)]
    sequential = [screener.analyze(d).debug.logits for d in images]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda d: screener.analyze(d).debug.logits, images))
    assert np.allclose(sequential, parallel, atol=1e-5)


def test_bundle_resolution(tiny_bundle, monkeypatch, tmp_path):
    import dermscreen.bundle

    monkeypatch.setattr(dermscreen.bundle, "DEFAULT_BUNDLE_DIR", tmp_path / "none")
    monkeypatch.delenv("DERMSCREEN_MODEL", raising=False)
    with pytest.raises(BundleError, match="--model"):
        Screener()
    monkeypatch.setenv("DERMSCREEN_MODEL", str(tiny_bundle))
    assert Screener().bundle.manifest.name == "tiny-test-model"


def test_schema_documents_the_result():
    schema = ScreeningResult.model_json_schema()
    for key in ("status", "risk", "malignancy_score", "probabilities", "top_diagnoses", "quality", "ood",
                "model", "heatmap", "timings_ms", "disclaimer", "debug"):
        assert key in schema["properties"]


def test_serving_path_never_imports_torch(tiny_bundle):
    code = (
        "import sys, io, numpy as np\n"
        "from PIL import Image\n"
        "from dermscreen.screening import Screener, ScreenerSettings\n"
        "from dermscreen.report import to_html, to_fhir\n"
        f"s = Screener({str(tiny_bundle)!r}, ScreenerSettings(ood_refusal=False))\n"
        "buf = io.BytesIO(); Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), np.uint8))"
        ".save(buf, 'PNG')\n"
        "r = s.analyze(buf.getvalue()); to_html(r); to_fhir(r); r.to_json(include_heatmap=True)\n"
        "assert r.status == 'ok', r.reasons\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.data
def test_real_images(screener, ham_dir):
    paths = sorted((ham_dir / "images").glob("*.jpg"))[:5]
    for p in paths:
        result = screener.analyze(p.read_bytes(), filename=p.name)
        assert result.status == "ok" and result.quality.passed


def _close(a, b, where: str = "") -> None:
    """Nested dumps equal, floats to rounding (onnxruntime may pick other kernels for other batch sizes)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{k}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), where
    else:
        assert a == b, where


def _same_answer(one: ScreeningResult, other: ScreeningResult) -> None:
    """Two results of the same image agree in everything but when and how fast they were made."""
    skip = {"timings_ms", "analysed_at"}
    _close(one.model_dump(exclude=skip), other.model_dump(exclude=skip))
    if one.heatmaps is not None:
        assert np.allclose(one.heatmaps.raw_malignant, other.heatmaps.raw_malignant, rtol=1e-5, atol=1e-6)
        assert np.allclose(one.heatmaps.raw_top_class, other.heatmaps.raw_top_class, rtol=1e-5, atol=1e-6)
    assert (one.heatmaps is None) == (other.heatmaps is None)


def _counting_runs(screener: Screener, monkeypatch) -> list[int]:
    """The rows of each model run the screener makes from now on."""
    rows: list[int] = []
    run = screener.bundle.run

    def counted(images, *args, **kwargs):
        rows.append(len(images))
        return run(images, *args, **kwargs)

    monkeypatch.setattr(screener.bundle, "run", counted)
    return rows


@pytest.mark.data
def test_analyze_many_gives_each_file_its_own_answer_from_one_model_run(ham_dir, ham224_dir, monkeypatch):
    # The shipped model on real images of both copies, with a bad file among them: the model runs once for all
    # the images that reach it, each answer is analyze's for that file, and the bad file is answered in its place.
    screener = Screener(None, ScreenerSettings(threads=1))
    good = [p.read_bytes() for p in sorted((ham_dir / "images").glob("*.jpg"))[:3]]
    good += [p.read_bytes() for p in sorted((ham224_dir / "images").glob("*.jpg"))[:2]]
    files = [(good[0], "a.jpg"), (b"not an image at all", "notes.txt"), *[(d, f"{i}.jpg") for i, d in
                                                                           enumerate(good[1:])]]
    files.append((good[1][: len(good[1]) // 3], "cut.jpg"))  # a truncated JPEG
    alone = []
    for data, name in files:
        try:
            alone.append(screener.analyze(data, filename=name, age=50, sex="male", site="back"))
        except ImageError as exc:
            alone.append(exc)
    rows = _counting_runs(screener, monkeypatch)
    together = screener.analyze_many(files, age=50, sex="male", site="back")
    assert len(together) == len(files)
    reached = [r for r in together if isinstance(r, ScreeningResult) and "model" in r.timings_ms]
    assert rows == [len(reached)] and len(reached) >= 4
    for one, other in zip(alone, together):
        if isinstance(one, Exception):
            assert type(other) is type(one) and str(other) == str(one)
            continue
        _same_answer(one, other)
        for timed in (one, other):  # the total covers every stage and what lies between them
            stages = {k: v for k, v in timed.timings_ms.items() if k != "total"}
            assert {"decode", "quality", "lesion", "preprocess", "model", "postprocess"} <= set(stages)
            assert timed.timings_ms["total"] >= sum(stages.values()) - 0.05
    assert isinstance(together[1], ImageError) and "notes.txt" in str(together[1])
    assert isinstance(together[-1], ImageError)


def test_analyze_many_with_flips_and_metadata(tiny_bundle_meta, monkeypatch):
    # TTA sends four rows per image and a metadata model gets one metadata row per image row
    screener = Screener(tiny_bundle_meta, ScreenerSettings(ood_refusal=False))
    files = [(_jpeg(_lesion(seed)), None) for seed in range(3)]
    alone = [screener.analyze(data, tta=True, age=70, sex="female", site="face") for data, _ in files]
    rows = _counting_runs(screener, monkeypatch)
    together = screener.analyze_many(files, tta=True, age=70, sex="female", site="face")
    assert rows == [12]
    for one, other in zip(alone, together):
        assert one.debug.metadata_used and one.debug.tta
        _same_answer(one, other)
    assert screener.analyze_many([]) == [] and rows == [12]


def test_analyze_many_returns_option_errors_per_file_and_runs_no_model(screener, monkeypatch):
    rows = _counting_runs(screener, monkeypatch)
    answers = screener.analyze_many([(_jpeg(_lesion(1)), None), (_jpeg(_lesion(2)), None)], age=300)
    assert [type(a) for a in answers] == [InputError, InputError] and "out of range" in str(answers[0])
    assert rows == []
    # an image the quality gate refuses never reaches the model; the others still share one run
    blank = np.full((150, 200, 3), 128, np.uint8)
    answers = screener.analyze_many([(_jpeg(blank), None), (_jpeg(_lesion(1)), None), (_jpeg(_lesion(2)), None)])
    assert [a.status for a in answers] == ["cannot_assess", "ok", "ok"] and rows == [2]
    assert "model" not in answers[0].timings_ms


def test_quality_thresholds_from_bundle_then_settings(tiny_bundle, tmp_path):
    from dermscreen.bundle import ARRAYS_FILE, MODEL_FILE

    bundle = Bundle.load(tiny_bundle)
    strict = bundle.manifest.model_copy(update={"quality": {"min_side_refuse": 400, "min_side_warn": 500}})
    folder = Bundle.write(tmp_path / "strict", strict, {n: bundle.file(n) for n in (MODEL_FILE, ARRAYS_FILE)})
    data = _jpeg(_lesion())
    refused = Screener(folder, ScreenerSettings(ood_refusal=False)).analyze(data)
    assert refused.status == "cannot_assess" and "too small" in refused.reasons[0]
    relaxed = Screener(folder, ScreenerSettings(ood_refusal=False, quality={"min_side_refuse": 64,
                                                                            "min_side_warn": 100}))
    assert relaxed.analyze(data).status == "ok"


def test_warm_up_runs_the_lesion_and_model_stages_on_a_synthetic_image(tiny_bundle, tiny_bundle_meta):
    for bundle in (tiny_bundle, tiny_bundle_meta):  # a model that takes metadata gets its "unknown" vector
        timings = Screener(bundle, ScreenerSettings()).warm_up()
        assert set(timings) == {"lesion", "model"} and all(v > 0 for v in timings.values())


def test_a_large_photo_is_analysed_reduced_and_reported_in_its_own_pixels(ham_dir):
    # a real photograph as a 12 MP upload and as a 1000x750 one: the large one is analysed at ~1000 px, so the
    # answers agree, and its boxes and diameter come back in its own (4x larger) pixels
    image_id = (ham_dir / "HAM10000_metadata.csv").read_text().splitlines()[1].split(",")[1]
    photo = Image.open(ham_dir / "images" / f"{image_id}.jpg").convert("RGB")

    def upload(size):
        return _jpeg(np.asarray(photo.resize(size, Image.BICUBIC)))

    screener = Screener(None, ScreenerSettings(ood_refusal=False))
    small, big = screener.analyze(upload((1000, 750))), screener.analyze(upload((4000, 3000)))
    assert (small.image.width, small.image.height) == (1000, 750)
    assert (big.image.width, big.image.height) == (4000, 3000)
    assert any("analysed at 1000x750" in note for note in big.image.notes)
    assert abs(big.p_malignant - small.p_malignant) < 0.05
    assert big.lesion.found and small.lesion.found
    for a, b in ((big.lesion.box, small.lesion.box), (big.heatmap.box, small.heatmap.box)):
        assert np.abs(np.array(a) - 4 * np.array(b)).max() <= 0.02 * 4000
    assert big.lesion.abcd.diameter.pixels == pytest.approx(4 * small.lesion.abcd.diameter.pixels, rel=0.05)
    # the same upload analysed at full size (max_side None) lands on the same box, in the same pixels
    full = Screener(screener.bundle, ScreenerSettings(ood_refusal=False, max_side=None)).analyze(upload((4000, 3000)))
    assert (full.image.width, full.image.height) == (4000, 3000) and not any("analysed at" in n for n in full.image.notes)
    assert np.abs(np.array(full.lesion.box) - np.array(big.lesion.box)).max() <= 0.03 * 4000


def test_a_small_lesion_in_a_large_photo_is_cropped_and_its_boxes_scaled(ham_dir):
    # the smart crop and the heatmap box are worked out on the reduced image and reported in the upload's pixels
    image_id = (ham_dir / "HAM10000_metadata.csv").read_text().splitlines()[1].split(",")[1]
    photo = np.asarray(Image.open(ham_dir / "images" / f"{image_id}.jpg").convert("RGB"))
    field = np.empty((750, 1000, 3), np.uint8)
    field[:] = np.median(photo[:4].reshape(-1, 3), axis=0).astype(np.uint8)
    field[300:450, 400:600] = photo  # the photograph, a fifth of the frame's width, in the middle

    def upload(size):
        return _jpeg(np.asarray(Image.fromarray(field).resize(size, Image.BICUBIC)))

    screener = Screener(None, ScreenerSettings(ood_refusal=False, quality_gate=False))
    small, big = screener.analyze(upload((1000, 750))), screener.analyze(upload((4000, 3000)))
    assert small.lesion.crop_box is not None and big.lesion.crop_box is not None
    for a, b in ((big.lesion.crop_box, small.lesion.crop_box), (big.heatmap.box, small.heatmap.box)):
        assert np.abs(np.array(a) - 4 * np.array(b)).max() <= 0.02 * 4000
        assert 0 <= a[0] < a[2] <= 4000 and 0 <= a[1] < a[3] <= 3000
    assert big.to_json(include_heatmap=True)["heatmap"]["overlay_png"].startswith("data:image/png")


def test_the_model_card_says_how_each_tier_is_reached(screener):
    card = screener.model_card()
    rules = {r["tier"]: r for r in card["risk_tiers"]}
    assert list(rules) == ["high", "moderate", "low", "cannot_assess"]
    high, moderate = sorted((o["threshold"] for o in card["operating_points"]), reverse=True)[:2]
    assert f">= {high:.4g}" in rules["high"]["rule"] and f"< {moderate:.4g}" in rules["low"]["rule"]
    for p_malignant, tier in ((high, "high"), (high - 1e-6, "moderate"), (moderate, "moderate"),
                              (moderate - 1e-6, "low")):
        assert screener._tier(p_malignant) == tier  # the rule the card states is the rule applied
    assert rules["low"]["recommendation"].startswith("No referral suggested")
