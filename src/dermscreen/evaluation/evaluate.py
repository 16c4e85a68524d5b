"""Evaluate a model bundle on a labelled set: predictions.csv, metrics.json, plots and an HTML report.

Core install only (numpy, Pillow, onnxruntime, scikit-learn, matplotlib): torch is never imported.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import DISCLAIMER, __version__
from ..bundle import Bundle, check_output_folder
from ..errors import ConfigError, ManifestError
from ..inference import Predictions, predict_samples, resolve_model
from ..manifests import LabelledSet, load_labels
from ..splits import SPLIT_NAMES, grouped_split, read_split_file, split_sha256, subsample
from .markdown import to_markdown
from .metrics import EvalData, compute_metrics, subgroup_columns
from .plots import confusion_matrix_png, reliability_png, roc_png
from .report import render_report

TTA_MODE = "mean of logits over 4 views (identity, horizontal, vertical and both flips), then temperature"
PLOT_FILES = {"confusion_matrix": "confusion_matrix.png", "roc_curves": "roc_curves.png",
              "reliability": "reliability.png"}


class Progress:
    """Callbacks for long evaluations; the default does nothing (the CLI draws a progress bar)."""

    def phase(self, message: str) -> None:
        """Called when a new step starts (loading, bootstrap, plots ...)."""

    def start_images(self, total: int) -> None:
        """Called once before prediction with the number of images."""

    def advance(self, n: int) -> None:
        """Called after each batch with the number of images it held."""


@dataclass
class EvaluationResult:
    """What an evaluation wrote (``files``: name → path) and its metrics (as in metrics.json)."""

    out: Path
    metrics: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def read_split(path: str | Path, split: str) -> set[str]:
    """Image ids of ``split`` in an ``image_id,split`` CSV; ManifestError naming the file (and row) on problems."""
    parts = read_split_file(path)
    ids = {image_id for image_id, part in parts.items() if part == split}
    if not ids:
        raise ManifestError(
            f"{path} lists no images in split {split!r} (it has: {', '.join(sorted(set(parts.values()))) or 'none'}).")
    return ids


def select_split(data: LabelledSet, path: str | Path, split: str) -> tuple[LabelledSet, dict[str, Any]]:
    """The samples of ``data`` listed in ``split`` of the split file, and a summary of the selection."""
    ids = read_split(path, split)
    keep = [i for i, s in enumerate(data.samples) if s.image_id in ids]
    if not keep:
        raise ManifestError(
            f"None of the {len(ids)} images of split {split!r} in {path} is in the labels {data.source}; "
            "use the labels file the model was trained from."
        )
    found = {data.samples[i].image_id for i in keep}
    info = {"file": str(path), "split": split, "listed": len(ids), "evaluated": len(keep),
            "missing_from_labels": len(ids - found)}
    return data.subset(keep), info


def bootstrap_unit(data: LabelledSet) -> str:
    """What the bootstrap resamples: ``lesion`` when lesion ids are known, else ``patient``, else ``image``."""
    if any(s.lesion_id for s in data.samples):
        return "lesion"
    return "patient" if any(s.patient_id for s in data.samples) else "image"


def write_predictions(path: Path, data: LabelledSet, preds: Predictions) -> None:
    """Write one row per image: true dx, calibrated probabilities, P(malignant), predicted dx, OOD score."""
    codes = data.taxonomy.codes
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "true_dx", *[f"p_{c}" for c in codes], "p_malignant", "predicted_dx",
                         "ood_score", "in_distribution"])
        for i, sample in enumerate(data.samples):
            writer.writerow([
                sample.image_id, sample.dx, *[f"{p:.6f}" for p in preds.probs[i]], f"{preds.p_malignant[i]:.6f}",
                codes[int(preds.predicted[i])], f"{preds.ood_score[i]:.4f}", bool(preds.in_distribution[i]),
            ])


def _model_info(bundle: Bundle) -> dict[str, Any]:
    m = bundle.manifest
    return {"name": m.name, "version": m.version, "sha256": bundle.sha256, "source": bundle.source,
            "backbone": m.model.backbone, "temperature": m.calibration.temperature,
            "image_size": m.preprocessing.image_size, "licence": m.card.licence}


def _ood_summary(bundle: Bundle, preds: Predictions) -> dict[str, Any]:
    if bundle.manifest.ood is None:
        return {"available": False}
    return {"available": True, "threshold": bundle.manifest.ood.threshold,
            "in_distribution": int(preds.in_distribution.sum()),
            "share_in_distribution": float(preds.in_distribution.mean()),
            "validation_kept": bundle.manifest.ood.validation_kept}


# Every file an evaluation writes. A folder holding any of them is refused unless overwrite=True: refusing is
# safer than clearing them (a mistyped --out never destroys an earlier evaluation), and with --overwrite all of
# these names are rewritten, so no file of the old run survives beside the new ones.
OUTPUT_FILES = ("predictions.csv", "metrics.json", "metrics.md", "report.html", *PLOT_FILES.values())

# Splits of a training run whose images the model saw: scores on them are not held-out.
SEEN_SPLITS = {
    "train": "these images trained this model",
    "val": "these images chose this model's checkpoint and calibrated it (temperature, operating points)",
}


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """``out`` as a Path when an evaluation can be written there; ConfigError with a sentence otherwise.

    Writes nothing: a failed evaluation leaves no folder behind (bundle.check_output_folder removes what it made).
    """
    out = check_output_folder(out)
    if out.is_dir() and not overwrite:
        found = [name for name in OUTPUT_FILES if (out / name).exists()]
        if found:
            raise ConfigError(
                f"{out} already holds an evaluation ({', '.join(found)}); give a new or empty folder as --out, "
                "or --overwrite to replace it.")
    return out


def describe_selection(labels: str | Path, split_info: dict | None) -> str:
    """Which images an evaluation reports on: 'test split of runs/x/split.csv' or 'all images of labels.csv'."""
    if split_info:
        return f"{split_info['split']} split of {split_info['file']}"
    return f"all images of {labels}"


def held_out_warning(split_info: dict | None) -> str | None:
    """A sentence when the evaluated split is one the model saw in training (train, val); None otherwise."""
    seen = SEEN_SPLITS.get((split_info or {}).get("split", ""))
    if seen is None:
        return None
    return (f"Split {split_info['split']!r} of {split_info['file']}: {seen}, so these scores are not held-out and "
            "overstate how the model does on new images. Evaluate the test split for held-out scores.")


def recalibration_warning(bundle: Bundle, data: LabelledSet, split_info: dict | None) -> str | None:
    """A sentence when the evaluated images include those a ``dermscreen calibrate`` of this bundle was fitted on:
    the same selection of images, or the same labels file with the same split (or all of it)."""
    training = bundle.manifest.training if isinstance(bundle.manifest.training, dict) else {}
    for record in reversed(training.get("recalibrations") or []):
        labels = record.get("labels") or {}
        used = (labels.get("split") or {}).get("split")
        same_file = labels.get("manifest_sha256") == data.sha256
        if record.get("images_sha256") == data.ids_sha256() or (
                same_file and (split_info is None or used == (split_info or {}).get("split"))):
            return (f"These images include the {record.get('images')} that recalibrated this model on "
                    f"{str(record.get('date', ''))[:10]} (its temperature and operating points were chosen on them), "
                    "so its ECE and operating-point numbers here are not held-out. Evaluate other labelled cases.")
    return None


def training_labels_warning(bundle: Bundle, data: LabelledSet, split_info: dict | None) -> str | None:
    """A sentence when all images of a labels file the model was trained from are evaluated (no split chosen)."""
    if split_info is not None or not isinstance(bundle.manifest.training, dict):
        return None
    training = bundle.manifest.training
    main = (training.get("data") or {}).get("manifest_sha256")
    extra = {e.get("manifest_sha256") for e in training.get("extra_train") or [] if isinstance(e, dict)}
    if data.sha256 is None or data.sha256 not in {main, *extra} - {None}:
        return None
    if data.sha256 == main:
        seen = "its training and validation images are"
        how = "Give --split test to score only its held-out test images."
    else:  # an extra_train file: only lesions of the training part were taken from it
        seen = "images the model trained on are"
        how = "Evaluate the test split of its main labels for held-out scores."
    return (f"{data.source} is a labels file this model was trained from: {seen} among the {len(data)} evaluated, "
            f"so these scores overstate how the model does on new images. {how}")


def _load(model: str | Path | None, labels: str | Path, images: str | Path | None,
          split_file: str | Path | None, split: str | None) -> tuple[Bundle, LabelledSet, dict | None]:
    bundle = Bundle.load(resolve_model(model))
    data = load_labels(labels, images, taxonomy=bundle.manifest.taxonomy)
    split_info = None
    if split_file is not None:
        data, split_info = select_split(data, split_file, split or "test")
    elif split is not None:
        # without a split file every row of the labels would be scored under the name of the split: remake the
        # model's own split from the rule its manifest records, or refuse
        data, split_info = remade_split(bundle, data, split)
    return bundle, data, split_info


def remade_split(bundle: Bundle, data: LabelledSet, split: str) -> tuple[LabelledSet, dict[str, Any]]:
    """The ``split`` part of the model's own train/val/test split, made again from the labels it was trained on.

    A training run splits its labels by lesion with a seeded, deterministic rule that the manifest records, so
    the same labels file gives the same split without the run's split.csv (which a shipped model does not carry).
    The labels must be byte-identical to the training labels (manifest sha256) and the remade split must match
    the manifest: its sha256 when recorded (models trained since 2026-11-23), else the image and class counts of
    every part. Anything else is refused with a sentence (ConfigError): a near miss would score a split that
    looks held-out and is not.
    """
    training = bundle.manifest.training if isinstance(bundle.manifest.training, dict) else {}
    trained_on = training.get("data") or {}
    rule = _split_rule(training)
    recorded = training.get("split_file")
    # a path on the machine that trained the model; named only where it exists (a shipped model's does not)
    hint = f" (this model's training run wrote {recorded})" if recorded and Path(recorded).is_file() else ""
    if None in (rule.get("seed"), rule.get("val_fraction"), rule.get("test_fraction")) or not trained_on:
        raise ConfigError(
            f"--split {split} needs --split-file, the image_id,split CSV of the training run{hint}: this model's "
            f"manifest does not record how its split was made; without it all images of {data.source} would be "
            "evaluated. Give --split-file, or leave out --split to evaluate all images.")
    if trained_on.get("manifest_sha256") != data.sha256:
        raise ConfigError(
            f"--split {split} without --split-file remakes the model's lesion-grouped split from the labels it was "
            f"trained on, {trained_on.get('source') or 'its training labels'} ({trained_on.get('images')} images; "
            f"the path as given where it was trained), but {data.source} is a different file (its sha256 differs; "
            "an edited or reordered copy is different too). Give that labels file, or the training run's split.csv "
            f"as --split-file{hint}.")
    selected, parts = _remake_parts(training, rule, data, hint)
    if split not in parts:
        raise ConfigError(f"Unknown split {split!r}: use one of {', '.join(SPLIT_NAMES)}.")
    if not parts[split]:
        raise ConfigError(f"This model's training run had no {split} split ({split} fraction 0): nothing to evaluate.")
    how = (f"seed {rule['seed']}, {rule['val_fraction']:g} validation, {rule['test_fraction']:g} test, "
           f"by {selected.group_kind(plural=False)}")
    info = {"file": f"{data.source} as the model's training run split it (remade: {how})", "split": split,
            "listed": len(parts[split]), "evaluated": len(parts[split]), "missing_from_labels": 0, "remade": True,
            "sha256": split_sha256(selected, parts)}
    return selected.subset(parts[split]), info


def _split_rule(training: dict) -> dict:
    """How the model's training run split its labels: seed, fractions, subsample (older manifests: from the recipe)."""
    recipe = training.get("recipe") or {}
    return training.get("split") or {
        "seed": training.get("split_seed"), "val_fraction": recipe.get("val_fraction"),
        "test_fraction": recipe.get("test_fraction"), "max_images": recipe.get("max_images")}


