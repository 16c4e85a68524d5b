"""Privacy, proven: uploads never touch the disk, and one client's analysis never reaches another."""
from __future__ import annotations

import builtins
import contextlib
import os
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from dermscreen.serve.app import create_app
from dermscreen.serve.settings import ServeSettings
from servehelpers import encode, lesion_rgb, permissive_bundle, start_server, stop_server

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


@pytest.fixture(scope="module")
def open_bundle(tiny_bundle, tmp_path_factory) -> Path:
    return permissive_bundle(tiny_bundle, tmp_path_factory.mktemp("open") / "bundle")


@pytest.fixture()
def disk_guard(monkeypatch, tmp_path):
    """Make every way of creating a file fail (and record the attempt) and point TMPDIR at an empty folder."""
    attempts: list[str] = []
    empty = tmp_path / "tmp"
    empty.mkdir()
    monkeypatch.setenv("TMPDIR", str(empty))
    monkeypatch.setattr(tempfile, "tempdir", str(empty))

    def refuse(name):
        def raiser(*args, **kwargs):
            attempts.append(name)
            raise OSError(f"test: {name} is forbidden while handling an upload")
        return raiser

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp",
                 "TemporaryDirectory"):
        monkeypatch.setattr(tempfile, name, refuse(f"tempfile.{name}"))
    import starlette.formparsers as formparsers  # its spooling parser imported the name directly
    monkeypatch.setattr(formparsers, "SpooledTemporaryFile", refuse("starlette SpooledTemporaryFile"))
    real_os_open, real_open = os.open, builtins.open

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS:
            attempts.append(f"os.open({path!r}) for writing")
            raise OSError("test: writing files is forbidden")
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+"):
            attempts.append(f"open({file!r}, {mode!r})")
            raise OSError("test: writing files is forbidden")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(builtins, "open", guarded_open)
    yield attempts, empty


def test_disk_guard_catches_spooling(disk_guard):
    attempts, _ = disk_guard
    with pytest.raises(OSError):
        tempfile.SpooledTemporaryFile(max_size=1024)
    with pytest.raises(OSError):
        open(os.devnull, "wb")
    assert len(attempts) == 2


@pytest.mark.parametrize("in_helper", [False, True], ids=["in-the-server", "in-the-helper-process"])
def test_a_15_mb_upload_is_analysed_without_touching_the_disk(open_bundle, disk_guard, in_helper):
    # built before the guard matters (loading reads files); the helper is forked under the guard, so it has
    # it too: a file it tried to create would fail its analysis
    app = create_app(ServeSettings(model=str(open_bundle), helper_process=in_helper))
    attempts, empty = disk_guard
    image = encode(lesion_rgb(2640, 2000), "PNG", compress_level=0)
    assert 15 * 2**20 <= len(image) < 20 * 2**20
    with TestClient(app) as client, contextlib.ExitStack() as busy:
        if in_helper:
            busy.enter_context(app.state.own_slot)  # this process busy: the uploads travel to the helper
        multipart = client.post("/api/v1/analyze", files={"image": ("big.png", image, "image/png")},
                                data={"age": "61"})
        raw = client.post("/api/v1/analyze?heatmap=false", content=image, headers={"content-type": "image/png"})
        if in_helper:
            assert app.state.helper.answered == 2
    assert multipart.status_code == 200, multipart.text
    assert raw.status_code == 200, raw.text
    body = multipart.json()
    assert body["image"]["width"] == 2640 and body["image"]["height"] == 2000
    assert body["status"] == "ok" and body["heatmap"]["overlay_png"].startswith("data:image/png")
    assert attempts == [], f"the upload path tried to create files: {attempts}"
    assert list(empty.iterdir()) == []


@pytest.fixture(scope="module")
def live(open_bundle):
    """A real uvicorn server on loopback, serving the permissive tiny bundle."""
    proc, base = start_server(open_bundle, "--max-upload-mb", "4", "--concurrency", "2")
    yield base, proc
    stop_server(proc)


