"""``dermscreen quantize``: an 8-bit integer copy of a bundle's classifier, fitted again on its own validation split.

EfficientNet-Lite was designed for 8-bit inference (ReLU6, no squeeze-and-excitation), and onnxruntime runs
int8 convolutions with the CPU's integer dot-product instructions (AVX-512 VNNI, AVX-VNNI, ARM dot product): the
default model's forward pass took ~9 ms in float and ~4.4 ms in int8 on one core of an AMD EPYC, and `dermscreen
predict FOLDER`'s workers screened 145-198 images/s (median 183) with the int8 copy against 120-127 with the float
model on 2 cores (2026-11-23, benchmarks/RESULTS.md, session 13).

Quantization moves the logits a little, so everything that was fitted on them is fitted again, exactly as
``dermscreen export`` fitted it, on the model's own validation split (remade from its training labels, as
``dermscreen evaluate`` remakes it): the temperature, the malignancy operating points and the validation metrics.
The OOD embedding threshold is re-chosen so that the int8 model keeps the same share of those validation images
as the float model did; the embedding statistics and the colour check are kept (the colour check does not use
the model), and the shares kept that the manifest states are measured again on those images. The activations'
ranges are measured on training images only, never on validation or test images.

The new bundle records what was done (``training.quantization``): the source bundle's sha256, the method, the
calibration images, and the float and int8 models' validation numbers side by side, with how often their top
diagnosis and their referral decision agree. Needs the ``onnx`` package (``pip install "dermscreen[train]"``).
"""
from __future__ import annotations

import datetime as _dt
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .bundle import ARRAYS_FILE, Bundle, Calibration, check_new_bundle_folder, resolve_bundle_path
from .calibration import expected_calibration_error, softmax
from .errors import BundleError, ConfigError
from .imaging import read_image_file
from .inference import metadata_matrix, predict_samples
from .manifests import load_labels
from .ood import ColourOOD
from .ood_fit import file_colours
from .preprocess import preprocess

# Activation ranges from 100, 300 and 600 training images gave the default model the same top-1 agreement with the
# float model on validation (95.2 / 95.1 / 95.2 %; referral agreement 92.6 / 92.7 / 94.6 %, 2026-11-23); more costs
# time and memory (each image is kept as a float tensor during the fit).
CALIBRATION_IMAGES = 300
COMPARED = ("balanced_accuracy", "malignant_auc", "macro_auc", "ece_after")  # float vs int8 in the record
# Synthetic images whose int8 logits the bundle carries: every load checks the model still gives those logits
# (Bundle._check_reference_outputs), as integer kernels differ between CPUs. Drawn, never a patient's image (the
# bundle is redistributed; the training images may not be): 4 views are 300 KB at 160 px.
REFERENCE_IMAGES = 4


def reference_views(size: int) -> np.ndarray:
    """(4, size, size, 3) uint8 drawn model views: two lesion-like blobs on skin, saturated colour blocks and full-range
    noise, so the check exercises both ordinary activations and the extreme ones where int8 kernels can saturate."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    views = np.empty((REFERENCE_IMAGES, size, size, 3), np.uint8)
    for k, (skin, lesion, radius) in enumerate((((200, 150, 130), (95, 55, 35), 0.3),
                                                ((225, 160, 165), (60, 40, 45), 0.15))):
        r = np.hypot(xx - 0.5 - 0.05 * k, (yy - 0.45) * (1.3 - 0.2 * k))
        inside = np.clip((radius - r) / 0.05, 0, 1)[..., None]  # a soft edge, as a dermatoscope sees it
        core = np.clip((0.5 * radius - r) / 0.05, 0, 1)[..., None] * 0.4
        blob = np.asarray(skin) * (1 - inside) + np.asarray(lesion) * inside * (1 - core)
        views[k] = np.clip(blob + rng.normal(0, 6, blob.shape), 0, 255).astype(np.uint8)
    views[1, (np.abs(yy - xx * 0.6 - 0.2) < 0.006) | (np.abs(yy + xx - 1.1) < 0.006)] = (20, 15, 10)  # two hairs
    views[2] = np.where((xx < 0.5)[..., None], (255, 0, 255), (0, 255, 0))
    views[2][yy > 0.5] = 255 - views[2][yy > 0.5]
    views[3] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return views


@dataclass
class Quantization:
    """What ``quantize_bundle`` did: the new bundle's folder and its record (also in its manifest)."""

    out: Path
    record: dict[str, Any]