_REMADE: dict[tuple, dict[str, list[int]]] = {}  # the last split remade: (labels sha256, size, rule) → parts


def _remake_parts(training: dict, rule: dict, data: LabelledSet, hint: str = "") -> tuple[LabelledSet, dict]:
    """(the images split, their train/val/test indices) as the training run made them from ``data``, its
    training labels; ConfigError when the remade split does not match the one the manifest records."""
    selected = data
    if rule.get("max_images") and rule["max_images"] < len(data):
        selected = subsample(data, int(rule["max_images"]), int(rule["seed"]))
    key = (selected.sha256, len(selected), json.dumps(rule, sort_keys=True, default=str))
    if selected.sha256 is None or key not in _REMADE:  # the split takes ~2.5 s on HAM10000; asked for twice
        _REMADE.clear()
        _REMADE[key] = grouped_split(selected, float(rule["val_fraction"]), float(rule["test_fraction"]),
                                     int(rule["seed"]))
    parts = _REMADE[key]
    compare = ("val", "test") if training.get("extra_train") else SPLIT_NAMES
    if not _same_split(selected, parts, rule.get("sha256"), training.get("splits") or {}, compare):
        raise ConfigError(
            f"The split remade from {data.source} does not match the one this model was trained with (another "
            "scikit-learn version may split differently); give the training run's split.csv as --split-file"
            f"{hint}.")
    return selected, parts


