"""`dermscreen calibrate`: fit a bundle's temperature and malignancy operating points again on your own images.

A model's probabilities and its referral thresholds are calibrated on the validation images of its training
source. A clinic or teledermatology service whose dermatoscope, lighting or case mix differs can keep the
model and re-fit only these numbers on its own labelled images: the ONNX graph, OOD statistics and everything
else stay as they are, the new bundle is written beside the old one (never in place) and records what it was
calibrated on. Core install only (numpy, onnxruntime, scikit-learn): torch is never imported.

The images must be ones the model did not train on (new cases from where it is used): a temperature fitted on
training images is too low (the model is over-confident there) and thresholds chosen there too lenient. What is
checked: the labels file(s) the model was trained from (by sha256, unless a split other than train is chosen), its
train split, and its training images copied into any other file or split (by image id: the model's split is remade
from its training labels, found where the manifest says, from here or the repository's root; when they cannot be
found, a warning says the check was not made) are refused. Images used here
are no longer held-out for this bundle's calibration: ``dermscreen evaluate`` warns when it meets them again.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .bundle import Bundle, Calibration, check_new_bundle_folder, without_paths
from .calibration import OperatingPoint, expected_calibration_error, softmax
from .errors import ConfigError
from .evaluation.evaluate import _load, seen_images_warning, training_labels_warning
from .inference import predict_samples
from .training.calibrate import calibrate as fit_calibration

# Below these counts a sensitivity-first threshold rests on a handful of malignant cases: each one moves the
# achieved sensitivity by several points. Refused below the first pair, warned below the second.
MIN_IMAGES, MIN_MALIGNANT = 30, 10
ADVISED_IMAGES, ADVISED_MALIGNANT = 300, 50


@dataclass
class Recalibration:
    """What ``recalibrate`` did: the new bundle's folder and the before/after numbers on the images used."""

    out: Path
    record: dict[str, Any]
    warnings: list[str]


def _points_on(points: list[OperatingPoint], p_malignant: np.ndarray, is_malignant: np.ndarray) -> dict[str, dict]:
    """Sensitivity and specificity of each point's threshold on these images."""
    out = {}
    for op in points:
        called = p_malignant >= op.threshold
        out[op.name] = {"threshold": op.threshold,
                        "sensitivity": float(called[is_malignant].mean()),
                        "specificity": float((~called[~is_malignant]).mean())}
    return out


