"""The page as a phone on the local network sees it: over HTTPS the live camera works, over plain HTTP it cannot.

Browsers offer getUserMedia only to secure pages (HTTPS, or the machine's own loopback address), so a GP who
opens ``http://<laptop>:8000`` on a phone gets the camera app fallback at best. ``--tls-cert/--tls-key`` fix
that; these tests open the server by this machine's network address, as a phone would, and check both sides.
Skipped where the machine has no network address other than loopback.
"""
from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess

import pytest

from servehelpers import permissive_bundle, start_server, stop_server
from test_web_e2e import ARGS, CHROMIUM, playwright_api, take_camera_photo  # noqa: F401 (skips as that one)


def _network_address() -> str | None:
    """This machine's IPv4 address on its default route (a UDP connect sends nothing), else any non-loopback
    address its host name resolves to, or None."""
    candidates = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            candidates.append(s.getsockname()[0])
        except OSError:
            pass
    try:
        candidates += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    return next((a for a in candidates if not ipaddress.ip_address(a).is_loopback), None)


ADDRESS = _network_address()
pytestmark = [pytest.mark.skipif(ADDRESS is None, reason="no non-loopback network address to serve on"),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command makes the certificate")]


@pytest.fixture(scope="module")
def servers(tiny_bundle, tmp_path_factory):
    """The same model served twice on all interfaces: HTTPS (a self-signed certificate) and plain HTTP."""
    folder = tmp_path_factory.mktemp("https")
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=dermscreen-test",
                    "-addext", f"subjectAltName=IP:127.0.0.1,IP:{ADDRESS}"], check=True, capture_output=True, timeout=60)
    bundle = permissive_bundle(tiny_bundle, folder / "bundle")
    secure, secure_base = start_server(bundle, "--host", "0.0.0.0", "--tls-cert", str(cert), "--tls-key", str(key),
                                       trust=cert)
    plain, plain_base = start_server(bundle, "--host", "0.0.0.0")
    yield {"https": secure_base.replace("127.0.0.1", ADDRESS), "http": plain_base.replace("127.0.0.1", ADDRESS)}
    stop_server(secure)
    stop_server(plain)


@pytest.fixture()
def phone():
    """A phone-sized Chromium tab that has accepted the self-signed certificate, as its user would once."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 390, "height": 844}, ignore_https_errors=True,
                                      permissions=["camera"])
        tab = context.new_page()
        tab.set_default_timeout(30_000)
        yield tab
        browser.close()


def test_over_https_the_live_camera_takes_the_photo(servers, phone):
    phone.goto(servers["https"] + "/")
    assert phone.evaluate("window.isSecureContext && !!navigator.mediaDevices?.getUserMedia")
    take_camera_photo(phone)
    playwright_api.expect(phone.locator("#result .disclaimer")).to_contain_text("not a diagnosis")


def test_over_plain_http_the_button_falls_back_to_the_camera_app(servers, phone):
    phone.goto(servers["http"] + "/")
    assert not phone.evaluate("window.isSecureContext || !!navigator.mediaDevices?.getUserMedia")
    with phone.expect_file_chooser() as chooser:  # the capture input: the phone's own camera app
        phone.locator("#camera-open").click()
    assert chooser.value.element.get_attribute("capture") == "environment"
    assert phone.locator("#camera").is_hidden()