def _training_file(record: dict, given: LabelledSet, taxonomy) -> LabelledSet | None:
    """The whole labels file a manifest ``record`` describes, when it is here unchanged: the file ``given`` was
    selected from, else the recorded path (as given where the model was trained, usually relative to the
    repository); None otherwise."""
    want = record.get("manifest_sha256")
    if not want:
        return None
    source = given.source if given.sha256 == want else _find_recorded(record.get("source"))
    if source is None or not Path(source).is_file():
        return None
    try:  # only ids, labels and groups are needed: the images are not looked for
        found = load_labels(source, None, taxonomy=taxonomy, check_files=False)
    except ManifestError:
        return None
    return found if found.sha256 == want else None


REPOSITORY = Path(__file__).resolve().parents[3]  # the source checkout, when dermscreen is installed from one


def _find_recorded(source: str | None) -> Path | None:
    """A path recorded where a model was trained (usually relative to the repository it was run from), looked up
    from here, from this repository's root, and under $DERMSCREEN_DATA (by the part after a 'data' folder)."""
    if not source:
        return None
    recorded = Path(source)
    candidates = [recorded] if recorded.is_absolute() else [Path.cwd() / recorded, REPOSITORY / recorded]
    parts = recorded.parts
    if os.environ.get("DERMSCREEN_DATA") and "data" in parts:
        tail = parts[len(parts) - 1 - parts[::-1].index("data") + 1:]
        candidates.append(Path(os.environ["DERMSCREEN_DATA"]).joinpath(*tail))
    return next((c for c in candidates if c.is_file()), None)