def _quantizer():
    """onnxruntime's quantization tools, or a ConfigError saying what to install."""
    try:
        import onnx  # noqa: F401 (onnxruntime.quantization needs it)
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
            quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ConfigError(f"Quantizing needs the onnx package ({exc}): pip install \"dermscreen[train]\".") from None
    return CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static, quant_pre_process


def quantize_onnx(model_bytes: bytes, feeds: list[dict[str, np.ndarray]]) -> bytes:
    """An int8 QDQ copy of an ONNX model: weights per output channel (signed), activations unsigned with ranges
    measured (min/max) on ``feeds``, the inputs of one image each."""
    reader_base, method, fmt, qtype, quantize_static, pre_process = _quantizer()

    class Reader(reader_base):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    # the model files exist only inside this folder (and onnxruntime's own temporary folders, which it removes),
    # for the quantizer's file-based API: model weights, nothing of a patient's
    with tempfile.TemporaryDirectory(prefix="dermscreen-quantize-") as tmp:
        src, prepared, out = (Path(tmp) / name for name in ("float.onnx", "prepared.onnx", "int8.onnx"))
        src.write_bytes(model_bytes)
        # shape inference and constant folding first, as onnxruntime advises, so that every tensor has the
        # shape the quantizer needs to choose per-channel axes
        try:
            pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            # uint8 activations x int8 weights: the fast path on CPUs with VNNI; without VNNI its kernels can
            # saturate (reduce_range avoids that but cost 7 points of top-1 agreement with the float model here)
            quantize_static(str(prepared), str(out), Reader(), quant_format=fmt.QDQ, per_channel=True,
                            activation_type=qtype.QUInt8, weight_type=qtype.QInt8, calibrate_method=method.MinMax)
        except Exception as exc:  # onnxruntime/onnx raise many types for a graph they cannot quantize
            raise BundleError(f"onnxruntime could not quantize this model ({type(exc).__name__}: "
                              f"{str(exc).strip()[:300]}); keep the float bundle.") from None
        return out.read_bytes()


def _referrals(manifest, probs: np.ndarray) -> np.ndarray | None:
    """Whether each image is referred at the manifest's sensitivity-first point (None when it has none)."""
    point = next((op for op in manifest.operating_points if op.name == "sensitivity_first"), None)
    return None if point is None else manifest.taxonomy.p_malignant(probs) >= point.threshold


