"""REST API: analyse (multipart and raw), options, model card, health, docs, headers, bad inputs, logging."""
from __future__ import annotations

import base64
import io
import json
import logging
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dermscreen.serve.app import STATIC, create_app
from dermscreen.serve.settings import ServeSettings
from servehelpers import encode, lesion_rgb, permissive_bundle


@pytest.fixture(scope="module")
def open_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle with OOD refusal effectively off, so images get an assessed answer."""
    return permissive_bundle(tiny_bundle, tmp_path_factory.mktemp("open") / "bundle")


@pytest.fixture(scope="module")
def client(open_bundle) -> TestClient:
    """A client of an app serving the permissive tiny bundle with a 2 MB upload limit."""
    with TestClient(create_app(ServeSettings(model=str(open_bundle), max_upload_mb=2))) as c:
        yield c


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return encode(lesion_rgb(), "JPEG", quality=92)


def analyze(client, data: bytes, name="lesion.jpg", ctype="image/jpeg", **fields):
    return client.post("/api/v1/analyze", files={"image": (name, data, ctype)}, data=fields)


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"status", "error", "message"} and body["status"] == status
    for word in words:
        assert word.lower() in body["message"].lower(), body["message"]


def test_multipart_analysis_returns_the_screener_json(client, jpeg):
    r = analyze(client, jpeg)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["status"] == "ok" and body["risk"]["tier"] in ("high", "moderate", "low")
    probs = [p["probability"] for p in body["probabilities"]]
    assert [p["code"] for p in body["probabilities"]] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    p_mal = sum(p["probability"] for p in body["probabilities"] if p["group"] == "malignant")
    assert body["p_malignant"] == pytest.approx(p_mal, abs=1e-6)
    assert body["malignancy_score"] == pytest.approx(100 * p_mal, abs=0.06)
    assert body["model"]["sha256"] == client.get("/healthz").json()["model"]["sha256"]
    assert "not a diagnosis" in body["disclaimer"]
    assert len(body["debug"]["logits"]) == 7 and body["debug"]["temperature"] == 1.5


def test_heatmap_is_a_png_data_url_covering_the_image_and_can_be_left_out(client, jpeg):
    heat = analyze(client, jpeg).json()["heatmap"]
    prefix = "data:image/png;base64,"
    for key in ("overlay_png", "top_class_overlay_png"):
        assert heat[key].startswith(prefix)
        png = Image.open(io.BytesIO(base64.b64decode(heat[key][len(prefix):])))
        assert png.format == "PNG" and png.size == tuple(heat["size"])
    assert heat["size"][0] / heat["size"][1] == pytest.approx(320 / 240, rel=0.01)
    without = analyze(client, jpeg, heatmap="false").json()
    assert not (without.get("heatmap") or {}).get("overlay_png")
    assert without["probabilities"] == analyze(client, jpeg).json()["probabilities"]


def preview_image(body: dict) -> Image.Image:
    """The decoded JPEG of a result's preview_jpeg data URL."""
    prefix = "data:image/jpeg;base64,"
    assert body["preview_jpeg"].startswith(prefix)
    img = Image.open(io.BytesIO(base64.b64decode(body["preview_jpeg"][len(prefix):])))
    assert img.format == "JPEG" and img.mode == "RGB"
    return img


@pytest.mark.parametrize("fmt, name, ctype", [("TIFF", "lesion.tif", "image/tiff"),
                                             ("JPEG", "lesion.jpg", "image/jpeg")])
