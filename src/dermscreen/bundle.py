"""The model bundle: ``manifest.json`` + ``model.onnx`` + ``arrays.npz`` (+ optional ``segmenter.onnx``).

A bundle is a folder or a zip of one. The manifest describes everything needed to reproduce a
prediction (taxonomy, preprocessing, temperature, operating points, OOD threshold) and the model
card (training data, licence, intended use, limits, validation metrics); ``files`` holds the
sha256 of every other file, and loading refuses a bundle whose files do not match.
``arrays.npz`` holds the classifier weights (for heatmaps) and the OOD statistics; it is read
with ``allow_pickle=False``: no pickles anywhere.

A zipped bundle is read into memory, never extracted to disk.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import re
import tempfile
import zipfile
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from . import __version__
from .calibration import OperatingPoint
from .errors import BundleError, ConfigError
from .metadata import MetadataSpec
from .preprocess import Preprocessing
from .taxonomy import Taxonomy

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
ARRAYS_FILE = "arrays.npz"
# How far a model's logits on its reference images may move from those recorded where it was made. An int8 model's
# are identical wherever its integer kernels are the same (0.0 at 1, 2 and all threads here); 0.1 is about a third
# of how far the default model's int8 logits lie from its float ones on those images (0.15-0.32), i.e. well inside
# what quantizing itself was validated with, and far beyond float rounding.
CHECK_LOGIT_TOLERANCE = 0.1
SEGMENTER_FILE = "segmenter.onnx"
SEGMENTER_BATCH_DIM = "N"  # the name train-segmenter gives the segmenter's dynamic batch axis
SCHEMA_VERSION = 1


class ModelSpec(BaseModel):
    """The ONNX graph's contract."""

    file: str = MODEL_FILE
    backbone: str
    # inputs: "image" (N,3,S,S) float32, and "metadata" (N, metadata.dim) float32 when metadata is set
    inputs: list[str] = ["image"]
    # outputs: "logits" (N,C), "embedding" (N,D) pooled features, "features" (N,D,h,w) last feature map
    outputs: list[str] = ["logits", "embedding", "features"]
    embedding_dim: int
    # an ensemble of this many ``backbone`` networks exported as one graph (their features concatenated)
    members: int = 1
    feature_stride: int = 32
    metadata: MetadataSpec | None = None


class SegmenterSpec(BaseModel):
    """How to run a bundle's ``segmenter.onnx``: input size, normalisation, threshold, and its measured quality."""

    file: str = SEGMENTER_FILE
    backbone: str = "tf_efficientnet_lite0"
    image_size: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    threshold: float = Field(0.5, ge=0, le=1, description="probability above which a pixel is lesion")
    # input "image" (N,3,S,S) float32 (whole frame squashed to S x S) → output "logits" (N,1,S,S)
    input: str = "image"
    output: str = "logits"
    validation: dict[str, float] = Field({}, description="e.g. dice, iou on held-out lesions, with CIs")


class OODSpec(BaseModel):
    """Out-of-distribution detection: method, threshold, and how the threshold was chosen."""

    method: str = "mahalanobis"
    threshold: float = Field(ge=0)  # a distance
    validation_kept: float = Field(ge=0, le=1, description="share of in-distribution validation images with score "
                                   "<= threshold")
    colour_threshold: float | None = Field(None, description="threshold of the colour-statistics check "
                                           "(ood.ColourOOD); None: the bundle has no colour check")
    colour_validation_kept: float | None = Field(None, description="share of validation images the colour check keeps")
    validation_kept_both: float | None = Field(None, description="share of validation images both checks keep")


class Calibration(BaseModel):
    # checked when a bundle is read: the manifest is not hashed (it holds the hashes), so a hand edit that made
    # the temperature negative would invert every probability and still load
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    ece_before: float | None = None
    ece_after: float | None = None
    split: str = "val"


class ModelCard(BaseModel):
    """What a user must know before trusting the model."""

    intended_use: str = (
        "Screening aid for dermoscopic images of skin lesions, to help clinicians decide which lesions "
        "to refer. Not a diagnosis; not for use on clinical (non-dermoscopic) photographs."
    )
    licence: str = "CC BY-NC-SA 4.0 (non-commercial use only; inherited from the training data)"
    training_data: str = ""
    limitations: list[str] = []
    citation: str = ""