def recalibrate(model: str | Path | None, labels: str | Path, out: str | Path, *, images: str | Path | None = None,
                split_file: str | Path | None = None, split: str | None = None, target_sensitivity: float = 0.95,
                batch_size: int = 32, on_batch: Callable[[int], None] | None = None,
                on_start: Callable[[int], None] | None = None) -> Recalibration:
    """Fit temperature and operating points of bundle ``model`` on ``labels`` (or its ``split``); write ``out``.

    Raises ConfigError with a sentence for an unusable request (too few images, one group only, the model's own
    training images, ``out`` not writable or the bundle itself).
    """
    if not 0.5 <= target_sensitivity < 1.0:
        raise ConfigError(f"--sensitivity {target_sensitivity:g}: give a target sensitivity of at least 0.5 and "
                          "below 1 (the default, 0.95, refers at least 95 % of malignant lesions).")
    out = Path(out)
    bundle, data, split_info = _load(model, labels, images, split_file, split)
    trained = training_labels_warning(bundle, data, split_info)  # every image of a file the model trained from
    _, seen = seen_images_warning(bundle, data)  # its own images, found by id in any labels or split file
    checked, seen = seen is not None, seen or {}
    if trained or (split_info and split_info.get("split") == "train") or seen.get("train"):
        some = f"{seen['train']} of these {len(data)} images are" if seen.get("train") and not trained else \
            "These are"
        raise ConfigError(f"{some} images the model was trained on: calibrating on them would make it "
                          "over-confident. Use new labelled cases from where the model is used.")
    taxonomy = bundle.manifest.taxonomy
    y = np.asarray(data.labels)
    is_mal = taxonomy.malignant_mask[y]
    if len(y) < MIN_IMAGES or is_mal.sum() < MIN_MALIGNANT or (~is_mal).sum() < MIN_MALIGNANT:
        short = "images" if len(y) < MIN_IMAGES else "malignant ones" if is_mal.sum() < MIN_MALIGNANT else \
            "benign ones"
        raise ConfigError(
            f"{len(y)} images ({int(is_mal.sum())} malignant, {int((~is_mal).sum())} benign): too few {short} "
            f"to calibrate on. Give at least {MIN_IMAGES} images with at least {MIN_MALIGNANT} malignant and "
            f"{MIN_MALIGNANT} benign ones (advised: {ADVISED_IMAGES}+ with {ADVISED_MALIGNANT}+ malignant).")
    out = check_new_bundle_folder(out, bundle.source)  # before the images are read: a bad --out fails at once
    warnings = []
    if not checked and not trained and ((bundle.manifest.training or {}).get("data") or {}).get("manifest_sha256"):
        source = Path(str(bundle.manifest.training["data"].get("source") or "its training labels")).name
        warnings.append(f"Whether these images include the model's own training images could not be checked: its "
                        f"training labels ({source}) were not found from here. Make sure they are new cases.")
    if split_info and split_info.get("split") == "val":
        warnings.append("The validation split already calibrated this model: refitting on it reproduces the numbers "
                        "it has. Calibrate on new cases from where the model is used.")
    elif split_info and split_info.get("split") == "test" and split_info.get("remade"):
        warnings.append("This spends the model's test split: the new bundle's temperature and thresholds are chosen "
                        "on it, so its test scores are no longer held-out. Report held-out numbers on other cases.")
    elif split_info and split_info.get("split") == "test":
        warnings.append("These images are no longer held-out for the new bundle (its temperature and thresholds are "
                        "chosen on them): report its held-out numbers on other cases.")
    elif seen.get("val"):
        warnings.append(f"{seen['val']} of these {len(data)} images are the model's validation images, which already "
                        "calibrated it: they pull the refit towards the numbers it has. Calibrate on new cases from "
                        "where the model is used.")
    if len(y) < ADVISED_IMAGES or is_mal.sum() < ADVISED_MALIGNANT:
        warnings.append(f"Only {len(y)} images ({int(is_mal.sum())} malignant): the operating points will move "
                        f"noticeably with a few cases more or less; {ADVISED_IMAGES}+ images with "
                        f"{ADVISED_MALIGNANT}+ malignant are advised.")

    if on_start:
        on_start(len(data))
    preds = predict_samples(bundle, data.samples, batch_size=batch_size, on_batch=on_batch)
    m = bundle.manifest
    # named in the card with the split, so a bundle refit on a test split says so wherever it is shown
    name = Path(str(data.source)).name + (f", {split_info['split']} split" if split_info else "")
    calibration, points = fit_calibration(preds.logits, y, taxonomy, target_sensitivity, f"{name} (recalibration)")
    old_probs = softmax(preds.logits, m.calibration.temperature)
    new_probs = softmax(preds.logits, calibration.temperature)
    record = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # the file's name only: its folder (a user's home, a clinic's share) would travel with the bundle
        "labels": {"source": Path(str(data.source)).name, "manifest_sha256": data.sha256,
                   "split": without_paths(split_info)},
        # which images (not their ids): dermscreen evaluate warns when it scores this selection again
        "images": int(len(y)), "images_sha256": data.ids_sha256(), "malignant": int(is_mal.sum()),
        "class_counts": data.class_counts(),
        "target_sensitivity": target_sensitivity,
        "temperature": {"before": m.calibration.temperature, "after": calibration.temperature},
        "ece": {"before": expected_calibration_error(old_probs, y), "after": calibration.ece_after,
                "uncalibrated": calibration.ece_before},
        "operating_points": {
            "before": _points_on(m.operating_points, taxonomy.p_malignant(old_probs), is_mal),
            "after": _points_on(points, taxonomy.p_malignant(new_probs), is_mal)},
    }
    description = f"recalibrated on {len(y)} images of {name}"
    calibration = Calibration(temperature=calibration.temperature, ece_before=calibration.ece_before,
                              ece_after=calibration.ece_after, split=description)
    training = {**m.training, "recalibrations": [*m.training.get("recalibrations", []), record]}
    manifest = m.model_copy(update={"calibration": calibration, "operating_points": points, "training": training})
    Bundle.write(out, manifest, {file: bundle.file(file) for file in m.files})
    Bundle.load(out)  # re-read and verified, as every bundle we hand out
    return Recalibration(out, record, warnings)
