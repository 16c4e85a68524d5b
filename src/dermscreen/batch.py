"""Screen many image files on all cores: one Screener per worker process.

Threads in one process do not scale here: onnxruntime releases the interpreter lock, but the
Python and small-numpy work around it (decoding, quality gate, lesion outline, JSON) does not, so
two threads on two cores gave ~1.1x. Worker processes are started with ``spawn`` (never ``fork``:
a forked onnxruntime thread pool can deadlock) and each loads and verifies the bundle once.
The calling process is one of the workers: a spawned worker needs ~0.8 s on 2 cores to start, import
and verify the bundle before its first answer, and the caller analyses files meanwhile instead of
waiting (and whenever the next answer in order is not back yet).

Results come back in input order as JSON-ready dicts (``ScreeningResult.to_json()``), so nothing but
the answer crosses the process boundary; the per-image files a caller asked for (HTML, FHIR,
heatmap PNG) are written by the worker that holds the image, under a name fixed beforehand.
"""
from __future__ import annotations

import multiprocessing
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import ImageError, printable

# Files a worker takes at a time. Its answers are small, so a chunk amortises the inter-process round trip, and the
# model runs once per chunk (Screener.analyze_many): on one core an int8 EfficientNet-Lite0 pair took 5.3 ms per
# image alone, 4.0 ms in fours and no less in eights.
CHUNK = 4


@dataclass
class FileOutcome:
    """One file's answer: the result as JSON (``result``), or why it could not be analysed (``error``)."""

    index: int
    path: Path
    result: Optional[dict] = None
    error: Optional[str] = None
    error_type: Optional[str] = None
    fatal: bool = False  # a problem with the options, not the file: every other file would fail alike
    written: tuple[Path, ...] = ()


# A writer is called in the worker as writer(path, stem, result, rgb) -> written paths; it must be picklable.
Writer = Callable[[Path, str, object, object], list]

_screener = None
_writer: Optional[Writer] = None
_options: dict = {}


def _init(model, settings, writer, options) -> None:
    global _screener, _writer, _options
    from .screening import Screener

    _screener = Screener(model, settings)
    _writer, _options = writer, options


def analyze_files(screener, jobs: list[tuple[int, Path, str]], writer: Optional[Writer],
                  options: dict) -> list[FileOutcome]:
    """Analyse (index, path, stem) jobs with ``screener``, the model once for all → FileOutcome per job, in order;
    a bad file becomes an error outcome, never an exception."""
    outcomes: dict[int, FileOutcome] = {}
    readable = []
    for index, path, stem in jobs:
        try:
            readable.append((index, path, stem, _read_image_bytes(path)))
        except (ImageError, OSError) as exc:
            outcomes[index] = _error(index, path, exc)
    answers = screener.analyze_many([(data, printable(path.name)) for _, path, _, data in readable], **options)
    unwritable: Optional[FileOutcome] = None  # once a report could not be written, no later one is attempted
    for (index, path, stem, _), result in zip(readable, answers):
        if isinstance(result, Exception):
            outcomes[index] = _error(index, path, result)
        elif unwritable is not None:
            outcomes[index] = FileOutcome(index, path, result.to_json(), error=unwritable.error,
                                          error_type=unwritable.error_type, fatal=True)
        else:
            outcomes[index] = _written(index, path, stem, result, writer)
            unwritable = outcomes[index] if outcomes[index].fatal else None
    return [outcomes[index] for index, _, _ in jobs]


def _error(index: int, path: Path, exc: Exception) -> FileOutcome:
    """The outcome of a file that could not be analysed."""
    if isinstance(exc, (ImageError, OSError)):
        message = str(exc) if isinstance(exc, ImageError) else f"cannot read the file ({exc.strerror or exc})."
        return FileOutcome(index, path, error=message, error_type=type(exc).__name__)
    # e.g. an unknown --site: it fails every file alike
    return FileOutcome(index, path, error=str(exc), error_type=type(exc).__name__, fatal=True)


def _written(index: int, path: Path, stem: str, result, writer: Optional[Writer]) -> FileOutcome:
    """The outcome of an analysed file, once the files the caller asked for (``writer``) are written."""
    try:
        written = tuple(writer(path, stem, result, result.image_rgb)) if writer else ()
    except OSError as exc:  # a full disk or a folder made read-only: every next report would fail alike
        where = f" {exc.filename}" if exc.filename else ""
        return FileOutcome(index, path, result.to_json(), error_type=type(exc).__name__, fatal=True,
                           error=f"could not write the report{where} ({exc.strerror or exc}); this image's result "
                                 "is above, the images after it are not shown.")
    return FileOutcome(index, path, result.to_json(), written=written)


