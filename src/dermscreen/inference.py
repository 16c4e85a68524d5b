"""Batch prediction over image files with a model bundle (numpy, Pillow, onnxruntime; never torch).

Used by evaluation and benchmarks: every file is decoded (EXIF orientation applied, RGB), run through
:func:`dermscreen.preprocess.preprocess` — the same code training used — and fed to the bundle's ONNX
model in batches. Decoding runs in a thread pool one batch ahead of the model, so decoding and
onnxruntime (which releases the GIL) keep every core busy.

Test-time augmentation (``tta=True``) runs four views (identity, horizontal flip, vertical flip, both)
and **averages the logits** before the temperature is applied: the temperature was fitted on logits,
so it stays meaningful on their mean. The OOD score always uses the identity view's embedding, the
view its threshold was calibrated on.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from .bundle import DEFAULT_BUNDLE_DIR, MODEL_ENV, Bundle, resolve_bundle_path  # noqa: F401 (MODEL_ENV re-exported)
from .calibration import softmax
from .errors import BundleError, ImageError
from .manifests import Sample
from .imaging import read_image_file
from .ood import MahalanobisOOD
from .preprocess import Preprocessing, preprocess

DEFAULT_MODEL_DIR = DEFAULT_BUNDLE_DIR  # the shipped default, resolved in bundle.py for every front end
_PREFETCH_BATCHES = 2


@dataclass
class Predictions:
    """Per-image model outputs, row i for ``image_ids[i]``."""

    image_ids: list[str]
    logits: np.ndarray  # (N, C) raw logits (mean over TTA views when TTA is on)
    probs: np.ndarray  # (N, C) softmax(logits / temperature): the calibrated probabilities
    probs_uncalibrated: np.ndarray  # (N, C) softmax(logits)
    p_malignant: np.ndarray  # (N,) sum of calibrated malignant-class probabilities
    ood_score: np.ndarray  # (N,) higher = less like the training data; NaN when the bundle has no OOD stats
    in_distribution: np.ndarray  # (N,) bool: ood_score <= the bundle's threshold (True when no OOD stats)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def predicted(self) -> np.ndarray:
        """(N,) index of the most probable class."""
        return self.probs.argmax(axis=1)


def resolve_model(model: str | Path | None) -> Path:
    """The bundle path to use: ``model``, else $DERMSCREEN_MODEL, else the shipped default; BundleError if none."""
    return resolve_bundle_path(model)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file into an upright sRGB PIL image, as the Screener decodes uploads; ImageError naming the file."""
    return Image.fromarray(read_image_file(path))


def _load_input(path: Path, spec: Preprocessing) -> np.ndarray:
    return preprocess(load_rgb(path), spec)


def _decoded_batches(paths: Sequence[Path], spec: Preprocessing, batch_size: int,
                     pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """Yield (B,3,S,S) batches, decoding up to two batches ahead of the consumer."""
    chunks = iter([paths[i:i + batch_size] for i in range(0, len(paths), batch_size)])
    queue: deque[list[Future]] = deque()

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            queue.append([pool.submit(_load_input, p, spec) for p in chunk])

    for _ in range(_PREFETCH_BATCHES):
        submit_next()
    try:
        while queue:
            futures = queue.popleft()
            submit_next()
            yield np.stack([f.result() for f in futures])
    finally:
        # stop decoding ahead once the consumer is gone (an error, or a caller that stopped early)
        for futures in queue:
            for f in futures:
                f.cancel()


def _tta_views(batch: np.ndarray) -> list[np.ndarray]:
    return [batch, batch[..., ::-1], batch[..., ::-1, :], batch[..., ::-1, ::-1]]


def _run_batch(bundle: Bundle, batch: np.ndarray, metadata: np.ndarray | None, tta: bool,
               threads: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(logits averaged over views, identity-view embedding) for one batch."""
    names = ["logits", "embedding"]
    first = bundle.run(batch, metadata, threads=threads, outputs=names)
    if not tta:
        return first["logits"], first["embedding"]
    logits = [first["logits"]]
    for view in _tta_views(batch)[1:]:
        logits.append(bundle.run(np.ascontiguousarray(view), metadata, threads=threads, outputs=["logits"])["logits"])
    return np.mean(logits, axis=0), first["embedding"]


def _ood_scores(bundle: Bundle, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ood = bundle.manifest.ood
    if ood is None or "ood_mean" not in bundle.arrays:
        n = len(embeddings)
        return np.full(n, np.nan, dtype=np.float32), np.ones(n, dtype=bool)
    scores = MahalanobisOOD.from_arrays(bundle.arrays).score(embeddings)
    return scores, scores <= ood.threshold


def predict_files(bundle: Bundle, paths: Sequence[str | Path], metadata: np.ndarray | None = None,
                  batch_size: int = 32, tta: bool = False, workers: int | None = None,
                  threads: int | None = None, on_batch: Callable[[int], None] | None = None,
                  image_ids: Sequence[str] | None = None) -> Predictions:
    """Predict every image file with ``bundle``; ``metadata`` is (N, dim) when the model takes it.

    ``on_batch(n)`` is called after each batch with the number of images it held (for progress bars).
    Raises ImageError naming the first file that cannot be decoded.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ImageError("No images to predict.")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    spec = bundle.manifest.preprocessing
    workers = workers or max(2, min(8, os.cpu_count() or 2))
    logits, embeddings = [], []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dermscreen-decode") as pool:
        for start, batch in zip(range(0, len(paths), batch_size), _decoded_batches(paths, spec, batch_size, pool)):
            meta = None if metadata is None else metadata[start:start + len(batch)]
            lg, emb = _run_batch(bundle, batch, meta, tta, threads)
            logits.append(lg)
            embeddings.append(emb)
            if on_batch:
                on_batch(len(batch))
    return _assemble(bundle, list(image_ids) if image_ids is not None else [p.stem for p in paths],
                     np.concatenate(logits), np.concatenate(embeddings))


def _assemble(bundle: Bundle, ids: list[str], logits: np.ndarray, embeddings: np.ndarray) -> Predictions:
    manifest = bundle.manifest
    probs = softmax(logits, manifest.calibration.temperature)
    scores, inside = _ood_scores(bundle, embeddings)
    return Predictions(
        image_ids=ids, logits=logits.astype(np.float32), probs=probs,
        probs_uncalibrated=softmax(logits), p_malignant=manifest.taxonomy.p_malignant(probs),
        ood_score=scores, in_distribution=inside,
    )


def metadata_matrix(bundle: Bundle, samples: Sequence[Sample]) -> np.ndarray | None:
    """(N, dim) encoded age/sex/site of each sample when the bundle's model takes metadata, else None."""
    spec = bundle.manifest.model
    if "metadata" not in spec.inputs:
        return None
    if spec.metadata is None:
        raise BundleError(f"{bundle.source}: the model takes metadata but the manifest has no metadata encoding.")
    return np.stack([spec.metadata.encode(s.age, s.sex, s.site) for s in samples])


def predict_samples(bundle: Bundle, samples: Sequence[Sample], batch_size: int = 32, tta: bool = False,
                    workers: int | None = None, threads: int | None = None,
                    on_batch: Callable[[int], None] | None = None) -> Predictions:
    """Predict labelled samples (their metadata is fed when the model takes it); see :func:`predict_files`."""
    return predict_files(
        bundle, [s.image_path for s in samples], metadata=metadata_matrix(bundle, samples),
        batch_size=batch_size, tta=tta, workers=workers, threads=threads, on_batch=on_batch,
        image_ids=[s.image_id for s in samples],
    )