def quantize_bundle(model: str | Path | None, labels: str | Path, out: str | Path, *, images: str | Path | None = None,
                    calibration_images: int = CALIBRATION_IMAGES, seed: int = 0, target_sensitivity: float = 0.95,
                    batch_size: int = 32,
                    progress: Callable[[str, int, int], None] | None = None) -> Quantization:
    """Write an int8 copy of bundle ``model`` to ``out``, refitted on its validation split of ``labels``.

    ``labels`` must be the labels file the model was trained on (checked by sha256): its split is remade from it.
    Raises ConfigError with a sentence for an unusable request.
    """
    from .training.calibrate import calibrate, validation_metrics

    if not 0.5 <= target_sensitivity < 1.0:
        raise ConfigError(f"--sensitivity {target_sensitivity:g}: give a target sensitivity of at least 0.5 and "
                          "below 1 (the default, 0.95, is what dermscreen export chooses the referral point for).")
    if calibration_images < 10:
        raise ConfigError(f"--calibration-images {calibration_images}: give at least 10 (default "
                          f"{CALIBRATION_IMAGES}); activation ranges measured on fewer images clip real ones.")
    _quantizer()  # a missing package is said before any work
    source = resolve_bundle_path(model)
    out = check_new_bundle_folder(out, source)
    bundle = Bundle.load(source)  # verified
    m = bundle.manifest
    data, train, val = _own_split(bundle, labels, images)
    progress = progress or (lambda part, done, total: None)

    rng = np.random.default_rng(seed)
    chosen = [train[i] for i in sorted(rng.choice(len(train), min(calibration_images, len(train)), replace=False))]
    files = {name: bundle.file(name) for name in m.files}
    files[m.model.file] = quantize_onnx(bundle.file(m.model.file), _calibration_feeds(bundle, chosen, progress))
    files[ARRAYS_FILE] = _with_reference_logits(bundle, Bundle(m, files, "<int8>"))
    candidate = Bundle(m, files, "<int8>")

    y = np.asarray([m.taxonomy.index(s.dx) for s in val])
    before = predict_samples(bundle, val, batch_size=batch_size,
                             on_batch=_counter(lambda k: progress("validation (float)", k, len(val))))
    after = predict_samples(candidate, val, batch_size=batch_size,
                            on_batch=_counter(lambda k: progress("validation (int8)", k, len(val))))
    calibration, points = calibrate(after.logits, y, m.taxonomy, target_sensitivity, "validation")
    metrics = {**validation_metrics(after.logits, y, m.taxonomy, calibration.temperature),
               "ece_before": calibration.ece_before, "ece_after": calibration.ece_after}
    # the float model measured here on the same images, with its own temperature: like for like
    float_metrics = {**validation_metrics(before.logits, y, m.taxonomy, m.calibration.temperature),
                     "ece_after": expected_calibration_error(before.probs, y)}
    refitted = m.model_copy(update={
        "calibration": Calibration(temperature=calibration.temperature, ece_before=calibration.ece_before,
                                   ece_after=calibration.ece_after, split=m.calibration.split),
        "operating_points": points, "ood": _refit_ood_threshold(bundle, val, before, after)})
    new_probs = softmax(after.logits, calibration.temperature)
    old_refer, new_refer = _referrals(m, before.probs), _referrals(refitted, new_probs)
    record = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source_sha256": bundle.sha256,
        "method": "onnxruntime static quantization, QDQ: int8 weights per output channel, uint8 activations "
                  "with min/max ranges",
        "onnxruntime": _ort_version(),
        # the validation below was measured on this CPU; without VNNI the same graph can compute differently
        "cpu_vnni": _cpu_has_vnni(),
        "calibration_images": {"count": len(chosen), "split": "train", "seed": seed,
                               "labels": Path(str(data.source)).name},
        "reference_images": REFERENCE_IMAGES,  # drawn; their views and logits are in arrays.npz, checked at each load
        "target_sensitivity": target_sensitivity,
        "validation": {
            "images": len(val),
            "float": {k: float_metrics.get(k) for k in COMPARED},
            "int8": {k: metrics.get(k) for k in COMPARED},
            "top1_agreement": float(np.mean(before.logits.argmax(1) == after.logits.argmax(1))),
            "referral_agreement": None if old_refer is None or new_refer is None else
            float(np.mean(old_refer == new_refer)),
            "max_probability_change": float(np.abs(before.probs - new_probs).max()),  # of any class
            "max_p_malignant_change": float(np.abs(m.taxonomy.p_malignant(before.probs)
                                                   - m.taxonomy.p_malignant(new_probs)).max()),
        },
    }
    card = m.card.model_copy(update={"limitations": [*m.card.limitations, (
        f"The classifier runs in 8-bit integer arithmetic (quantized from the float model, sha256 "
        f"{bundle.sha256[:12]}); its top diagnosis agreed with the float model's on "
        f"{100 * record['validation']['top1_agreement']:.1f} % of {len(val)} validation images, and its "
        "temperature and thresholds were fitted again on them.")]})
    manifest = refitted.model_copy(update={
        # its own name and date: reports, the FHIR Device and the page tell the two models apart by more than a hash
        "name": f"{m.name}-int8", "created": record["date"],
        "version": f"{m.version}+int8", "metrics": metrics, "card": card,
        "training": {**m.training, "quantization": record}})
    Bundle.write(out, manifest, files)
    Bundle.load(out)  # re-read and verified, as every bundle we hand out
    return Quantization(out, record)