def model_seen_images(bundle: Bundle, given: LabelledSet) -> dict[str, str] | None:
    """Image id → 'train' or 'val' for every image that trained this model or chose and calibrated it, found by
    remaking its split from its training labels (the file ``given`` comes from, or the files the manifest names,
    when they are here unchanged); None when they cannot be found or the split cannot be remade.

    By image id, so the model's own images are recognised in any labels file or split file they were copied to.
    """
    training = bundle.manifest.training if isinstance(bundle.manifest.training, dict) else {}
    rule = _split_rule(training)
    if None in (rule.get("seed"), rule.get("val_fraction"), rule.get("test_fraction")):
        return None
    taxonomy = bundle.manifest.taxonomy
    main = _training_file(training.get("data") or {}, given, taxonomy)
    if main is None:
        return None
    try:
        selected, parts = _remake_parts(training, rule, main)
    except ConfigError:
        return None
    seen = {selected.samples[i].image_id: name for name in ("train", "val") for i in parts[name]}
    held_out = {selected.samples[i].group_id for name in ("val", "test") for i in parts[name]}
    known = {s.image_id for s in main.samples}
    for record in training.get("extra_train") or []:  # as training.fit.training_data took their images
        extra = _training_file(record, given, taxonomy) if isinstance(record, dict) else None
        if extra is None:
            continue
        for sample in extra.samples:
            if sample.image_id not in known and sample.group_id not in held_out:
                seen.setdefault(sample.image_id, "train")
        known.update(s.image_id for s in extra.samples)
    return seen


