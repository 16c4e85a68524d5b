"""``dermscreen serve``: flags, a clear error for a bad model, and multi-worker start-up."""
from __future__ import annotations

import shutil
import ssl
import subprocess

import httpx
import pytest
import typer
from typer.testing import CliRunner

from dermscreen.serve.commands import _is_loopback, serve
from servehelpers import encode, lesion_rgb, permissive_bundle, start_server, stop_server


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(serve)
    return app


def test_serve_is_registered_with_its_flags():
    from dermscreen.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    for flag in ("--host", "--port", "--model", "--workers", "--max-upload-mb", "--helper-process"):
        assert flag in out
    assert "127.0.0.1" in out


def test_bad_model_fails_fast_with_a_sentence(tmp_path):
    result = CliRunner().invoke(_app(), ["--model", str(tmp_path / "nope"), "--port", "0"])
    assert result.exit_code == 2
    assert "Model bundle not found" in result.output


def test_loopback_detection():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.20") and not _is_loopback("example.org")


def test_two_workers_serve_the_same_model(tiny_bundle, tmp_path):
    bundle = permissive_bundle(tiny_bundle, tmp_path / "bundle")
    proc, base = start_server(bundle, "--workers", "2", "--max-upload-mb", "1")
    try:
        health = httpx.get(f"{base}/healthz").json()
        answers = [httpx.post(f"{base}/api/v1/analyze?heatmap=false", content=encode(lesion_rgb())).json()
                   for _ in range(4)]
        too_big = httpx.post(f"{base}/api/v1/analyze", content=b"\0" * (2 * 2**20))
    finally:
        log = stop_server(proc)
    assert health["model"]["name"] == "tiny-test-model"
    assert all(a["debug"]["logits"] == answers[0]["debug"]["logits"] for a in answers)
    assert too_big.status_code == 413  # the upload limit reached the workers through the environment
    assert log.count("Started server process") >= 2


def _self_signed(folder, name="server"):
    """A throwaway certificate for 127.0.0.1 and its key, made by the openssl command line."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=dermscreen-test", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command makes the certificates")


@needs_openssl
def test_https_serves_the_api_and_page(tiny_bundle, tmp_path):
    cert, key = _self_signed(tmp_path)
    bundle = permissive_bundle(tiny_bundle, tmp_path / "bundle")
    proc, base = start_server(bundle, "--tls-cert", str(cert), "--tls-key", str(key), trust=cert)
    try:
        assert base.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        answer = httpx.post(f"{base}/api/v1/analyze?heatmap=false", content=encode(lesion_rgb()), verify=trusted)
        page = httpx.get(base + "/", verify=trusted)
        with pytest.raises(httpx.TransportError):  # the port speaks TLS only: plain HTTP is not answered
            httpx.get(base.replace("https://", "http://") + "/healthz", timeout=5)
    finally:
        log = stop_server(proc)
    assert answer.status_code == 200 and answer.json()["status"] == "ok"
    assert page.status_code == 200 and "screening aid" in page.text.lower()
    assert "open https://127.0.0.1:" in log


@needs_openssl
def test_bad_tls_files_fail_with_a_sentence(tiny_bundle, tmp_path):
    cert, key = _self_signed(tmp_path)
    _, other_key = _self_signed(tmp_path, "other")
    locked = tmp_path / "locked.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-out", str(locked), "-aes256", "-passout", "pass:secret"],
                   check=True, capture_output=True, timeout=60)
    cases = ((["--tls-cert", str(cert)], "HTTPS needs both a certificate (--tls-cert) and its private key"),
             (["--tls-cert", str(cert), "--tls-key", str(other_key)], "does not belong to the certificate"),
             (["--tls-cert", str(cert), "--tls-key", str(locked)], "is protected by a passphrase"),
             (["--tls-cert", str(key), "--tls-key", str(key)], "as a PEM certificate and its private key"),
             (["--tls-cert", str(cert), "--tls-key", str(tmp_path / "nope.key")], "nope.key does not exist"),
             (["--tls-cert", str(tmp_path), "--tls-key", str(key)], "is a folder: give the certificate's file"))
    for args, said in cases:
        result = CliRunner().invoke(_app(), ["--model", str(tiny_bundle), *args], terminal_width=200)
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output


def test_inconsistent_limits_fail_with_a_sentence(tiny_bundle):
    result = CliRunner().invoke(_app(), ["--model", str(tiny_bundle), "--max-upload-mb", "50", "--max-buffered-mb", "10"])
    assert result.exit_code == 2
    assert "max_buffered_mb (10) must be at least max_upload_mb (50)" in result.output


def test_a_bad_flag_value_names_the_flag(tiny_bundle):
    for args, said in ((["--concurrency", "0"], "--concurrency (or DERMSCREEN_CONCURRENCY): Input should be greater"),
                       (["--port", "99999"], "--port (or DERMSCREEN_PORT): Input should be less"),
                       (["--log-level", "loud"], "--log-level (or DERMSCREEN_LOG_LEVEL): use one of critical, error")):
        result = CliRunner().invoke(_app(), ["--model", str(tiny_bundle), *args], terminal_width=200)
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output


def test_environment_variables_set_what_no_flag_gives(tiny_bundle):
    def run(args, env):
        return CliRunner().invoke(_app(), ["--model", str(tiny_bundle), *args], env=env, terminal_width=200)

    # before, every flag's default overrode its variable: DERMSCREEN_PORT=99999 passed silently
    result = run([], {"DERMSCREEN_PORT": "99999", "DERMSCREEN_MAX_UPLOAD_MB": "-1"})
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "--port (or DERMSCREEN_PORT)" in said
    assert "--max-upload-mb (or DERMSCREEN_MAX_UPLOAD_MB)" in said
    # a flag given wins over its variable
    result = run(["--port", "0", "--max-upload-mb", "5", "--max-buffered-mb", "10"],
                 {"DERMSCREEN_PORT": "99999", "DERMSCREEN_MAX_UPLOAD_MB": "-1", "DERMSCREEN_LOG_LEVEL": "loud"})
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "DERMSCREEN_PORT" not in said and "MAX_UPLOAD" not in said
    assert "--log-level (or DERMSCREEN_LOG_LEVEL): use one of" in said
    # a setting with no flag is named by its variable only (there is no --threads to suggest)
    result = run([], {"DERMSCREEN_THREADS": "0"})
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "DERMSCREEN_THREADS: Input should be greater" in said and "--threads" not in said


def test_python_m_dermscreen_is_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dermscreen", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "predict" in out.stdout and "serve" in out.stdout
    from dermscreen import __version__

    out = subprocess.run([sys.executable, "-m", "dermscreen", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"dermscreen {__version__}"