# Larger files are refused before they are read: a 50-megapixel image (the Screener's pixel limit) is under
# 300 MB even as uncompressed 16-bit RGB TIFF, and reading a 3 GB file only to refuse it took 9 s and 3 GB of memory.
MAX_FILE_BYTES = 300 * 1024 * 1024


def _read_image_bytes(path: Path) -> bytes:
    """The bytes of an image file; UnsupportedImageError for what is not a regular file or far too large."""
    from .imaging import UnsupportedImageError

    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # /dev/zero, a pipe or a socket would be read forever
        raise UnsupportedImageError(f"{path.name}: this is not a regular file; give an image file.")
    if info.st_size > MAX_FILE_BYTES:
        raise UnsupportedImageError(f"{path.name}: this file is {info.st_size / 2**20:,.0f} MB; image files over "
                                    f"{MAX_FILE_BYTES // 2**20} MB are not read. Export the image smaller.")
    return path.read_bytes()


def _work_chunk(jobs: list[tuple[int, Path, str]]) -> list[FileOutcome]:
    """A chunk of files, in a worker process (one round trip per chunk: the answers are small)."""
    return analyze_files(_screener, jobs, _writer, _options)


def unique_stems(paths: list[Path]) -> list[str]:
    """A distinct file stem per path (two folders may hold files of the same name): a, a-2, a-3, …"""
    used: set[str] = set()
    stems = []
    for path in paths:
        stem, n = path.stem, 1
        while stem in used:
            n += 1
            stem = f"{path.stem}-{n}"
        used.add(stem)
        stems.append(stem)
    return stems


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def screen_files(paths: list[Path], model, settings, *, workers: int | None = None, writer: Optional[Writer] = None,
                 screener=None, **options) -> Iterator[FileOutcome]:
    """Analyse ``paths`` → FileOutcome per file, in input order.

    ``options`` are Screener.analyze keywords (heatmap, tta, age, sex, site). With ``workers`` > 1
    and more files than workers, this process (with ``screener`` if given, else one it loads) and
    ``workers`` - 1 spawned processes share the files (``settings.threads`` each, best 1); otherwise
    they all run here.
    """
    workers = default_workers() if workers is None else max(1, workers)
    stems = unique_stems(paths)
    jobs = [(i, Path(p), s) for i, (p, s) in enumerate(zip(paths, stems))]
    if workers == 1 or len(jobs) <= workers:
        if screener is None:
            from .screening import Screener

            screener = Screener(model, settings)
        for k in range(0, len(jobs), CHUNK):
            yield from analyze_files(screener, jobs[k:k + CHUNK], writer, options)
        return
    chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]
    queued = 4 * (workers - 1)  # chunks handed to the pool ahead: enough that no spawned worker idles
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers - 1, mp_context=context, initializer=_init,
                               initargs=(model, settings, writer, options))
    pending: dict = {}  # chunk number → Future, for chunks given to the pool
    done_here: dict[int, list[FileOutcome]] = {}  # chunks this process analysed, until it is their turn
    # chunk 0 is this process's own, so the first answer does not wait for a worker to start (~1 s)
    given = 1  # chunks handed out so far (to the pool or to this process), in order

    def here(k: int) -> list[FileOutcome]:
        return analyze_files(screener, chunks[k], writer, options)

    def top_up() -> None:
        nonlocal given
        while given < len(chunks) and len(pending) < queued:
            pending[given] = pool.submit(_work_chunk, chunks[given])
            given += 1

    finished = False
    try:
        top_up()  # first, so the workers start while this process loads its screener
        if screener is None:
            from .screening import Screener

            screener = Screener(model, settings)
        done_here[0] = here(0)
        for turn in range(len(chunks)):
            # analyse the next unclaimed chunk here while the answer due next is still being worked on
            while turn not in done_here and not pending[turn].done() and given < len(chunks):
                done_here[given] = here(given)
                given += 1
                top_up()
            outcomes = done_here.pop(turn) if turn in done_here else pending.pop(turn).result()
            top_up()
            yield from outcomes
        finished = True
    finally:
        # Every answer is in: the workers' teardown (onnxruntime and the interpreter, ~0.13 s) overlaps what the
        # caller does next, e.g. printing the table; Python still joins them before the process exits. Stopped
        # early (any exception), queued chunks are dropped and this waits for the running ones, so no report is
        # written after it returns.
        pool.shutdown(wait=not finished, cancel_futures=not finished)
