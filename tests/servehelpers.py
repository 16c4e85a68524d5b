"""Helpers for the server tests: an OOD-permissive copy of the tiny bundle, images made in memory, a live server."""
from __future__ import annotations

import io
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dermscreen.bundle import MANIFEST, Bundle, Manifest


def permissive_bundle(tiny: Path, folder: Path) -> Path:
    """A copy of the tiny bundle whose OOD threshold accepts every image.

    The tiny model's OOD statistics come from random embeddings, so it refuses every real image;
    tests that need an assessed ("ok") answer use this copy. Refusal is tested with the original.
    """
    files = {p.name: p.read_bytes() for p in tiny.iterdir() if p.is_file() and p.name != MANIFEST}
    manifest = Manifest.model_validate_json((tiny / MANIFEST).read_bytes())
    manifest.ood = manifest.ood.model_copy(update={"threshold": 1e12})
    return Bundle.write(folder, manifest, files)


def lesion_rgb(width: int = 320, height: int = 240, seed: int = 0) -> np.ndarray:
    """A synthetic dermoscopy-like image: speckled skin with a dark irregular, mottled blob in the middle.

    Drawn at about 320 px and enlarged with nearest-neighbour, so its texture stays sharp at any size
    (the quality gate measures sharpness at ~256 px).
    """
    rng = np.random.default_rng(seed)
    scale = max(1.0, max(width, height) / 320)
    w, h = round(width / scale), round(height / scale)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    skin = np.array([226, 180, 160], np.float32) + rng.normal(0, 14, (h, w, 1)) + rng.normal(0, 4, (h, w, 3))
    r = np.hypot((xx - w / 2) / (w * 0.22), (yy - h / 2) / (h * 0.25))
    r += 0.15 * np.sin(np.arctan2(yy - h / 2, xx - w / 2) * 5 + seed)
    lesion = np.clip(1.4 - r, 0, 1)[..., None] * rng.uniform(0.6, 1.0, (h, w, 1))
    img = skin * (1 - lesion) + np.array([95, 55, 40], np.float32) * lesion
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(small.resize((width, height), Image.NEAREST)) if scale > 1 else np.asarray(small)


def encode(rgb: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    """Encode an RGB array as image file bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, *args: str, env: dict[str, str] | None = None,
                 trust: Path | None = None) -> tuple[subprocess.Popen, str]:
    """``python -m dermscreen.serve`` on a free loopback port; returns (process, base URL) once /healthz answers.

    With ``--tls-cert`` among ``args`` the server speaks HTTPS, checked against ``trust`` (its certificate).
    """
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "dermscreen.serve", "--model", str(model), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"{'https' if '--tls-cert' in args else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode(errors='replace')}")
        try:
            verify = ssl.create_default_context(cafile=str(trust)) if trust else True
            if httpx.get(base + "/healthz", timeout=1, verify=verify).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start within 60 s")


def stop_server(proc: subprocess.Popen) -> str:
    """Stop a server started by start_server; returns everything it printed."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace")
