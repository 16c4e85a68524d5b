"""The web app and REST API: ``create_app(settings)`` returns a FastAPI application.

One Screener does all the work, in worker threads of this process and, on a machine with cores to spare,
in a helper process forked after the model is loaded (serve/helper.py: one process's interpreter lock keeps
~1.5 of 2 cores busy); this module only moves bytes in and JSON out.
Privacy rules that shape the code: request bodies are read into memory by our own capped reader
(never Starlette's disk-spooling form parser), nothing is stored between requests, no cookies,
no external assets, and the access log has no query strings, addresses or results.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import DISCLAIMER, __version__
from ..errors import BundleError, DermscreenError, ImageError
from ..metadata import HAM10000_SITES, sex_code
from ..screening import Screener, ScreenerSettings, ScreeningResult
from .middleware import (UNEXPECTED_MESSAGE, AccessLogMiddleware, PrivacyHeadersMiddleware,
                         UnexpectedErrorMiddleware)
from .helper import HELPER_CHANNELS, AnalysisHelper
from .settings import ServeSettings
from .uploads import MemoryBudget, Upload, UploadError, multipart_boundary, parse_multipart, read_capped

log = logging.getLogger("dermscreen.serve")
STATIC = Path(__file__).parent / "static"
API = "/api/v1"


class AnalyzeOptions(BaseModel):
    """Optional patient metadata and analysis switches for one image."""

    model_config = ConfigDict(extra="forbid")

    age: float | None = Field(None, ge=0, le=120, allow_inf_nan=False, description="Age in years.")
    sex: Literal["male", "female", "unknown"] | None = Field(None, description="male, female or unknown.")
    site: str | None = Field(None, description="Anatomical site, e.g. 'back' (see GET /api/v1/model for the list).")
    heatmap: bool = Field(True, description="Include the heatmap overlay as a PNG data URL.")
    tta: bool | None = Field(None, description="Test-time augmentation (flips; 4x slower; the referral thresholds "
                             "were set without it); empty = the server's default.")
    preview: bool = Field(False, description="Include the analysed image (upright, sRGB, at the overlays' size) "
                                             "as a JPEG data URL in preview_jpeg, for clients that cannot display "
                                             "the upload's format (TIFF, HEIC, DICOM).")

    @field_validator("age", "sex", "site", "tta", mode="before")
    @classmethod
    def _blank_is_missing(cls, value: Any) -> Any:
        # HTML forms send empty strings for untouched fields
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("sex", mode="before")
    @classmethod
    def _sex_aliases(cls, value: Any) -> Any:
        return sex_code(value) or value  # an unknown spelling is left for the Literal to refuse


class ErrorBody(BaseModel):
    """Every error answer: HTTP status, its short reason, and a sentence saying what to do."""

    status: int
    error: str
    message: str


class Health(BaseModel):
    """GET /healthz: the server is up and which model it serves."""

    status: Literal["ok"]
    version: str
    model: dict[str, str]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in [
        (400, "Malformed request body, or the client closed the connection before the upload was complete."),
        (408, "The upload stalled or took too long (see the server's upload timeouts)."),
        (413, "The upload is over the server's size limit, or the image has more pixels than it analyses."),
        (415, "Not an image format the server can read."),
        (422, "Unreadable or refused image, or invalid options."),
        (503, "The server is busy receiving other uploads; try again after Retry-After seconds."),
    ]
}

IMAGE_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "The image: either a multipart form (file in field `image`, optional fields age, sex, "
                       "site, heatmap, tta, preview) or the raw image bytes as the body (options as query parameters).",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"},
                "age": {"type": "number"}, "sex": {"type": "string", "enum": ["male", "female", "unknown"]},
                "site": {"type": "string"}, "heatmap": {"type": "boolean"}, "tta": {"type": "boolean"},
                "preview": {"type": "boolean"}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def error_response(status: int, message: str) -> JSONResponse:
    """A JSON error answer with the status's reason phrase and ``message``."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    return JSONResponse({"status": status, "error": reason, "message": message}, status_code=status)


def build_screener(settings: ServeSettings) -> Screener:
    """The Screener for ``settings`` (model bundle, pixel limit, TTA, threads)."""
    limits = {"max_pixels": settings.max_pixels} if settings.max_pixels else {}
    return Screener(bundle=settings.model, settings=ScreenerSettings(
        tta=settings.tta, threads=settings.threads_per_analysis, **limits))


def model_card(screener) -> dict[str, Any]:
    """The Screener's model card plus what a client needs to build its form: taxonomy name and body sites."""
    m = screener.bundle.manifest
    spec = m.model.metadata
    return {**screener.model_card(), "taxonomy": m.taxonomy.name,
            "sites": spec.sites if spec else HAM10000_SITES}