def test_preview_is_the_analysed_image_as_a_jpeg_at_the_overlays_size(client, fmt, name, ctype):
    rgb = lesion_rgb(900, 600, seed=5)  # larger than the overlays (512 px): the preview is reduced like them
    data = encode(rgb, fmt, **({"compression": "tiff_deflate"} if fmt == "TIFF" else {"quality": 92}))
    body = analyze(client, data, name=name, ctype=ctype, preview="true").json()
    assert body["status"] == "ok" and body["heatmap"]["size"] == [512, 341]
    img = preview_image(body)
    assert img.size == tuple(body["heatmap"]["size"])
    outline = body["lesion"]["outline_png"]
    assert Image.open(io.BytesIO(base64.b64decode(outline.split(",", 1)[1]))).size == img.size
    # the picture itself, not a blank: close to the upload, reduced the same way
    expected = np.asarray(Image.fromarray(rgb).resize(img.size, Image.BILINEAR), np.float32)
    assert np.abs(np.asarray(img, np.float32) - expected).mean() < 12
    by_query = client.post("/api/v1/analyze?preview=true&heatmap=false", content=data, headers={"content-type": ctype})
    assert preview_image(by_query.json()).size == img.size


def test_preview_is_left_out_unless_asked(client, jpeg):
    assert analyze(client, jpeg).json()["preview_jpeg"] is None
    assert analyze(client, jpeg, preview="false").json()["preview_jpeg"] is None


def test_an_image_that_cannot_be_assessed_still_gets_its_preview(tiny_bundle):
    # refused by the OOD check: no overlays, so the preview has the size they would have had
    tiff = encode(lesion_rgb(700, 500, seed=2), "TIFF")
    with TestClient(create_app(ServeSettings(model=str(tiny_bundle)))) as strict:
        body = strict.post("/api/v1/analyze?preview=true", content=tiff, headers={"content-type": "image/tiff"}).json()
    assert body["status"] == "cannot_assess"
    assert preview_image(body).size == (512, 366)


def test_raw_body_gives_the_same_answer_as_multipart(client, jpeg):
    raw = client.post("/api/v1/analyze?heatmap=false", content=jpeg, headers={"content-type": "image/jpeg"})
    octet = client.post("/api/v1/analyze?heatmap=false", content=jpeg,
                        headers={"content-type": "application/octet-stream"})
    form = analyze(client, jpeg, heatmap="false")
    assert raw.status_code == octet.status_code == form.status_code == 200
    assert raw.json()["debug"]["logits"] == form.json()["debug"]["logits"] == octet.json()["debug"]["logits"]


def test_png_upload_and_tta_option(client):
    png = encode(lesion_rgb(seed=3), "PNG")
    plain = analyze(client, png, name="l.png", ctype="image/png", heatmap="false").json()
    tta = analyze(client, png, name="l.png", ctype="image/png", heatmap="false", tta="true").json()
    assert plain["debug"]["tta"] is False and tta["debug"]["tta"] is True
    assert plain["debug"]["logits"] != tta["debug"]["logits"]


def test_patient_metadata_is_accepted_from_form_or_query(client, jpeg):
    assert analyze(client, jpeg, age="54", sex="F", site="Back").status_code == 200
    r = client.post("/api/v1/analyze?age=54&sex=male&site=face&heatmap=false", content=jpeg)
    assert r.status_code == 200
    assert analyze(client, jpeg, age="", sex="", site="").status_code == 200  # an untouched HTML form


@pytest.mark.parametrize("fields, words", [
    ({"age": "200"}, ["age"]), ({"age": "old"}, ["age"]), ({"sex": "x"}, ["sex"]),
    ({"site": "moon"}, ["moon", "back"]), ({"heatmap": "maybe"}, ["heatmap"]),
    ({"age": "nan"}, ["age", "finite"]), ({"hetmap": "false"}, ["Unknown form field 'hetmap'", "heatmap"]),
    ({"patient_age": "54", "Age": "3"}, ["'Age', 'patient_age'"]),
])
def test_invalid_options_are_422_with_a_message(client, jpeg, fields, words):
    assert_error(analyze(client, jpeg, **fields), 422, *words)


def test_unknown_query_parameter_is_refused(client, jpeg):
    assert_error(client.post("/api/v1/analyze?agee=40", content=jpeg), 422, "agee")


