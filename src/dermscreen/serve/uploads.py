"""Request bodies held in memory only: a size-capped reader and an in-memory multipart parser.

Starlette's form parser spools any upload over 1 MB to a temporary file on disk. A patient's
image must never touch the disk, so the API reads the raw stream itself (refusing it as soon as
it passes the limit, before the rest arrives) and splits multipart/form-data in memory.
"""
from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value

import anyio

MAX_PARTS = 32
MAX_PART_HEADER_BYTES = 8 * 1024
MAX_TEXT_FIELD_BYTES = 4 * 1024


class UploadError(Exception):
    """A request body we refuse; ``status`` is the HTTP status to answer with, ``headers`` any extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class MemoryBudget:
    """Request-body bytes held in memory by all requests together, capped: beyond it uploads get a 503.

    The per-upload limit bounds one request; this bounds many at once, so a burst of large uploads
    cannot exhaust the server's memory. Only touched from the event loop, so it needs no lock.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        """Reserve ``n`` bytes, or raise UploadError(503) when that would pass the cap."""
        if self.used + n > self.limit:
            raise UploadError(503, "The server is busy receiving other images; try again in a few seconds.",
                              {"Retry-After": "2"})
        self.used += n

    def give(self, n: int) -> None:
        """Release ``n`` bytes reserved with take()."""
        self.used -= n


@dataclass
class Upload:
    """The image bytes of one request, with its declared file name/type and any text fields."""

    data: bytes
    filename: str | None = None
    content_type: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    body_size: int = 0  # bytes of the whole request body (reserved in the MemoryBudget while analysed)


def too_large(limit: int) -> UploadError:
    """The 413 error for a body over ``limit`` bytes."""
    return UploadError(413, f"The upload is larger than this server accepts ({limit / 2**20:g} MiB). "
                            "Send a smaller image, e.g. a JPEG export of it.")


async def read_capped(chunks: AsyncIterator[bytes], limit: int, declared_length: str | None = None,
                      budget: MemoryBudget | None = None, idle_timeout: float = math.inf,
                      deadline: float = math.inf) -> bytes:
    """Concatenate a body's ``chunks``; raise UploadError(413) once it exceeds ``limit`` bytes.

    With a ``budget``, every byte read is reserved in it (503 when it is spent); on success the caller
    owns the reservation of ``len(result)`` bytes and must give it back; on failure it is given back here.
    A body that stalls for ``idle_timeout`` seconds, or is not complete ``deadline`` seconds after reading
    began, is refused with 408: a client that stops sending would otherwise hold its share of the budget
    for as long as it keeps the connection open, and a few such clients would lock everyone else out.
    """
    if declared_length is not None:
        try:
            declared = int(declared_length)
        except ValueError:
            raise UploadError(400, "The Content-Length header is not a number.") from None
        if declared > limit:
            raise too_large(limit)  # refuse before reading a single byte
    buf = bytearray()
    stop_at = anyio.current_time() + deadline
    stream = chunks.__aiter__()
    try:
        while True:
            wait = min(idle_timeout, stop_at - anyio.current_time())
            try:
                with anyio.fail_after(max(wait, 0.0)):
                    chunk = await stream.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                stalled = wait == idle_timeout
                raise UploadError(408, f"The upload {'stalled' if stalled else 'took too long'}: "
                                       f"{'no data arrived for' if stalled else 'it was not complete after'} "
                                       f"{wait if stalled else deadline:g} s. Check the connection and send the "
                                       "image again.", {"Connection": "close"}) from None
            if budget is not None:
                budget.take(len(chunk))
            buf += chunk
            if len(buf) > limit:
                raise too_large(limit)  # a chunked or lying client: stop reading now
    except BaseException:
        if budget is not None:
            budget.give(len(buf))
        raise
    return bytes(buf)


def _header_params(value: str) -> tuple[str, dict[str, str]]:
    """Split a MIME header value into its main value and parameters (quoted strings handled)."""
    msg = Message()
    msg["content-type"] = value
    params = dict(msg.get_params(failobj=[])[1:])
    main = value.split(";", 1)[0].strip().lower()
    return main, {k.lower(): v for k, v in params.items()}


def multipart_boundary(content_type: str) -> bytes | None:
    """The boundary of a multipart/form-data Content-Type, or None for any other type."""
    main, params = _header_params(content_type)
    if main != "multipart/form-data":
        return None
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise UploadError(400, "The multipart request has no valid boundary; let your HTTP client build the form.")
    return boundary.encode("latin-1")


def _parse_part(part: bytes) -> tuple[str | None, str | None, str | None, bytes]:
    """One part (headers CRLF CRLF body) as (field name, filename, content type, body)."""
    head_end = part.find(b"\r\n\r\n")
    if head_end < 0 or head_end > MAX_PART_HEADER_BYTES:
        raise UploadError(400, "A part of the multipart request has malformed headers.")
    name = filename = ctype = None
    for line in part[:head_end].decode("utf-8", "replace").split("\r\n"):
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "content-disposition":
            # reuse the Content-Type parameter parser: it handles quoting and RFC 2231 file names
            _, params = _header_params("x/x;" + value.partition(";")[2])
            name, filename = params.get("name"), params.get("filename")
            if isinstance(filename, tuple):  # RFC 2231 (filename*=UTF-8''...): (charset, language, value)
                filename = collapse_rfc2231_value(filename)
        elif key == "content-type":
            ctype = value.strip().lower()
    return name, filename, ctype, part[head_end + 4:]


def parse_multipart(body: bytes, boundary: bytes) -> Upload:
    """Split an in-memory multipart/form-data ``body`` into the image part and text fields.

    The image is the first part that carries a filename, else the part named ``image`` or ``file``.
    """
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    if start < 0:
        raise UploadError(400, "The multipart body does not contain its boundary; the form is malformed.")
    segments = body[start + len(delimiter):].split(b"\r\n" + delimiter)
    if len(segments) - 1 > MAX_PARTS:
        raise UploadError(400, f"The form has more than {MAX_PARTS} parts.")
    upload: Upload | None = None
    fields: dict[str, str] = {}
    for segment in segments:
        if segment.startswith(b"--"):
            break  # the closing delimiter
        if not segment.startswith(b"\r\n"):
            raise UploadError(400, "The multipart body is malformed (a boundary is not followed by a line break).")
        name, filename, ctype, data = _parse_part(segment[2:])
        if filename is not None or name in ("image", "file"):
            if upload is not None:  # which one would the answer be about? Refuse rather than guess
                raise UploadError(422, "The form has more than one image: send one image per request.")
            upload = Upload(data=data, filename=filename, content_type=ctype)
        elif name and len(data) <= MAX_TEXT_FIELD_BYTES:
            if name in fields:  # e.g. age=40 and age=abc: the answer must not depend on which one wins
                raise UploadError(422, f"The form field '{name}' was sent more than once: send it once.")
            fields[name] = data.decode("utf-8", "replace").strip()
    else:
        raise UploadError(400, "The multipart body ends without its closing boundary; the upload was cut short.")
    if upload is None:
        raise UploadError(422, "The form has no image: send the file in a field named 'image'.")
    upload.fields = fields
    return upload