async def read_upload(request: Request, limit: int, budget: MemoryBudget) -> Upload:
    """The image (and any form fields) from a multipart or raw-body request, read in memory under ``limit``.

    The body's bytes stay reserved in ``budget``; the caller gives back ``upload.body_size`` when done.
    """
    settings: ServeSettings = request.app.state.settings
    try:
        body = await read_capped(request.stream(), limit, request.headers.get("content-length"), budget,
                                 settings.upload_idle_timeout_s, settings.upload_timeout_s)
    except ClientDisconnect:  # the client gave up or lost its connection: nobody to answer, nothing failed
        raise UploadError(400, "The client closed the connection before the upload was complete.") from None
    try:
        upload = _split_body(body, request.headers.get("content-type", ""))
    except BaseException:
        budget.give(len(body))
        raise
    upload.body_size = len(body)
    return upload


def _split_body(body: bytes, content_type: str) -> Upload:
    """The Upload in a raw or multipart body."""
    boundary = multipart_boundary(content_type) if content_type else None
    upload = parse_multipart(body, boundary) if boundary else Upload(data=body, content_type=content_type or None)
    if not upload.data:
        raise UploadError(422, "No image was sent: the upload is empty.")
    return upload


def _refuse_repeated_query(request: Request) -> None:
    """A query option given twice (?age=30&age=40) is refused, as a repeated form field is: the framework would
    keep one of them, and the answer must not depend on which."""
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name in seen:
            raise UploadError(422, f"The query option '{name}' was sent more than once: send it once.")
        seen.add(name)


