"""Server settings, read from ``DERMSCREEN_*`` environment variables or set by ``dermscreen serve`` flags.

Environment variables are the hand-over between the CLI and uvicorn's worker processes: with
``--workers N`` each worker builds its own app from the same environment.
"""
from __future__ import annotations

import os
import sys

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MB = 1024 * 1024


class ServeSettings(BaseSettings):
    """Everything the web app and REST API can be configured with (env prefix ``DERMSCREEN_``)."""

    model_config = SettingsConfigDict(env_prefix="DERMSCREEN_", extra="ignore", protected_namespaces=())

    host: str = Field("127.0.0.1", description="Interface to listen on; 0.0.0.0 exposes the server to the network.")
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="Server processes; each loads its own copy of the model.")
    model: str | None = Field(None, description="Model bundle (folder or zip) or an installed model's name (default, "
                                                "default-int8); empty = the shipped default model.")
    max_upload_mb: float = Field(20.0, gt=0, le=1024, description="Largest accepted request body, in MiB.")
    max_buffered_mb: float = Field(256.0, gt=0, le=65536, description="Request bodies held in memory by all "
                                   "requests together, in MiB; uploads beyond it are answered 503 (busy).")
    upload_idle_timeout_s: float = Field(15.0, gt=0, le=3600, description="An upload that sends nothing for this "
                                         "long is refused (408), so a stalled client does not hold its memory.")
    upload_timeout_s: float = Field(300.0, gt=0, le=86400, description="An upload not complete this long after "
                                    "it began is refused (408); 300 s lets 20 MiB through at ~0.6 Mbit/s.")
    max_pixels: int | None = Field(None, ge=10_000, description="Largest decoded image (width x height), "
                                   "checked before decoding; empty = the Screener's default.")
    concurrency: int | None = Field(None, ge=1, le=256, description="Analyses run at once per worker; more requests "
                                    "wait their turn (empty = the CPU cores shared among the workers).")
    threads: int | None = Field(None, ge=1, le=256, description="onnxruntime intra-op threads per analysis "
                                "(empty = CPU cores / concurrency, so analyses never oversubscribe the cores).")
    tta: bool = Field(False, description="Test-time augmentation (flips) unless a request says otherwise.")
    warm_up: bool = Field(True, description="Right after start, run one synthetic analysis in the background, so "
                          "the first real request does not pay for first-use costs (~0.5 s).")
    helper_process: bool | None = Field(None, description="Run analyses in a second process too, forked after "
                                        "the model is loaded (it shares the model's memory); empty = on, on Linux "
                                        "with one worker, more than one CPU core and one thread per analysis.")
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")
    tls_cert: str | None = Field(None, description="PEM certificate (chain) to serve HTTPS with; needs tls_key. "
                                 "Without it the server speaks plain HTTP, fit for this machine only.")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert (not protected by a passphrase).")

    @model_validator(mode="after")
    def _share_the_cores(self) -> "ServeSettings":
        # N workers each running cores analyses at once would put N x cores analyses on the cores
        if self.concurrency is None:
            self.concurrency = max(1, (os.cpu_count() or 1) // self.workers)
        return self

    @model_validator(mode="after")
    def _helper_where_it_helps(self) -> "ServeSettings":
        # One process keeps ~1.5 of 2 cores busy (its interpreter lock); a helper is worth its start and memory
        # only with cores to spare and when no --workers processes share them already. It is forked with the
        # onnxruntime sessions in it, which is safe only while they have no thread pool (one thread each): a
        # fork copies no threads, and a session would wait forever for its pool's.
        safe = self.threads_per_analysis == 1
        if self.helper_process is None:  # (Linux: see serve/helper.py for why not elsewhere)
            self.helper_process = (safe and self.workers == 1 and (os.cpu_count() or 1) > 1
                                   and sys.platform.startswith("linux"))
        elif self.helper_process and not safe:
            raise ValueError("the helper process needs one onnxruntime thread per analysis (DERMSCREEN_THREADS=1, or "
                             "--concurrency equal to the CPU cores); turn it off (--no-helper-process) to use more "
                             "threads per analysis")
        return self

    @model_validator(mode="after")
    def _one_upload_fits(self) -> "ServeSettings":
        if self.max_buffered_mb < self.max_upload_mb:
            raise ValueError(f"max_buffered_mb ({self.max_buffered_mb:g}) must be at least max_upload_mb "
                             f"({self.max_upload_mb:g}), or no upload of the largest allowed size could be received")
        return self

    @model_validator(mode="after")
    def _tls_loads(self) -> "ServeSettings":
        # Checked here, before the model loads and before uvicorn starts, so a wrong file is one sentence
        # rather than a traceback from inside uvicorn (and uvicorn would prompt on the terminal for a passphrase).
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("HTTPS needs both a certificate (--tls-cert) and its private key (--tls-key)")
        if self.tls_cert is not None:
            check_tls_files(self.tls_cert, self.tls_key)
        return self

    @property
    def max_buffered_bytes(self) -> int:
        """The all-requests in-memory body budget in bytes."""
        return int(self.max_buffered_mb * MB)

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes."""
        return int(self.max_upload_mb * MB)

    @property
    def threads_per_analysis(self) -> int:
        """onnxruntime threads per analysis: as set, else the cores shared among the concurrent analyses."""
        # One thread per concurrent analysis measured 1.8-2.2x faster than onnxruntime's default (all
        # cores per analysis) at every load on the shared 2-core machine: its spinning threads contend.
        return self.threads or max(1, (os.cpu_count() or 1) // self.concurrency)

    def to_env(self) -> dict[str, str]:
        """These settings as ``DERMSCREEN_*`` variables, for worker processes to read back."""
        env = {}
        for name, value in self.model_dump().items():
            if value is not None:
                env[f"DERMSCREEN_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env


def check_tls_files(cert: str, key: str) -> None:
    """Raise ValueError with a sentence unless ``cert`` and ``key`` are a PEM certificate and its unencrypted key."""
    import ssl

    for name, path in (("certificate", cert), ("private key", key)):
        if os.path.isdir(path):
            raise ValueError(f"the TLS {name} {path} is a folder: give the {name}'s file")
        if not os.path.isfile(path):
            raise ValueError(f"the TLS {name} file {path} does not exist")

    def no_passphrase() -> bytes:
        raise ValueError(f"the private key {key} is protected by a passphrase; serve with an unencrypted copy "
                         "(e.g. `openssl pkey -in KEY -out plain.key`, readable only by the server's user)")

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"the private key {key} does not belong to the certificate {cert}") from None
        raise ValueError(f"could not read {cert} and {key} as a PEM certificate and its private key") from None
    except OSError as exc:
        raise ValueError(f"could not read the TLS files: {exc.strerror or exc}") from None