def test_interleaved_clients_each_get_only_their_own_result(live):
    base, _ = live
    images = {"a": encode(lesion_rgb(300, 220, seed=1)), "b": encode(lesion_rgb(260, 260, seed=2))}
    alone = {k: httpx.post(f"{base}/api/v1/analyze?heatmap=false", content=v).json() for k, v in images.items()}
    assert alone["a"]["debug"]["logits"] != alone["b"]["debug"]["logits"]
    barrier = threading.Barrier(2)
    answers: dict[str, list[dict]] = {"a": [], "b": []}

    def client(key: str) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            for _ in range(8):
                barrier.wait()  # both clients send at the same moment, every round
                answers[key].append(http.post("/api/v1/analyze", files={"image": (f"{key}.jpg", images[key])},
                                              data={"heatmap": "true"}).json())

    threads = [threading.Thread(target=client, args=(k,)) for k in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for key, mine in answers.items():
        assert len(mine) == 8
        for answer in mine:
            assert answer["debug"]["logits"] == alone[key]["debug"]["logits"]
            assert (answer["image"]["width"], answer["image"]["height"]) == \
                   (alone[key]["image"]["width"], alone[key]["image"]["height"])
    # and the heatmaps differ between the two clients' images
    assert answers["a"][0]["heatmap"]["overlay_png"] != answers["b"][0]["heatmap"]["overlay_png"]


def test_live_server_refuses_an_oversized_stream_and_keeps_serving(live):
    base, _ = live

    def stream():  # 32 MB, no Content-Length
        for _ in range(512):
            yield b"\0" * 65536

    try:
        r = httpx.post(f"{base}/api/v1/analyze", content=stream(), headers={"content-type": "image/jpeg"}, timeout=30)
        assert r.status_code == 413 and "larger" in r.json()["message"]
    except httpx.WriteError:
        pass  # the server may close the connection before the client finishes writing: also a refusal
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert httpx.post(f"{base}/api/v1/analyze", content=encode(lesion_rgb())).status_code == 200


def test_live_server_logs_no_query_strings_addresses_or_results(open_bundle):
    proc, base = start_server(open_bundle)
    try:
        r = httpx.post(f"{base}/api/v1/analyze?age=73&site=scalp&sex=male", content=encode(lesion_rgb()))
        assert r.status_code == 200 and not r.cookies and "set-cookie" not in r.headers
        httpx.get(f"{base}/healthz")
    finally:
        log = stop_server(proc)
    assert "POST /api/v1/analyze 200" in log and "GET /healthz 200" in log
    for secret in ("age=", "?", "scalp", "male", "127.0.0.1:", r.json()["risk"]["label"]):
        assert secret not in log.replace(base, ""), f"{secret!r} leaked into the server log:\n{log}"


def test_fastapi_opentelemetry_stays_off_even_when_the_environment_asks_for_it(tiny_bundle, monkeypatch):
    # FastAPI's native OpenTelemetry traces requests (exception messages included) as soon as a global provider
    # is configured, and adds OTLP exporters when FASTAPI_OTEL_AUTO_CONFIGURE=true: this server asks for neither
    trace = pytest.importorskip("opentelemetry.trace")
    import inspect

    from fastapi import FastAPI

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        pytest.skip("this FastAPI has no native telemetry")
    asked: list = []

    class RecordingProvider(trace.TracerProvider):
        def get_tracer(self, *args, **kwargs):
            asked.append(args)
            return trace.NoOpTracer()

    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: RecordingProvider())
    app = create_app(ServeSettings(model=str(tiny_bundle), warm_up=False))
    with TestClient(app) as client:  # runs the lifespan, where auto-configuration would add its exporters
        assert client.get("/healthz").status_code == 200
        assert client.post("/api/v1/analyze", content=b"not an image").status_code in (415, 422)
    assert asked == []


def test_the_model_card_names_no_folder_of_the_machines_that_made_the_model():
    # the shipped manifest records where it was trained (a run folder, the data's relative paths); the card any
    # client gets keeps the file names only
    from dermscreen.bundle import without_paths

    card = TestClient(create_app(ServeSettings(warm_up=False))).get("/api/v1/model").json()
    found = []

    def walk(value, where):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{where}.{key}")
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                walk(inner, f"{where}[{i}]")
        elif isinstance(value, str) and ("/work/" in value or "../" in value or "/home/" in value):
            found.append(where)

    walk(card, "card")
    assert not found, found
    assert card["training"]["data"]["source"] == "HAM10000_metadata.csv" and card["training"]["split_file"] == "split.csv"
    record = {"labels": {"source": "/home/dr-x/patients 2026.csv", "split": {"file": "C:\\shares\\x\\split.csv"}},
              "images": 40}
    assert without_paths(record) == {"labels": {"source": "patients 2026.csv", "split": {"file": "split.csv"}},
                                     "images": 40}


def test_the_header_filter_drops_cookies_and_caching_hints_a_route_would_send():
    # no dermscreen route sets a cookie today; this proves the filter would stop one that did (a library, a
    # future route), and that API answers get no-store whatever the route says
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from dermscreen.serve.middleware import PrivacyHeadersMiddleware

    def chatty(request):
        response = PlainTextResponse("hello", headers={"cache-control": "max-age=60"})
        response.set_cookie("visitor", "42")
        return response

    app = PrivacyHeadersMiddleware(Starlette(routes=[Route("/api/v1/x", chatty), Route("/page", chatty)]))
    client = TestClient(app)
    api, page = client.get("/api/v1/x"), client.get("/page")
    assert api.text == page.text == "hello"
    assert "set-cookie" not in api.headers and "set-cookie" not in page.headers and not client.cookies
    assert api.headers["cache-control"] == "no-store" and page.headers["cache-control"] == "max-age=60"
    assert "default-src 'self'" in page.headers["content-security-policy"]