def test_bad_inputs_get_json_errors_and_the_server_keeps_serving(client, jpeg):
    truncated = jpeg[: len(jpeg) // 3]
    cases = [
        (analyze(client, b"just some text\n" * 20, name="notes.txt", ctype="text/plain"), 415, "not an image"),
        (client.post("/api/v1/analyze", content=b"%PDF-1.4 not an image", headers={"content-type": "application/pdf"}), 415, "jpeg"),
        (analyze(client, truncated), 422, ""),
        (analyze(client, b""), 422, "empty"),
        (client.post("/api/v1/analyze", content=b""), 422, "empty"),
        (analyze(client, encode(np.zeros((8, 8, 3), np.uint8), "PNG"), name="tiny.png"), 422, "pixels"),
        (client.post("/api/v1/analyze", files={"note": (None, "hello")}), 422, "image"),
    ]
    for response, status, word in cases:
        assert_error(response, status, word)
    assert client.get("/healthz").status_code == 200
    assert analyze(client, jpeg).status_code == 200


def _png_bomb(side: int) -> bytes:
    """A valid PNG header claiming side x side pixels, with a tiny compressed body (a decompression bomb)."""
    raw = zlib.compress(b"\x00" * (side // 8 + 1) * 64, 9)
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_decompression_bomb_is_413_before_decoding(client):
    bomb = _png_bomb(60_000)  # 3.6 gigapixels in a few hundred bytes
    assert len(bomb) < 2000
    assert_error(analyze(client, bomb, name="bomb.png", ctype="image/png"), 413, "pixels")


def test_upload_over_the_limit_is_413_by_content_length(client):
    big = b"\xff\xd8\xff" + b"\0" * (3 * 2**20)
    assert_error(analyze(client, big), 413, "2 MiB")
    assert_error(client.post("/api/v1/analyze", content=big), 413, "larger")


def test_chunked_upload_is_cut_off_at_the_limit_without_reading_the_rest(client):
    # drive the ASGI app directly: TestClient would buffer the whole body before the app sees it
    chunk, offered, received, sent = 65536, 100, [], []  # 6.4 MB offered against a 2 MB limit
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/v1/analyze", "raw_path": b"/api/v1/analyze", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"image/jpeg"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"\0" * chunk, "more_body": len(received) < offered}

    async def send(message):
        sent.append(message)

    import anyio
    anyio.run(client.app, scope, receive, send)
    assert sent[0]["status"] == 413 and b"larger" in sent[1]["body"]
    assert len(received) == 2 * 2**20 // chunk + 1, f"read {len(received)} chunks for a 2 MB limit"


def _drive(app, receive) -> list[dict]:
    """Run one POST /api/v1/analyze through the ASGI app with the given receive(); the messages it sent."""
    import anyio

    sent = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/v1/analyze", "raw_path": b"/api/v1/analyze", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"image/jpeg")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def send(message):
        sent.append(message)

    anyio.run(app, scope, receive, send)
    return sent


def test_a_stalled_upload_is_408_and_gives_its_memory_back(open_bundle, caplog):
    # a client that stops sending must not hold its share of the memory budget while it keeps the connection
    import anyio

    app = create_app(ServeSettings(model=str(open_bundle), upload_idle_timeout_s=0.2, helper_process=False))
    calls = []

    async def stall_after_one_chunk():
        calls.append(1)
        if len(calls) > 1:
            await anyio.sleep_forever()
        return {"type": "http.request", "body": b"\xff\xd8" + b"\0" * 65536, "more_body": True}

    with caplog.at_level(logging.INFO):
        sent = _drive(app, stall_after_one_chunk)
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert b"no data arrived for 0.2 s" in sent[1]["body"]
    assert app.state.upload_budget.used == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_upload_that_trickles_past_the_deadline_is_408(open_bundle):
    import anyio

    app = create_app(ServeSettings(model=str(open_bundle), upload_idle_timeout_s=5, upload_timeout_s=0.3,
                                   helper_process=False))

    async def trickle():  # a byte every 50 ms: never idle for long, never done
        await anyio.sleep(0.05)
        return {"type": "http.request", "body": b"\0", "more_body": True}

    sent = _drive(app, trickle)
    assert sent[0]["status"] == 408 and b"not complete after 0.3 s" in sent[1]["body"]
    assert app.state.upload_budget.used == 0


def test_a_client_that_disconnects_mid_upload_is_not_a_server_error(open_bundle, caplog):
    app = create_app(ServeSettings(model=str(open_bundle), helper_process=False))
    messages = iter([{"type": "http.request", "body": b"\xff\xd8" + b"\0" * 1000, "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    with caplog.at_level(logging.INFO):
        sent = _drive(app, receive)
    assert sent[0]["status"] == 400 and b"closed the connection" in sent[1]["body"]
    assert app.state.upload_budget.used == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_an_unexpected_failure_is_a_json_500_with_no_traceback_or_message_logged(open_bundle, jpeg, caplog,
                                                                                 monkeypatch):
    app = create_app(ServeSettings(model=str(open_bundle), helper_process=False, warm_up=False))

    def broken(*args, **kwargs):
        raise RuntimeError("patient Jane Doe, 54, mole on the back")  # a message that must not reach any log

    monkeypatch.setattr(app.state.screener, "analyze", broken)
    with TestClient(app) as client, caplog.at_level(logging.DEBUG):
        r = analyze(client, jpeg)
        assert client.get("/healthz").status_code == 200  # and it keeps serving
    assert_error(r, 500, "nothing was stored")
    assert "content-security-policy" in r.headers and r.headers["cache-control"] == "no-store"
    logged = "\n".join(rec.getMessage() + str(rec.exc_info or "") + str(rec.exc_text or "") for rec in caplog.records)
    assert "RuntimeError" in logged and "Jane" not in logged and "Traceback" not in logged
    assert not any(rec.exc_info for rec in caplog.records)


def test_405_says_which_method_to_use(client):
    r = client.get("/api/v1/analyze")
    assert_error(r, 405, "use POST")
    assert r.headers["allow"] == "POST"


def test_an_rfc_2231_file_name_is_decoded(client, jpeg):
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename*=UTF-8''%C3%A9t%C3%A9.jpg\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + jpeg[:200] + b"\r\n--b--\r\n")
    r = client.post("/api/v1/analyze", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(r, 422)
    assert r.json()["message"].startswith("été.jpg: ")


def test_ambiguous_forms_are_refused(client, jpeg):
    # two values for one option, or two images: the answer must not depend on which one the server picks
    twice = client.post("/api/v1/analyze", files=[("image", ("a.jpg", jpeg, "image/jpeg"))],
                        data={"age": ["abc", "40"]})
    assert_error(twice, 422, "'age' was sent more than once")
    two_images = client.post("/api/v1/analyze", files=[("image", ("a.jpg", jpeg, "image/jpeg")),
                                                       ("image", ("b.jpg", jpeg, "image/jpeg"))])
    assert_error(two_images, 422, "more than one image")
    in_query = client.post("/api/v1/analyze?age=30&heatmap=false&age=40", content=jpeg,
                           headers={"content-type": "image/jpeg"})
    assert_error(in_query, 422, "query option 'age' was sent more than once")
    assert analyze(client, jpeg, age="40").status_code == 200


def test_malformed_multipart_is_400(client):
    headers = {"content-type": "multipart/form-data; boundary=XYZ"}
    assert_error(client.post("/api/v1/analyze", content=b"no boundary here", headers=headers), 400, "boundary")
    cut = b"--XYZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n\xff\xd8"
    assert_error(client.post("/api/v1/analyze", content=cut, headers=headers), 400, "cut short")
    assert_error(client.post("/api/v1/analyze", content=b"", headers={"content-type": "multipart/form-data"}), 400, "boundary")


def test_model_card(client):
    card = client.get("/api/v1/model").json()
    assert [c["code"] for c in card["classes"]] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert {c["group"] for c in card["classes"]} == {"malignant", "benign"}
    assert {o["name"] for o in card["operating_points"]} == {"sensitivity_first", "balanced"}
    assert all({"threshold", "sensitivity", "specificity"} <= set(o) for o in card["operating_points"])
    assert "non-commercial" in card["licence"].lower() and "screening aid" in card["intended_use"].lower()
    assert "metrics" in card and card["taxonomy"] == "ham10000" and "back" in card["sites"]
    assert "not a diagnosis" in card["disclaimer"]


def test_healthz(client, open_bundle):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["model"]["name"] == "tiny-test-model"
    assert len(body["model"]["sha256"]) == 64
    head = client.head("/healthz")  # what uptime monitors often send
    assert head.status_code == 200 and head.content == b""


def test_404_says_where_things_are(client):
    assert_error(client.get("/api/v1/analyse"), 404, "/api/v1/analyze", "/docs")


EXTERNAL_URL = re.compile(r"(?:https?:)?//(?!127\.0\.0\.1|localhost)[a-z0-9.-]+\.[a-z]{2,}", re.I)


def test_docs_are_local_and_openapi_describes_the_api(client):
    spec = client.get("/openapi.json").json()
    analyze_op = spec["paths"]["/api/v1/analyze"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(analyze_op["requestBody"]["content"])
    assert {p["name"] for p in analyze_op["parameters"]} >= {"age", "sex", "site", "heatmap", "tta", "preview"}
    form = analyze_op["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["preview"] == {"type": "boolean"}
    assert {"413", "415", "422"} <= set(analyze_op["responses"])
    assert analyze_op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ScreeningResult")
    assert "risk" in spec["components"]["schemas"]["ScreeningResult"]["properties"]
    assert "image/jpeg" in spec["components"]["schemas"]["ScreeningResult"]["properties"]["preview_jpeg"]["description"]
    assert {"/api/v1/model", "/healthz"} <= set(spec["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/docs.js" in docs.text
    assert client.get("/redoc").status_code == 404
    for path in sorted(STATIC.iterdir()):
        assert not EXTERNAL_URL.search(path.read_text(encoding="utf-8")), f"{path.name} references an external URL"
    assert not EXTERNAL_URL.search(docs.text + client.get("/").text)


def test_page_and_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "screening aid, not a diagnosis" in page.text.lower()
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert client.get(asset).status_code == 200, asset
    assert "<script>" not in page.text and "style=" not in page.text  # the CSP forbids inline code


@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/api/v1/model"),
                                          ("GET", "/healthz"), ("POST", "/api/v1/analyze"), ("GET", "/missing")])
def test_privacy_and_security_headers_on_every_response(client, jpeg, method, path):
    r = client.request(method, path, content=jpeg if method == "POST" else None)
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "img-src 'self' data: blob:" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "camera=(self)" in r.headers["permissions-policy"]
    assert "set-cookie" not in r.headers and not r.cookies
    if path.startswith("/api") or path == "/healthz":
        assert r.headers["cache-control"] == "no-store"


def test_access_log_has_method_path_status_latency_only(client, jpeg, caplog):
    with caplog.at_level(logging.DEBUG):
        r = client.post("/api/v1/analyze?age=57&site=scalp&sex=female", content=jpeg)
        client.post("/api/v1/analyze", content=b"plain text")
    assert r.status_code == 200
    access = [rec.getMessage() for rec in caplog.records if rec.name == "dermscreen.access"]
    assert len(access) == 2
    assert re.fullmatch(r"POST /api/v1/analyze 200 \d+\.\dms", access[0]), access[0]
    assert re.fullmatch(r"POST /api/v1/analyze 415 \d+\.\dms", access[1]), access[1]
    # every server-side record (the test's own HTTP client logs its URLs; that is the client, not the server)
    everything = "\n".join(rec.getMessage() for rec in caplog.records if not rec.name.startswith("httpx"))
    score = f"{r.json()['malignancy_score']}"
    for secret in ("57", "scalp", "female", "testclient", score, r.json()["risk"]["tier"]):
        assert secret not in everything, f"{secret!r} leaked into the logs"


def test_ood_refusal_passes_through_as_cannot_assess(tiny_bundle, jpeg):
    # the original tiny bundle's OOD statistics come from random embeddings: real-looking images are refused
    with TestClient(create_app(ServeSettings(model=str(tiny_bundle)))) as strict:
        body = strict.post("/api/v1/analyze", content=jpeg).json()
    assert body["status"] == "cannot_assess" and body["risk"]["tier"] == "cannot_assess"
    assert body["ood"]["in_distribution"] is False and body["reasons"]
    assert body["malignancy_score"] is None and body["top_diagnoses"] == []


def test_settings_round_trip_through_the_environment(monkeypatch, open_bundle):
    settings = ServeSettings(model=str(open_bundle), port=9123, workers=3, max_upload_mb=7.5, tta=True, concurrency=5)
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    assert ServeSettings() == settings
    assert ServeSettings().max_upload_bytes == int(7.5 * 2**20)


def test_workers_share_the_cores_unless_concurrency_is_set(monkeypatch, open_bundle):
    import os

    monkeypatch.delenv("DERMSCREEN_CONCURRENCY", raising=False)
    monkeypatch.delenv("DERMSCREEN_WORKERS", raising=False)
    cores = os.cpu_count() or 1
    assert ServeSettings(model=str(open_bundle)).concurrency == cores
    assert ServeSettings(model=str(open_bundle), workers=2).concurrency == max(1, cores // 2)
    assert ServeSettings(model=str(open_bundle), workers=64).concurrency == 1
    assert ServeSettings(model=str(open_bundle), workers=2, concurrency=3).concurrency == 3


def test_json_errors_are_valid_json_for_the_page(client):
    r = client.get("/api/v1/nothing")
    assert_error(r, 404, "not found")
    json.loads(r.text)


def test_memory_budget_is_shared_by_concurrent_uploads_and_always_given_back():
    import anyio

    from dermscreen.serve.uploads import MemoryBudget, UploadError, read_capped

    budget = MemoryBudget(3 * 65536)
    outcomes = []

    async def body(n):
        for _ in range(n):
            yield b"\0" * 65536
            await anyio.sleep(0)  # let the other upload read too

    async def upload(n):
        try:
            data = await read_capped(body(n), 10 * 65536, None, budget)
            outcomes.append(len(data))
            budget.give(len(data))  # what the endpoint does when the analysis is done
        except UploadError as exc:
            outcomes.append(exc.status)

    async def both():
        async with anyio.create_task_group() as tg:
            tg.start_soon(upload, 2)
            tg.start_soon(upload, 2)

    anyio.run(both)
    assert sorted(outcomes, key=str) == [2 * 65536, 503]  # 4 chunks wanted, 3 fit: one upload is refused
    assert budget.used == 0


def test_busy_server_answers_503_with_retry_after_and_recovers(client, jpeg):
    budget = client.app.state.upload_budget
    assert budget.used == 0  # every earlier request in this module, refused or not, gave its bytes back
    budget.take(budget.limit - 1000)  # as if other clients were mid-upload
    try:
        busy = client.post("/api/v1/analyze", content=jpeg)
    finally:
        budget.give(budget.limit - 1000)
    assert_error(busy, 503, "busy")
    assert busy.headers["retry-after"] == "2"
    assert client.post("/api/v1/analyze", content=jpeg).status_code == 200
    assert budget.used == 0


def test_budget_smaller_than_one_upload_is_a_configuration_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_buffered_mb"):
        ServeSettings(max_upload_mb=20, max_buffered_mb=10)


def test_the_server_warms_up_in_the_background_unless_told_not_to(open_bundle, caplog):
    import threading

    def warm_up_threads():
        return [t for t in threading.enumerate() if t.name == "dermscreen-warm-up"]

    caplog.set_level(logging.INFO, logger="dermscreen.serve")
    with TestClient(create_app(ServeSettings(model=str(open_bundle)))) as started:  # runs the app's startup
        assert started.get("/healthz").status_code == 200
        for thread in warm_up_threads():
            thread.join(60)
    assert any("warmed up on a synthetic image" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with TestClient(create_app(ServeSettings(model=str(open_bundle), warm_up=False))):
        assert not warm_up_threads()
    assert not any("warmed up" in r.getMessage() for r in caplog.records)