def seen_images_warning(bundle: Bundle, data: LabelledSet) -> tuple[str | None, dict[str, int] | None]:
    """(a sentence, counts per part) when the images ``data`` holds include some that trained or calibrated this
    model (``model_seen_images``); (None, {}) when they include none; (None, None) when that cannot be told."""
    seen = model_seen_images(bundle, data)
    if seen is None:
        return None, None
    if not seen:
        return None, {}
    counts: dict[str, int] = {}
    for sample in data.samples:
        part = seen.get(sample.image_id)
        if part:
            counts[part] = counts.get(part, 0) + 1
    if not counts:
        return None, {}
    how = " and ".join(f"{n} from its {'training' if part == 'train' else 'validation'} split"
                       for part, n in sorted(counts.items(), key=lambda kv: kv[0] != "train"))
    return (f"{sum(counts.values())} of the {len(data)} images evaluated are this model's own ({how}: they trained "
            "it or chose and calibrated it), so these scores overstate how the model does on new images. Leave "
            "them out for held-out scores."), counts


def check_training_split(bundle: Bundle, data: LabelledSet, split: dict[str, str], why: str) -> None:
    """ConfigError unless ``data`` is the labels file the model was trained on and ``split`` (image id → part) is
    its training run's split, as far as the manifest records them (nothing is checked for a model without a
    training record). ``why``: what the caller needs them for, said in the error."""
    training = bundle.manifest.training if isinstance(bundle.manifest.training, dict) else {}
    trained_on = (training.get("data") or {}).get("manifest_sha256")
    if trained_on and data.sha256 != trained_on:
        raise ConfigError(
            f"{data.source} is not the labels file this model was trained on (its sha256 differs; an edited or "
            f"reordered copy differs too): {why}, so give the labels it was trained on "
            f"({Path(str((training.get('data') or {}).get('source', ''))).name or 'see dermscreen info --json'}).")
    wrong = ConfigError(f"This split file is not the split this model's training run made (its parts differ from "
                        f"those the manifest records): {why}, so give the run's own split.csv.")
    rule = _split_rule(training)
    if trained_on and None not in (rule.get("seed"), rule.get("val_fraction"), rule.get("test_fraction")):
        try:  # the labels are the training labels: the split is remade and compared image by image
            selected, remade = _remake_parts(training, rule, data)
        except ConfigError:
            remade = None  # (another scikit-learn may split differently): the recorded counts below decide
        if remade is not None:
            for name in ("val", "test"):
                given = {s.image_id for s in selected.samples if split.get(s.image_id) == name}
                if given != {selected.samples[i].image_id for i in remade[name]}:
                    raise wrong
            return
    parts: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for i, sample in enumerate(data.samples):
        part = split.get(sample.image_id)
        if part in parts:
            parts[part].append(i)
    recorded = (training.get("split") or {}).get("sha256")
    compare = ("val", "test") if training.get("extra_train") else SPLIT_NAMES
    if (recorded or training.get("splits")) and not _same_split(data, parts, recorded, training.get("splits") or {},
                                                                 compare):
        raise wrong


def _same_split(data: LabelledSet, parts: dict[str, list[int]], sha256: str | None, recorded: dict,
                compare: tuple[str, ...]) -> bool:
    """Whether a remade split is the recorded one: by its hash when the manifest has it, else by the image and
    class counts of the ``compare`` parts (the manifest's train counts include extra_train images, if any)."""
    if sha256:
        return split_sha256(data, parts) == sha256
    if not recorded:
        return False
    for name in compare:
        want = recorded.get(name) or {"images": 0, "class_counts": None}
        if len(parts[name]) != want.get("images"):
            return False
        if parts[name] and data.subset(parts[name]).class_counts() != want.get("class_counts"):
            return False
    return True


