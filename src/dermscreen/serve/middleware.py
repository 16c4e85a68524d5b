"""ASGI middleware: privacy and security headers on every response, and a minimal access log.

The access log records method, path (never the query string, which can carry age/sex/site),
status and latency: no client address, no image data, no results.
"""
from __future__ import annotations

import json
import logging
import time

access_log = logging.getLogger("dermscreen.access")
log = logging.getLogger("dermscreen.serve")

UNEXPECTED_MESSAGE = ("The server failed on this request; nothing was stored. Try again, and report the problem if "
                      "it persists.")

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "img-src 'self' data: blob:",
    "media-src 'self' blob:",
    "style-src 'self'",
    "script-src 'self'",
    "connect-src 'self'",
    "font-src 'none'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"permissions-policy", b"camera=(self), microphone=(), geolocation=(), payment=(), usb=()"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
# Results and model answers must not linger in browser or proxy caches.
NO_STORE = (b"cache-control", b"no-store")


def _keep_header(name: bytes, is_api: bool) -> bool:
    """False for headers this server must not send: cookies always, caching hints on API answers."""
    name = name.lower()
    if name == b"set-cookie":
        return False  # stateless by design: nothing may be remembered about a visitor
    return not (is_api and name == b"cache-control")  # replaced by no-store


class PrivacyHeadersMiddleware:
    """Adds the security headers, ``no-store`` on API answers, and drops any Set-Cookie."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_api = scope["path"].startswith("/api/") or scope["path"] == "/healthz"

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if _keep_header(k, is_api)]
                headers += SECURITY_HEADERS
                if is_api:
                    headers.append(NO_STORE)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class AccessLogMiddleware:
    """Logs one line per request: method, path, status, latency in ms."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # what the client sees if the app fails before starting a response

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], status,
                            (time.perf_counter() - start) * 1000.0)


class UnexpectedErrorMiddleware:
    """Answers an exception no handler claimed with a JSON 500, logging its type only.

    Starlette's outermost layer would also answer it, but then re-raises it so that the server logs the
    traceback and the exception's message, which could echo request content. Caught here, inside the
    privacy headers, it never gets that far.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_and_note(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:
            log.error("unexpected %s while answering %s %s", type(exc).__name__, scope["method"], scope["path"])
            if started:  # too late for an error answer; the server closes the connection
                return
            body = json.dumps({"status": 500, "error": "Internal Server Error", "message": UNEXPECTED_MESSAGE}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})