def _own_split(bundle: Bundle, labels: str | Path, images: str | Path | None) -> tuple[Any, list, list]:
    """(labels, training samples, validation samples) of the model's own split, remade from the labels it was
    trained on; ConfigError for a bundle that cannot be refitted so, or for other labels."""
    from .evaluation.evaluate import model_seen_images  # (imports matplotlib: only when needed)

    m = bundle.manifest
    training = m.training if isinstance(m.training, dict) else {}
    if training.get("quantization"):
        raise ConfigError(f"{bundle.source} is already quantized; quantize the float bundle it was made from.")
    if training.get("recalibrations"):  # refitting on the training split's validation would undo that silently
        raise ConfigError(f"{bundle.source} was recalibrated (dermscreen calibrate) on other images; quantizing "
                          "refits it on its training validation split instead. Quantize the bundle it was "
                          "recalibrated from, then recalibrate the int8 copy on the same images.")
    trained_on = (training.get("data") or {}).get("manifest_sha256")
    if not trained_on:
        raise ConfigError(f"{bundle.source} records no training labels, so its validation split cannot be remade: "
                          "quantize a bundle exported by dermscreen train or export.")
    data = load_labels(labels, images, taxonomy=m.taxonomy)
    if data.sha256 != trained_on:
        raise ConfigError(f"{data.source} is not the labels file this model was trained on (its sha256 differs): "
                          "quantizing refits the model on its own validation split, so give the labels it was "
                          f"trained on ({Path(str((training.get('data') or {}).get('source') or '?')).name}).")
    seen = model_seen_images(bundle, data)
    if not seen:
        raise ConfigError(f"The split of {bundle.source} could not be remade from {data.source} (its training record "
                          "has no split rule, or the split remade differs from the one it records). Quantize a bundle "
                          "exported by dermscreen train or export, with the labels it was trained on.")
    train = [s for s in data.samples if seen.get(s.image_id) == "train"]
    val = [s for s in data.samples if seen.get(s.image_id) == "val"]
    if not train or not val:
        raise ConfigError(f"{data.source} holds no training or no validation images of this model's split.")
    return data, train, val


def _calibration_feeds(bundle: Bundle, samples: list, progress: Callable[[str, int, int], None]) -> list[dict]:
    """The model inputs of ``samples`` (training images), one feed each, decoded and viewed as the Screener does."""
    spec = bundle.manifest.preprocessing
    meta = metadata_matrix(bundle, samples)
    feeds = []
    for k, sample in enumerate(samples):
        feed = {"image": preprocess(read_image_file(sample.image_path), spec)[None]}
        if meta is not None:
            feed["metadata"] = meta[k:k + 1].astype(np.float32)
        feeds.append(feed)
        progress("calibration images", k + 1, len(samples))
    return feeds


def _with_reference_logits(bundle: Bundle, candidate: Bundle) -> bytes:
    """The float bundle's arrays.npz plus the drawn reference views and ``candidate``'s logits on them, computed
    here through the same Bundle path every later load compares with (Bundle._check_reference_outputs)."""
    views = reference_views(bundle.manifest.preprocessing.image_size)
    logits = candidate.run(candidate.reference_inputs(views), outputs=["logits"])["logits"]
    return Bundle.arrays_bytes({**bundle.arrays, "check_images": views, "check_logits": logits.astype(np.float32)})


def _refit_ood_threshold(bundle: Bundle, val: list, before, after):
    """The bundle's OOD spec with the embedding threshold that keeps, of the validation images, the share the float
    model's kept; every share it states measured again on those images (the colour check itself is unchanged)."""
    ood = bundle.manifest.ood
    if ood is None or not np.isfinite(before.ood_score).all():
        return ood
    kept = float(np.mean(before.ood_score <= ood.threshold))  # the float model's share kept, these images
    threshold = float(np.quantile(after.ood_score, kept))
    inside = after.ood_score <= threshold
    update = {"threshold": threshold, "validation_kept": float(np.mean(inside))}
    colour = ColourOOD.from_arrays(bundle.arrays) if ood.colour_threshold is not None else None
    if colour is not None:
        colour_inside = colour.score(file_colours([s.image_path for s in val])) <= ood.colour_threshold
        update.update(colour_validation_kept=float(np.mean(colour_inside)),
                      validation_kept_both=float(np.mean(inside & colour_inside)))
    return ood.model_copy(update=update)


def _cpu_has_vnni() -> bool | None:
    """Whether this CPU has 8-bit dot-product instructions (AVX-512 VNNI or AVX-VNNI); None where not known."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _counter(step: Callable[[int], None]) -> Callable[[int], None]:
    """predict_samples reports images per batch; progress wants the running count."""
    done = [0]

    def on_batch(n: int) -> None:
        done[0] += n
        step(done[0])
    return on_batch


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