def evaluate(model: str | Path | None, labels: str | Path, images: str | Path | None, out: str | Path,
             batch_size: int = 32, tta: bool = False, split_file: str | Path | None = None,
             split: str | None = None, *, bootstrap: int = 1000, seed: int = 0, min_subgroup: int = 20,
             workers: int | None = None, progress: Progress | None = None,
             overwrite: bool = False) -> EvaluationResult:
    """Evaluate bundle ``model`` (None: the default model) on ``labels``; writes every output into ``out``.

    ``split`` of ``split_file`` (default: test) selects the images; ``split`` without ``split_file``: that part of
    the model's own split, remade from its training labels (``remade_split``), or refused.
    ``out`` must not hold an earlier evaluation unless ``overwrite``.
    """
    progress = progress or Progress()
    out = check_out(out, overwrite)  # before any work: a bad --out must not fail after the bootstrap
    progress.phase("Loading the model and the labels")
    bundle, data, split_info = _load(model, labels, images, split_file, split)
    progress.start_images(len(data))
    preds = predict_samples(bundle, data.samples, batch_size=batch_size, tta=tta, workers=workers,
                            on_batch=progress.advance)
    progress.phase(f"Computing metrics ({bootstrap} bootstrap resamples)")
    scored = EvalData(np.asarray(data.labels), preds.probs, bundle.manifest.taxonomy,
                      bundle.manifest.operating_points, preds.probs_uncalibrated)
    unit = bootstrap_unit(data)
    metrics = {
        "dermscreen_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
        "model": _model_info(bundle),
        "data": {**data.summary(), "split": split_info, "selection": describe_selection(labels, split_info)},
        "warnings": _warnings(bundle, data, split_info),
        "settings": {"tta": TTA_MODE if tta else False, "batch_size": batch_size, "min_subgroup": min_subgroup},
        "ood": _ood_summary(bundle, preds),
        **compute_metrics(scored, [s.group_id for s in data.samples], subgroup_columns(data.samples),
                          n_boot=bootstrap, seed=seed, min_subgroup=min_subgroup, unit=unit),
    }
    progress.phase("Drawing plots and writing the report")
    return _write_outputs(out, data, preds, scored, metrics)


def _warnings(bundle: Bundle, data: LabelledSet, split_info: dict | None) -> list[str]:
    """Every reason these scores are not held-out: a seen split by name, all of a training labels file, the
    model's own images found by id (said once: the first that applies), and a recalibration on these images."""
    seen = held_out_warning(split_info) or training_labels_warning(bundle, data, split_info) \
        or seen_images_warning(bundle, data)[0]
    return [w for w in (seen, recalibration_warning(bundle, data, split_info)) if w]


def _write_outputs(out: Path, data: LabelledSet, preds: Predictions, scored: EvalData,
                   metrics: dict[str, Any]) -> EvaluationResult:
    headline = metrics["overall"]["headline"]
    plots = {
        "confusion_matrix": confusion_matrix_png(scored),
        "roc_curves": roc_png(scored),
        "reliability": reliability_png(scored, headline["ece"]["value"],
                                       headline.get("ece_uncalibrated", {}).get("value")),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # checked up front by check_out; this catches what changed since
        raise ConfigError(f"Cannot write to {out}: {exc.strerror or exc}.") from None
    files = {"predictions": out / "predictions.csv", "metrics": out / "metrics.json", "report": out / "report.html",
             "markdown": out / "metrics.md"}
    write_predictions(files["predictions"], data, preds)
    files["metrics"].write_text(json.dumps(metrics, indent=2, allow_nan=False), encoding="utf-8")
    files["markdown"].write_text(to_markdown(metrics), encoding="utf-8")
    for name, png in plots.items():
        files[name] = out / PLOT_FILES[name]
        files[name].write_bytes(png)
    files["report"].write_text(render_report(metrics, plots, data.taxonomy), encoding="utf-8")
    return EvaluationResult(out, metrics, files)
