"""``dermscreen serve``: the web app and REST API under uvicorn."""
from __future__ import annotations

import copy
import ipaddress
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .settings import ServeSettings


def log_config(level: str) -> dict:
    """uvicorn's logging setup plus our access logger (uvicorn's own, with addresses and query strings, is off)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["dermscreen"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def _is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# the settings `dermscreen serve` has a flag for; the others are set by their DERMSCREEN_* variable only
FLAGS = ("host", "port", "model", "workers", "max_upload_mb", "max_buffered_mb", "concurrency", "tta",
         "helper_process", "log_level", "tls_cert", "tls_key")


def _setting_error(error: dict) -> str:
    """One pydantic error on ServeSettings as a sentence naming the flag (and variable) it came from."""
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return message
    name = str(error["loc"][0])
    if name == "log_level":
        message = "use one of " + ", ".join(LOG_LEVELS)
    if name not in FLAGS:  # a setting only its environment variable sets
        return f"DERMSCREEN_{name.upper()}: {message}"
    return f"--{name.replace('_', '-')} (or DERMSCREEN_{name.upper()}): {message}"


def serve(
    # None = not given: the setting then comes from its DERMSCREEN_* variable, else the default shown
    host: Annotated[Optional[str], typer.Option(
        help="Interface to listen on; 0.0.0.0 makes the server reachable on the network.",
        show_default="127.0.0.1")] = None,
    port: Annotated[Optional[int], typer.Option(help="TCP port.", show_default="8000")] = None,
    model: Annotated[Optional[str], typer.Option(
        help="Model bundle (folder or zip) or an installed model's name (default, default-int8); default: "
             "$DERMSCREEN_MODEL or the shipped model.")] = None,
    workers: Annotated[Optional[int], typer.Option(
        min=1, max=64, help="Server processes, each with its own model copy.", show_default="1")] = None,
    max_upload_mb: Annotated[Optional[float], typer.Option(
        help="Largest accepted upload in MiB.", show_default="20")] = None,
    max_buffered_mb: Annotated[Optional[float], typer.Option(
        help="Uploads held in memory by all requests together, in MiB; more are answered 503.",
        show_default="256")] = None,
    concurrency: Annotated[Optional[int], typer.Option(
        help="Analyses run at once per worker (default: CPU cores / workers).")] = None,
    tta: Annotated[Optional[bool], typer.Option(
        "--tta/--no-tta", help="Test-time augmentation by default.", show_default="no-tta")] = None,
    helper_process: Annotated[Optional[bool], typer.Option(
        "--helper-process/--no-helper-process",
        help="Also analyse in a second process forked after the model is loaded (shares its memory); "
             "default: on, on Linux with one worker, more than one CPU core and one onnxruntime thread per "
             "analysis.")] = None,
    log_level: Annotated[Optional[str], typer.Option(
        help="critical, error, warning, info or debug.", show_default="info")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(
        help="PEM certificate: serve HTTPS (needed to send images over a network, and for the page's camera on a "
             "phone). See README: 'From a phone on your network'.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="PEM private key of --tls-cert (no passphrase).")] = None,
) -> None:
    """Start the screening web page and REST API (POST /api/v1/analyze, GET /api/v1/model, /docs).

    Every option can also be set by its DERMSCREEN_* environment variable (e.g. DERMSCREEN_PORT); a flag wins.
    """
    import uvicorn

    from pydantic import ValidationError

    from ..errors import DermscreenError
    from .app import create_app

    given = {"host": host, "port": port, "workers": workers, "max_upload_mb": max_upload_mb,
             "max_buffered_mb": max_buffered_mb, "tta": tta, "log_level": log_level, "model": model,
             "concurrency": concurrency, "helper_process": helper_process, "tls_cert": tls_cert, "tls_key": tls_key}
    # only flags given override: the others come from DERMSCREEN_* variables (ServeSettings), else the defaults
    overrides = {name: str(value) if isinstance(value, Path) else value
                 for name, value in given.items() if value is not None}
    try:
        settings = ServeSettings(**overrides)
        app = create_app(settings)  # loads and verifies the model now, so a bad bundle fails here, clearly
    except (DermscreenError, ValidationError) as exc:
        message = "; ".join(_setting_error(e) for e in exc.errors()) if isinstance(exc, ValidationError) \
            else str(exc)
        typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    host, port, workers, log_level = settings.host, settings.port, settings.workers, settings.log_level
    tls = settings.tls_cert is not None
    if not _is_loopback(host) and not tls:
        typer.secho(f"Listening on {host}: other machines on the network can reach this server, and it speaks plain "
                    "HTTP, so images would cross the network unencrypted. Serve HTTPS (--tls-cert and --tls-key) "
                    "or put it behind a TLS reverse proxy before sending patient images over a network.",
                    fg=typer.colors.YELLOW, err=True)
    card = app.state.screener.bundle.manifest
    # 0.0.0.0 / :: listen everywhere but are no address to open (nor the one a certificate names)
    where = "<this machine's address>" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
    typer.echo(f"dermscreen: model {card.name} {card.version}; open {'https' if tls else 'http'}://{where}:{port}/ "
               "(screening aid, not a diagnosis).", err=True)
    common = dict(host=host, port=port, log_config=log_config(log_level), log_level=log_level,
                  access_log=False, server_header=False, proxy_headers=False,
                  ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    if workers == 1:
        uvicorn.run(app, **common)
    else:
        del app  # the supervisor only watches workers; each worker rebuilds the app from the environment
        os.environ.update(settings.to_env())
        uvicorn.run("dermscreen.serve.app:create_app", factory=True, workers=workers, **common)
