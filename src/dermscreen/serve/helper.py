"""A second analysis process for the server, forked after the model is loaded.

Why: one Python process cannot keep two cores busy with analyses. onnxruntime releases the interpreter
lock, but the numpy and Pillow work around it (decoding, quality gate, lesion outline and ABCD, heatmap,
JSON) holds it ~half of the time, so two analyses in two threads of one process, plus the event loop, use
~1.5 of 2 cores. A helper process has its own interpreter lock.

Why forked, and after loading: the child inherits the loaded, verified bundle and the onnxruntime
sessions copy-on-write, so the weights and the Python modules are shared pages, not a second copy (a
second ``--workers`` process loads everything again: ~2x the memory). The sessions must run with one intra-op
thread (ServeSettings enforces it): a fork copies no threads, and a session with a thread pool would wait for
its pool forever in the child. It is forked before the server starts any thread of its own (the warm-up).

The server analyses a request itself when it is free; the helper takes one only while the server is busy
(app._analyze), so one request at a time never pays the trip between the processes. Linux only by default:
Windows cannot fork, and macOS system libraries are not safe to use in a forked child.

Privacy: the image travels to the child over a pipe (memory, never a file) and only the answer comes back;
the child keeps nothing between requests, exactly like the server's own threads.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from typing import Any, Callable

from ..errors import BundleError, DermscreenError, ImageError

log = logging.getLogger("dermscreen.serve")

WARM_UP_AFTER_S = 2.0  # a start takes ~1-2 s on 2 cores
# Requests the helper holds at once: one it analyses, one waiting in its pipe. Without the waiting one the child
# idled between answering and being handed the next (the server, busy with its own analysis and the event loop,
# is slow to hand it over): the helper used ~0.75 of a core at concurrency 16, and 2 channels gave 63.1 vs 52.9
# requests/s there (benchmarks/RESULTS.md, session 8).
HELPER_CHANNELS = 2

# analyse(data, options) -> the answer's JSON bytes; raises DermscreenError (or any exception) like Screener.analyze
Analyse = Callable[[bytes, dict[str, Any]], bytes]


class HelperError(DermscreenError):
    """An analysis that failed in the helper, carrying the status and sentence it failed with there."""

    def __init__(self, message: str, http_status: int):
        super().__init__(message)
        self.http_status = http_status


class HelperImageError(HelperError, ImageError):
    """The image was refused or unreadable (the helper raised an ImageError)."""


class HelperBundleError(HelperError, BundleError):
    """The model failed in the helper."""


def _child(analyse: Analyse, conns: list, servers_ends: list, warm_up: Callable[[], Any] | None) -> None:
    """The helper's loop: an image in on any channel, its answer (or the error's kind, status and sentence) out
    on the same one, until every channel is closed."""
    from multiprocessing.connection import wait

    # The fork copied the server's ends of the pipes too; while this process holds them, it would never see the
    # server close its own (or die), and would outlive it.
    for end in servers_ends:
        end.close()
    # Ctrl-C reaches the whole process group: the server shuts down, and this process ends when its pipes close.
    # The server's own SIGTERM handler (uvicorn's, which only asks its event loop to stop) came with the fork:
    # here a SIGTERM must end the process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)  # the server's event loop socket: a signal here must not wake the server's loop
    # Warm up once the server has had time to finish starting (it answers /healthz sooner with both cores), and
    # only if no request came meanwhile (a request warms the same caches itself).
    if warm_up is not None and not wait(conns, WARM_UP_AFTER_S):
        try:
            warm_up()
        except Exception:  # only the first request's speed depends on it
            pass
    conns = list(conns)
    while conns:
        for conn in wait(conns):  # every ready channel once per pass: none waits behind another twice
            _answer(analyse, conn, conns)
    os._exit(0)  # no atexit handlers or finalisers of the server's state inherited by the fork


def _answer(analyse: Analyse, conn, conns: list) -> None:
    """One request from ``conn`` answered on it; a channel the server closed is dropped from ``conns``."""
    try:
        data, options = conn.recv()
    except (EOFError, OSError):  # the server closed this channel
        conns.remove(conn)
        return
    try:
        answer = ("ok", analyse(data, options))
    except ImageError as exc:
        answer = ("image", str(exc), getattr(exc, "http_status", 422))
    except BundleError as exc:
        answer = ("bundle", str(exc), 500)
    except DermscreenError as exc:
        answer = ("dermscreen", str(exc), getattr(exc, "http_status", 422))
    except Exception as exc:  # the type only: a message could echo request content
        answer = ("unexpected", type(exc).__name__, 500)
    del data
    try:
        conn.send(answer)
    except (BrokenPipeError, OSError):
        conns.remove(conn)


class AnalysisHelper:
    """One forked child process that runs ``analyse`` for the server, one request at a time, with at most
    ``channels`` requests outstanding (a pipe and a lock each; see HELPER_CHANNELS)."""

    def __init__(self, analyse: Analyse, warm_up: Callable[[], Any] | None = None, channels: int = HELPER_CHANNELS):
        context = multiprocessing.get_context("fork")
        pipes = [context.Pipe() for _ in range(channels)]
        self._channels = [(ours, threading.Lock()) for ours, _ in pipes]
        self._gone = False
        self.answered = 0  # analyses the child completed (errors included): how tests see it did the work
        self._count = threading.Lock()
        self.process = context.Process(target=_child, name="dermscreen-analysis", daemon=True,
                                       args=(analyse, [theirs for _, theirs in pipes], [ours for ours, _ in pipes],
                                             warm_up))
        self.process.start()
        for _, theirs in pipes:
            theirs.close()

    def try_analyse(self, data: bytes, options: dict[str, Any]) -> bytes | None:
        """The child's answer for one image, or None when all its channels are taken or it is gone (then the
        caller runs the analysis itself). Blocking: call it from a worker thread."""
        if self._gone:
            return None
        channel = next(((conn, lock) for conn, lock in self._channels if lock.acquire(blocking=False)), None)
        if channel is None:
            return None
        conn, lock = channel
        try:
            try:
                conn.send((data, options))
                answer = conn.recv()
            except (EOFError, OSError) as exc:
                self._gone = True
                self.process.join(timeout=1)  # reap it: a dead child left unwaited stays a zombie until we exit
                log.error("the analysis helper process exited (%s, exit code %s); analyses continue in the server "
                          "process", type(exc).__name__, self.process.exitcode)
                return None
        finally:
            lock.release()
        with self._count:
            self.answered += 1
        kind = answer[0]
        if kind == "ok":
            return answer[1]
        if kind == "image":
            raise HelperImageError(answer[1], answer[2])
        if kind == "bundle":
            raise HelperBundleError(answer[1], answer[2])
        if kind == "dermscreen":
            raise HelperError(answer[1], answer[2])
        raise RuntimeError(f"{answer[1]} in the analysis helper")

    def close(self) -> None:
        """End the child: closing its pipes ends its loop; it is killed if it does not end at once."""
        try:
            for conn, _ in self._channels:
                conn.close()
        finally:
            self.process.join(timeout=2)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=2)