class Manifest(BaseModel):
    """The bundle's self-description; see the module docstring."""

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = "0.1.0"
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    dermscreen_version: str = __version__
    taxonomy: Taxonomy
    preprocessing: Preprocessing
    model: ModelSpec
    calibration: Calibration = Calibration()
    operating_points: list[OperatingPoint] = []
    ood: OODSpec | None = None
    # the lesion segmenter (segmenter.onnx), when the bundle carries one; older bundles have none
    segmenter: SegmenterSpec | None = None
    # Quality-gate threshold overrides (field names of dermscreen.quality.QualityThresholds), for a
    # model trained on images unlike HAM10000's; empty = the measured defaults.
    quality: dict[str, float] = {}
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}
    card: ModelCard = ModelCard()
    files: dict[str, str] = {}

    def operating_point(self, name: str) -> OperatingPoint:
        for op in self.operating_points:
            if op.name == name:
                return op
        raise BundleError(f"This bundle has no operating point named {name!r} "
                          f"(it has: {', '.join(o.name for o in self.operating_points) or 'none'}).")


DEFAULT_BUNDLE_DIR = Path(__file__).parent / "models" / "default"
MODEL_ENV = "DERMSCREEN_MODEL"


SHIPPED_MODELS_DIR = DEFAULT_BUNDLE_DIR.parent


def shipped_models() -> list[str]:
    """Names of the bundles installed with the package ("default", "default-int8"), usable wherever a model path is."""
    try:
        return sorted(p.name for p in SHIPPED_MODELS_DIR.iterdir() if (p / MANIFEST).is_file())
    except OSError:
        return []


def _shipped_or_path(model: str | Path) -> Path:
    """A path as given; a bare name (a string without a folder part, as typed) that is no file or folder here but
    names a shipped bundle, that bundle. A Path object, or "./default-int8", is always a path: a folder the user
    meant but mistyped must be "not found", not quietly replaced by a shipped model."""
    bare = isinstance(model, str) and bool(model) and not model.startswith(".") and "/" not in model \
        and os.sep not in model
    if not bare or Path(model).exists():
        return Path(model)
    if (SHIPPED_MODELS_DIR / model / MANIFEST).is_file():
        return SHIPPED_MODELS_DIR / model
    shipped = shipped_models()
    hint = f" The models installed with dermscreen are named {', '.join(shipped)}." if shipped else ""
    raise BundleError(f"Model bundle not found: {model}.{hint}")


def resolve_bundle_path(model: str | Path | None) -> Path:
    """The bundle every front end uses: ``model``, else $DERMSCREEN_MODEL, else the shipped default; BundleError if
    none.

    ``model`` (and the variable) may also be the name of a shipped bundle, e.g. ``default-int8``; a file or folder
    of that name in the current folder comes first."""
    if model is not None and str(model):
        return _shipped_or_path(model)
    if os.environ.get(MODEL_ENV):
        return _shipped_or_path(os.environ[MODEL_ENV])
    for candidate in (DEFAULT_BUNDLE_DIR, DEFAULT_BUNDLE_DIR.with_suffix(".zip")):
        if candidate.exists():
            return candidate
    raise BundleError(
        "No model bundle was given and no default model is installed: pass --model PATH (a bundle folder "
        f"or zip), or set the {MODEL_ENV} environment variable."
    )


