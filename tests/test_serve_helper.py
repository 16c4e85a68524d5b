"""The server's helper process: same answers and errors as the server's own threads, survives its death."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from dermscreen.serve.app import create_app
from dermscreen.serve.helper import AnalysisHelper
from dermscreen.serve.settings import ServeSettings
from servehelpers import encode, lesion_rgb, permissive_bundle, start_server


@pytest.fixture(scope="module")
def open_bundle(tiny_bundle, tmp_path_factory):
    return permissive_bundle(tiny_bundle, tmp_path_factory.mktemp("open") / "bundle")


def _post(client, data: bytes, name: str = "lesion.jpg", ctype: str = "image/jpeg"):
    return client.post("/api/v1/analyze", files={"image": (name, data, ctype)}, data={"heatmap": "true"})


def _without_timings(body: dict) -> dict:
    # when and how fast differ by nature
    return {k: v for k, v in body.items() if k not in ("timings_ms", "analysed_at")}


def test_the_helper_answers_real_images_exactly_as_the_server_itself(ham_dir):
    images = [p.read_bytes() for p in sorted((ham_dir / "images").glob("*.jpg"))[:6]]
    answers = {}
    for helper in (True, False):
        app = create_app(ServeSettings(helper_process=helper, warm_up=False))  # the shipped default model
        with TestClient(app) as client:
            if helper:
                with app.state.own_slot:  # as if this process were busy with another image: the helper answers
                    answers[helper] = [_post(client, data) for data in images]
                assert app.state.helper.answered == len(images)
                assert app.state.helper.process.pid != os.getpid()
            else:
                answers[helper] = [_post(client, data) for data in images]
                assert app.state.helper is None
    for with_helper, without in zip(answers[True], answers[False]):
        assert with_helper.status_code == without.status_code == 200
        a, b = with_helper.json(), without.json()
        assert a["heatmap"]["overlay_png"].startswith("data:image/png;base64,")
        assert _without_timings(a) == _without_timings(b)


def test_errors_in_the_helper_are_the_same_json_errors(open_bundle):
    text = b"just some text\n" * 20
    truncated = encode(lesion_rgb(), "JPEG")[:300]
    answers = {}
    for helper in (True, False):
        app = create_app(ServeSettings(model=str(open_bundle), helper_process=helper, warm_up=False))
        with TestClient(app) as client, app.state.own_slot:  # busy here: the helper gets every request
            answers[helper] = [(r.status_code, r.json()) for r in (
                _post(client, text, "notes.txt", "text/plain"),
                _post(client, truncated),
                client.post("/api/v1/analyze?site=moon", content=encode(lesion_rgb())),
            )]
            if helper:
                assert app.state.helper.answered == 3
    assert answers[True] == answers[False]
    assert [status for status, _ in answers[True]] == [415, 422, 422]


def test_the_helper_sends_the_same_preview(open_bundle):
    tiff = encode(lesion_rgb(900, 600, seed=4), "TIFF")
    answers = {}
    for helper in (True, False):
        app = create_app(ServeSettings(model=str(open_bundle), helper_process=helper, warm_up=False))
        with TestClient(app) as client, app.state.own_slot:  # busy here: the helper gets the request
            answers[helper] = client.post("/api/v1/analyze", files={"image": ("lesion.tif", tiff, "image/tiff")},
                                          data={"preview": "true"}).json()
            if helper:
                assert app.state.helper.answered == 1
    assert answers[True]["preview_jpeg"].startswith("data:image/jpeg;base64,")
    assert _without_timings(answers[True]) == _without_timings(answers[False])


def test_the_server_keeps_serving_when_the_helper_dies(open_bundle, caplog):
    app = create_app(ServeSettings(model=str(open_bundle), helper_process=True, warm_up=False))
    jpeg = encode(lesion_rgb(), "JPEG")
    with TestClient(app) as client, app.state.own_slot:  # busy here: every request is offered to the helper
        first = _post(client, jpeg)
        helper = app.state.helper
        pid = helper.process.pid
        os.kill(pid, signal.SIGKILL)
        with caplog.at_level(logging.ERROR, logger="dermscreen.serve"):
            after = [_post(client, jpeg) for _ in range(3)]  # answered by this process instead
        assert helper.answered == 1
        # the dead helper was reaped, not left a zombie (<defunct>) for the server's lifetime
        assert not Path(f"/proc/{pid}").exists() and helper.process.exitcode == -signal.SIGKILL
    assert first.status_code == 200 and all(r.status_code == 200 for r in after)
    assert _without_timings(after[0].json()) == _without_timings(first.json())
    assert any("helper process exited" in r.getMessage() and "exit code -9" in r.getMessage()
               for r in caplog.records)


def test_the_helper_ends_with_the_server(open_bundle):
    app = create_app(ServeSettings(model=str(open_bundle), helper_process=True, warm_up=False))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        process = app.state.helper.process
        assert process.is_alive()
    # it saw its pipes close and ended by itself (exit code 0), not killed after the grace period (-9)
    assert process.exitcode == 0 and app.state.helper is None


def _caught_signals(pid: int) -> set[str]:
    """Names of the signals process ``pid`` has handlers for (SigCgt in /proc/PID/status)."""
    mask = int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("SigCgt:")), 16)
    known = {s.value: s.name for s in signal.Signals}
    return {known[n] for n in range(1, 65) if mask >> (n - 1) & 1 and n in known}


def test_the_helper_does_not_outlive_a_killed_server(open_bundle):
    import time

    import psutil

    proc, base = start_server(open_bundle, "--helper-process")
    try:
        children = psutil.Process(proc.pid).children()
        assert len(children) == 1 and httpx.get(f"{base}/healthz").status_code == 200
        assert "SIGTERM" not in _caught_signals(children[0].pid)  # a plain `kill` ends the helper too
    finally:
        proc.kill()  # no shutdown: the helper must notice its pipes closed by the kernel
        proc.communicate(timeout=15)  # returns only once nothing holds the server's output pipe open any more
    deadline = time.monotonic() + 10
    while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def test_a_busy_helper_leaves_the_request_to_the_server():
    def echo(data, options):
        return b"helper:" + data

    helper = AnalysisHelper(echo, channels=2)
    try:
        assert helper.try_analyse(b"x", {}) == b"helper:x"
        with helper._channels[0][1], helper._channels[1][1]:  # both channels taken by other requests
            assert helper.try_analyse(b"y", {}) is None
        with helper._channels[0][1]:  # one taken: the other carries the request
            assert helper.try_analyse(b"z", {}) == b"helper:z"
        assert helper.answered == 2
    finally:
        helper.close()
    assert not helper.process.is_alive()


def test_requests_waiting_at_the_helper_each_get_their_own_answer():
    import time

    def slow_echo(data, options):
        time.sleep(0.05)
        return data + options["tag"].encode()

    helper = AnalysisHelper(slow_echo, channels=2)
    answers: dict[int, list] = {0: [], 1: []}

    def client(k: int) -> None:
        for i in range(10):
            answers[k].append((i, helper.try_analyse(f"{k}-{i}:".encode(), {"tag": f"{k}"})))

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        helper.close()
    for k, got in answers.items():  # two at once fit the two channels: every request was answered, by its own
        assert [a for _, a in got] == [f"{k}-{i}:{k}".encode() for i, _ in got] and len(got) == 10
    assert helper.answered == 20


def test_helper_default_is_on_with_one_worker_and_spare_cores(monkeypatch, open_bundle):
    import sys

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert ServeSettings(model=str(open_bundle)).helper_process is True
    assert ServeSettings(model=str(open_bundle), workers=2).helper_process is False
    assert ServeSettings(model=str(open_bundle), helper_process=False).helper_process is False
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert ServeSettings(model=str(open_bundle)).helper_process is False
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # two analyses at once: two onnxruntime threads each
    assert ServeSettings(model=str(open_bundle), concurrency=2).helper_process is False
    with pytest.raises(ValueError, match="one onnxruntime thread per analysis"):
        ServeSettings(model=str(open_bundle), threads=2, helper_process=True)
    monkeypatch.setattr(sys, "platform", "darwin")  # no fork-after-load outside Linux by default
    assert ServeSettings(model=str(open_bundle), concurrency=4).helper_process is False
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("DERMSCREEN_HELPER_PROCESS", "false")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert ServeSettings(model=str(open_bundle)).helper_process is False


def test_one_request_at_a_time_stays_here_and_the_helper_passes_metadata(open_bundle):
    app = create_app(ServeSettings(model=str(open_bundle), helper_process=True, warm_up=False))
    with TestClient(app) as client:
        alone = client.post("/api/v1/analyze?heatmap=false", content=encode(lesion_rgb()))
        assert alone.status_code == 200 and app.state.helper.answered == 0  # one at a time: this process's own
        with app.state.own_slot:
            r = client.post("/api/v1/analyze?heatmap=false&age=50&sex=female&site=back", content=encode(lesion_rgb()))
        assert app.state.helper.answered == 1
    body = json.loads(r.content)
    assert r.status_code == 200 and body["status"] == "ok" and "overlay_png" not in json.dumps(body.get("heatmap"))