def parse_options(query: AnalyzeOptions, fields: dict[str, str]) -> AnalyzeOptions:
    """Query options overridden by form fields, validated (the Screener checks the site against its model)."""
    unknown = sorted(set(fields) - set(AnalyzeOptions.model_fields))
    if unknown:  # a misspelt option ("hetmap") silently ignored would answer with settings the client did not ask
        raise UploadError(422, f"Unknown form field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                               f"the form takes image, {', '.join(AnalyzeOptions.model_fields)}.")
    merged = {**query.model_dump(exclude_unset=True), **fields}
    try:
        options = AnalyzeOptions.model_validate(merged)
    except ValidationError as exc:
        raise UploadError(422, "Invalid option: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    return options


def _install_error_handlers(app: FastAPI) -> None:
    """Every failure becomes a JSON ErrorBody; none stops the server."""

    @app.exception_handler(UploadError)
    async def _upload(_: Request, exc: UploadError):
        response = error_response(exc.status, str(exc))
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(ImageError)
    async def _image(_: Request, exc: ImageError):
        return error_response(getattr(exc, "http_status", 422), str(exc))

    @app.exception_handler(BundleError)
    async def _bundle(_: Request, exc: BundleError):
        log.error("model failure: %s", exc)
        return error_response(500, f"The model could not run: {exc}")

    @app.exception_handler(DermscreenError)
    async def _dermscreen(_: Request, exc: DermscreenError):
        return error_response(getattr(exc, "http_status", 422), str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return error_response(422, "Invalid request: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        allow = (exc.headers or {}).get("Allow")
        if exc.status_code == 405 and allow:
            message = f"{request.method} is not allowed on {request.url.path}; use {allow.replace(', ', ' or ')}."
        elif exc.status_code == 404:
            message = (f"Not found: {request.url.path}. The web page is at /, the API at {API}/analyze and "
                       f"{API}/model, its documentation at /docs.")
        response = error_response(exc.status_code, message)
        response.headers.update(exc.headers or {})  # e.g. Allow, which a 405 must carry
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        # a last resort: UnexpectedErrorMiddleware answers first, without the traceback this path leads to
        log.error("unexpected %s while answering a request", type(exc).__name__)  # the type only: see there
        return error_response(500, UNEXPECTED_MESSAGE)


def analyse_to_json(screener: Screener, data: bytes, options: dict[str, Any]) -> bytes:
    """One image's answer as JSON bytes: what a request gets, wherever it is computed (thread or helper)."""
    result = screener.analyze(data, age=options["age"], sex=options["sex"], site=options["site"],
                              heatmap=options["heatmap"], tta=options["tta"], filename=options["filename"])
    # the outline is a few hundred bytes: always sent, so the page can draw it without the heatmap
    return json.dumps(result.to_json(include_heatmap=options["heatmap"], include_outline=True,
                                     include_preview=options["preview"]), separators=(",", ":")).encode()


async def _analyze(screener: Screener, upload: Upload, options: AnalyzeOptions, limiter: anyio.CapacityLimiter,
                   helper: AnalysisHelper | None, own_slot: threading.Lock) -> Response:
    """Run the analysis in a worker thread of this process, or in the helper process when this process is
    already analysing another image (at most ``limiter`` requests at once, both kinds together); answer its JSON."""
    args = {"age": options.age, "sex": options.sex, "site": options.site, "heatmap": options.heatmap,
            "tta": options.tta, "preview": options.preview, "filename": upload.filename}

    def run() -> bytes:
        # PNG and JSON encoding happen here too, in the worker thread, not on the event loop.
        # This process first: one request at a time then never pays the trip to the helper and back (two
        # process wake-ups, which cost the most when the VM's host is busy).
        own = own_slot.acquire(blocking=False)
        try:
            if not own and helper is not None:
                answer = helper.try_analyse(upload.data, args)
                if answer is not None:
                    return answer
            return analyse_to_json(screener, upload.data, args)  # this process's turn, or the helper is busy or gone
        finally:
            if own:
                own_slot.release()

    return Response(await anyio.to_thread.run_sync(run, limiter=limiter), media_type="application/json")


def _install_routes(app: FastAPI, settings: ServeSettings, screener, limiter: anyio.CapacityLimiter,
                    budget: MemoryBudget) -> None:
    """The API endpoints and the page."""
    card = model_card(screener)
    identity = {"name": card["name"], "version": card["version"], "sha256": card["sha256"]}
    index_html = (STATIC / "index.html").read_text(encoding="utf-8")
    docs_html = (STATIC / "docs.html").read_text(encoding="utf-8")

    result_doc = {"model": ScreeningResult, "description": "The screening result (a screening aid, not a diagnosis)."}

    @app.post(f"{API}/analyze", tags=["screening"], summary="Screen one dermoscopic image",
              openapi_extra=IMAGE_BODY_DOC, responses={200: result_doc, **ERROR_RESPONSES})
    async def analyze(request: Request, query: Annotated[AnalyzeOptions, Query()]) -> Response:
        """Analyse one image (multipart or raw body) and return the Screener's result as JSON."""
        _refuse_repeated_query(request)
        upload = await read_upload(request, settings.max_upload_bytes, budget)
        try:
            return await _analyze(screener, upload, parse_options(query, upload.fields), limiter,
                                  app.state.helper, app.state.own_slot)
        finally:
            budget.give(upload.body_size)

    @app.get(f"{API}/model", tags=["model"], summary="The model card")
    async def model() -> dict[str, Any]:
        """The served model's card: taxonomy, metrics, operating points, licence, intended use."""
        return card

    @app.get("/healthz", tags=["service"], summary="Liveness and the served model")
    async def healthz() -> Health:
        """Whether the server is up, and the model it serves."""
        return Health(status="ok", version=__version__, model=identity)

    @app.head("/healthz", include_in_schema=False)  # uptime monitors and load balancers often probe with HEAD
    async def healthz_head() -> Response:
        return Response(status_code=200)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        """The one-page web app."""
        return HTMLResponse(index_html)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """The API documentation page, rendered in the browser from /openapi.json."""
        return HTMLResponse(docs_html)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        """No icon (and no 404 in the log)."""
        return Response(status_code=204)


def _no_telemetry() -> dict[str, Any]:
    """FastAPI arguments that switch off its native OpenTelemetry hooks, where this FastAPI has them."""
    import inspect

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    # off even if a global provider or FASTAPI_OTEL_AUTO_CONFIGURE is set: nothing leaves this server
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False,
                          "auto_configure": False}}


def create_app(settings: ServeSettings | None = None, screener=None) -> FastAPI:
    """The FastAPI app for ``settings`` (default: from the environment); ``screener`` overrides the model."""
    settings = settings or ServeSettings()
    screener = screener or build_screener(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        # the helper is forked first, while this process has no threads of its own running
        if settings.helper_process:
            app.state.helper = AnalysisHelper(functools.partial(analyse_to_json, screener),
                                              screener.warm_up if settings.warm_up else None)
        # once the app has started (not while the server still loads): in the background, so the server
        # answers, /healthz included, while it runs
        if settings.warm_up:
            threading.Thread(target=_warm_up, args=(screener,), name="dermscreen-warm-up", daemon=True).start()
        try:
            yield
        finally:
            if app.state.helper is not None:
                app.state.helper.close()
                app.state.helper = None

    app = FastAPI(
        lifespan=lifespan,
        **_no_telemetry(),
        title="dermscreen",
        version=__version__,
        description="Screening aid for skin lesions in dermoscopic images. " + DISCLAIMER,
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; /docs is served locally instead
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    app.state.screener = screener
    app.state.helper = None  # the helper process, while the app runs (see lifespan)
    app.state.own_slot = threading.Lock()  # held while this process analyses; the next request goes to the helper
    _install_error_handlers(app)
    app.state.upload_budget = MemoryBudget(settings.max_buffered_bytes)
    # with the helper, one more request is let in than analyses run: it waits in the helper's pipe, so the
    # helper starts it the moment it is done with the last (measured: +19 % at concurrency 16)
    admitted = settings.concurrency + (HELPER_CHANNELS - 1 if settings.helper_process else 0)
    _install_routes(app, settings, screener, anyio.CapacityLimiter(admitted), app.state.upload_budget)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(UnexpectedErrorMiddleware)  # innermost of the three: its 500 gets the privacy headers
    app.add_middleware(PrivacyHeadersMiddleware)
    app.add_middleware(AccessLogMiddleware)  # outermost: times and records everything, errors included
    return app


def _warm_up(screener) -> None:
    """Screener.warm_up, logged; a failure here only costs the first request its speed, so it is not fatal."""
    try:
        timings = screener.warm_up()
        log.info("warmed up on a synthetic image (%s)", ", ".join(f"{k} {v:.0f} ms" for k, v in timings.items()))
    except Exception as exc:  # a custom screener may lack warm_up, or a stage may fail on the synthetic image
        log.warning("warm-up skipped: %s", exc)