def check_output_folder(folder: str | Path) -> Path:
    """Raise ConfigError with a sentence unless ``folder`` is, or can be made, a folder we can write into.

    Run before any long work, so a bad ``--out`` fails at once; folders made for the check are removed again.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"Cannot write to {folder}: it is a file, not a folder. Choose another --out.")
    missing, parent = [], folder.absolute()
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"Cannot write to {folder}: {parent} is a file, not a folder. Choose another --out.")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dermscreen-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"Cannot write to {folder}: it is not writable ({exc.strerror or exc}). "
                          "Choose another --out.") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
    return folder


def check_new_bundle_folder(out: str | Path, source: str | Path) -> Path:
    """``out`` as a Path when a bundle derived from the one at ``source`` (refit-ood, add-segmenter, calibrate)
    can be written there: not the source itself nor a folder inside it, new or empty, and writable
    (check_output_folder)."""
    out, source = Path(out), Path(source).resolve()
    if out.resolve() == source or source in out.resolve().parents:
        raise ConfigError("--out must be a new folder outside the bundle: a bundle is never modified in place.")
    if out.is_dir() and any(out.iterdir()):  # another bundle's files (a stale segmenter.onnx) would be mixed in
        raise ConfigError(f"{out} is not empty; give a new or empty folder for the new bundle.")
    return check_output_folder(out)


# Manifest keys whose values are file paths on the machine that trained or recalibrated a model
PATH_KEYS = {"source", "images_folder", "split_file", "file", "data", "images", "taxonomy", "init_from", "resume"}


def without_paths(value: Any) -> Any:
    """A copy of a manifest's ``training`` record with every path reduced to its file name: the card goes to any
    API client, and a folder name (a user's home, a clinic's share) says nothing about the model."""
    if isinstance(value, dict):
        return {k: (re.split(r"[\\/]", v)[-1] if k in PATH_KEYS and isinstance(v, str) else without_paths(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    return value


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Bundle:
    """A loaded, verified bundle: manifest, file bytes, arrays, and a lazily built ONNX session."""

    def __init__(self, manifest: Manifest, files: dict[str, bytes], source: str = "<memory>"):
        self.manifest = manifest
        self._files = files
        self.source = source
        self._sessions: dict = {}  # (threads) → onnxruntime session, built on first use
        self._reference_checked = False  # the reference logits were met once: every session gives the same

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Read a bundle folder or zip; with ``verify`` (default) refuse any file whose sha256 differs."""
        path = Path(path)
        if not path.exists():
            raise BundleError(f"Model bundle not found: {path}.")
        files: dict[str, bytes] = {}
        if path.is_dir():
            for p in sorted(path.iterdir()):
                if p.is_file():
                    files[p.name] = p.read_bytes()
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        files[Path(info.filename).name] = zf.read(info)
        else:
            raise BundleError(f"{path} is neither a bundle folder nor a zip of one.")
        if MANIFEST not in files:
            raise BundleError(f"{path} has no {MANIFEST}: it is not a dermscreen model bundle.")
        try:
            manifest = Manifest.model_validate_json(files[MANIFEST])
        except ValidationError as exc:
            # one line per problem, without pydantic's links: "where: what"
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors())
            raise BundleError(f"{path}/{MANIFEST} does not match the bundle schema ({problems}): it is damaged or "
                              "was edited by hand; use the bundle as exported.") from None
        if manifest.schema_version > SCHEMA_VERSION:
            raise BundleError(f"{path} needs a newer dermscreen (bundle schema {manifest.schema_version}).")
        bundle = cls(manifest, files, str(path))
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Raise BundleError unless every file listed in the manifest is present with its sha256."""
        if not self.manifest.files:
            raise BundleError(f"{self.source}: the manifest lists no file hashes; refusing an unverifiable bundle.")
        for name, digest in self.manifest.files.items():
            if name not in self._files:
                raise BundleError(f"{self.source}: {name} is listed in the manifest but missing.")
            if sha256_bytes(self._files[name]) != digest:
                raise BundleError(
                    f"{self.source}: {name} does not match its sha256 in the manifest; the bundle was modified "
                    "or corrupted. Re-export or re-download it."
                )
        for required in (self.manifest.model.file, ARRAYS_FILE):
            if required not in self.manifest.files:
                raise BundleError(f"{self.source}: {required} is not covered by the manifest's hashes.")

    # ---- saving --------------------------------------------------------------------------
    @staticmethod
    def write(folder: str | Path, manifest: Manifest, files: dict[str, bytes]) -> Path:
        """Write ``files`` and a manifest carrying their hashes into ``folder``; returns the folder."""
        folder = check_output_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = manifest.model_copy(update={"files": {n: sha256_bytes(b) for n, b in sorted(files.items())}})
        for name, data in files.items():
            (folder / name).write_bytes(data)
        (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
        return folder

    @staticmethod
    def zip(folder: str | Path, out: str | Path) -> Path:
        """Zip a bundle folder into one file."""
        out = Path(out)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(Path(folder).iterdir()):
                if p.is_file():
                    zf.write(p, p.name)
        return out

    @staticmethod
    def arrays_bytes(arrays: dict[str, np.ndarray]) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    # ---- contents ------------------------------------------------------------------------
    def file(self, name: str) -> bytes:
        if name not in self._files:
            raise BundleError(f"{self.source} has no {name}.")
        return self._files[name]

    @property
    def sha256(self) -> str:
        """Identity of the bundle: the hash of its manifest (which pins every other file)."""
        return sha256_bytes(self._files[MANIFEST]) if MANIFEST in self._files else \
            sha256_bytes(self.manifest.model_dump_json().encode())

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """Classifier weights (``classifier_weight`` (C, D), ``classifier_bias`` (C,)) and ``ood_*`` arrays."""
        with np.load(io.BytesIO(self.file(ARRAYS_FILE)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    @property
    def has_segmenter(self) -> bool:
        name = self.manifest.segmenter.file if self.manifest.segmenter else SEGMENTER_FILE
        return name in self.manifest.files

    def session(self, threads: int | None = None):
        """A cached onnxruntime InferenceSession for model.onnx (``threads`` = intra-op threads)."""
        key = ("_session", threads)
        if key not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            # onnxruntime's idle threads spin after each run by default, stealing the cores the numpy
            # stages (decoding, quality, heatmap) need on small machines: measured 10.8 ms vs 6.3 ms.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            try:
                session = ort.InferenceSession(
                    self.file(self.manifest.model.file), sess_options=opts, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # onnxruntime raises several types for a graph it cannot load
                # e.g. a bundle exported with a newer ONNX opset than this onnxruntime knows: its hash is fine
                raise BundleError(
                    f"{self.source}: {self.manifest.model.file} could not be loaded by onnxruntime {ort.__version__} "
                    f"({str(exc).strip()[:300]}); a newer onnxruntime may read it (pip install -U onnxruntime), or "
                    "export the model again.") from None
            self._check_reference_outputs(session)
            self._sessions[key] = session
        return self._sessions[key]

    def reference_inputs(self, views: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 model views → the (N, 3, S, S) model input, as quantize.py recorded their logits."""
        from .preprocess import normalize

        return np.stack([normalize(view, self.manifest.preprocessing) for view in views])

    def _check_reference_outputs(self, session) -> float | None:
        """BundleError unless the model gives here the logits it gave where it was made, on the reference images the
        bundle carries (``check_images`` / ``check_logits`` in arrays.npz; an int8 bundle has them, see quantize.py);
        the largest logit difference, or None for a bundle without them.

        An int8 model's arithmetic depends on the CPU: onnxruntime's uint8 x int8 kernels can saturate on x86 CPUs
        without VNNI instructions, so the same bundle could answer differently from what was validated."""
        if "check_images" not in self.arrays or self._reference_checked:
            return None
        views, expected = self.arrays["check_images"], self.arrays.get("check_logits")
        size = self.manifest.preprocessing.image_size
        classes = self.manifest.taxonomy.num_classes
        if expected is None or views.shape[1:] != (size, size, 3) or expected.shape != (len(views), classes):
            raise BundleError(f"{self.source}: its reference images or logits in arrays.npz do not fit the model; "
                              "the bundle is damaged: make it again (dermscreen quantize).")
        logits = session.run(["logits"], self._feeds(self.reference_inputs(views)))[0]
        worst = float(np.abs(logits - expected).max())
        if not worst <= CHECK_LOGIT_TOLERANCE:  # (NaN fails too)
            raise BundleError(
                f"{self.source}: on this computer the model's answers differ from those it was validated with (logits "
                f"off by up to {worst:.3g} on its {len(views)} reference images; an 8-bit model can compute "
                "differently on a CPU without VNNI instructions). Use the float model it was made from (for the "
                "shipped one: --model default).")
        self._reference_checked = True
        return worst

    def _feeds(self, images: np.ndarray, metadata: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """onnxruntime inputs for an (N,3,S,S) batch; a model that takes metadata gets "unknown" when none is given."""
        spec = self.manifest.model
        feeds = {"image": np.ascontiguousarray(images, dtype=np.float32)}
        if "metadata" in spec.inputs:
            if metadata is None:
                if spec.metadata is None:
                    raise BundleError(f"{self.source}: the model takes metadata but the manifest has no metadata "
                                      "encoding.")
                metadata = np.stack([spec.metadata.encode()] * len(images))
            feeds["metadata"] = np.ascontiguousarray(metadata, dtype=np.float32)
        return feeds

    def run(self, images: np.ndarray, metadata: np.ndarray | None = None, threads: int | None = None,
            outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the ONNX model on an (N,3,S,S) float32 batch; returns {output name: array}.

        ``metadata`` is (N, metadata.dim) float32; when the model takes metadata and none is given,
        every value is encoded as unknown.
        """
        names = outputs or self.manifest.model.outputs
        values = self.session(threads).run(names, self._feeds(images, metadata))
        return dict(zip(names, values))

    def info(self) -> dict[str, Any]:
        """A short JSON-ready summary: name, version, hash, taxonomy codes, metrics."""
        m = self.manifest
        return {
            "name": m.name, "version": m.version, "sha256": self.sha256, "backbone": m.model.backbone,
            "classes": m.taxonomy.codes, "temperature": m.calibration.temperature,
            "operating_points": [o.model_dump() for o in m.operating_points],
            "metrics": m.metrics, "licence": m.card.licence,
        }
