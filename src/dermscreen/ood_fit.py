"""``dermscreen refit-ood``: fit the colour check and re-choose both OOD thresholds of a bundle (no torch).

The embedding check (``ood.MahalanobisOOD``) is fitted during training; its statistics are kept, only its
threshold is re-chosen. The colour check (``ood.ColourOOD``) is fitted here on the training images'
colour statistics. Each threshold keeps a chosen share of the validation images; together they refuse
about ``(1 - keep) + (1 - colour_keep)`` of them at most. Images are decoded exactly as the Screener
decodes uploads, and the embedding is the one the Screener scores (the model's usual centred view).

The result is a new bundle (the source is verified first and never modified): the same model files,
``arrays.npz`` with the colour statistics added, and ``manifest.ood`` with both thresholds and the
validation shares they keep.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .bundle import Bundle, OODSpec, check_new_bundle_folder
from .errors import ConfigError
from .imaging import read_image_file
from .manifests import LabelledSet, load_labels
from .ood import ColourOOD, MahalanobisOOD, colour_features
from .splits import read_split_file

# Together the two checks may refuse up to 3 % + 1 % of validation images: under the 5 % asked of in-distribution
# refusals, with room for a test set a little unlike validation (the embedding check alone kept 95 %).
EMBEDDING_KEEP = 0.97
COLOUR_KEEP = 0.99


def ood_images(data: LabelledSet, split: dict[str, str], extra: Iterable[LabelledSet] = ()) -> tuple[list, list]:
    """(training image paths, validation image paths): the split's train and val images; from ``extra``
    (other copies of the data), its images of training lesions join training and its images of validation
    lesions join validation, so both checks know every copy; test lesions are never used."""
    lesion = {s.image_id: s.lesion_id or s.image_id for s in data.samples}
    role = {lesion[i]: part for i, part in split.items() if i in lesion}
    train = [s.image_path for s in data.samples if split.get(s.image_id) == "train"]
    val = [s.image_path for s in data.samples if split.get(s.image_id) == "val"]
    if not train or not val:
        raise ConfigError("The split file and the data share no train/val images: give the --data CSV the run "
                          "was trained on.")
    for more in extra:
        for s in more.samples:
            part = role.get(s.lesion_id or s.image_id, split.get(s.image_id))
            if part == "train":
                train.append(s.image_path)
            elif part == "val":
                val.append(s.image_path)
    return train, val


def file_colours(paths: Iterable[Path], progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, 8) colour features of image files, decoded as the Screener decodes uploads."""
    colours = []
    for k, path in enumerate(paths):
        colours.append(colour_features(read_image_file(path)))
        if progress:
            progress(k + 1)
    return np.array(colours)


def colour_check(embedding: MahalanobisOOD, train_colours: np.ndarray, val_colours: np.ndarray,
                 val_embeddings: np.ndarray, keep: float = EMBEDDING_KEEP,
                 colour_keep: float = COLOUR_KEEP) -> tuple[ColourOOD, OODSpec]:
    """Fit the colour check on training colours; choose both thresholds on validation → (check, the bundle's
    OOD spec)."""
    colour = ColourOOD.fit(train_colours)
    colour_scores = colour.score(val_colours)
    emb_scores = embedding.score(val_embeddings)
    threshold = float(np.quantile(emb_scores, keep))
    colour_threshold = float(np.quantile(colour_scores, colour_keep))
    return colour, OODSpec(
        threshold=threshold, validation_kept=float(np.mean(emb_scores <= threshold)),
        colour_threshold=colour_threshold, colour_validation_kept=float(np.mean(colour_scores <= colour_threshold)),
        validation_kept_both=float(np.mean((emb_scores <= threshold) & (colour_scores <= colour_threshold))))


def _features(bundle: Bundle, paths: list[Path], threads: int | None,
              progress: Callable[[int], None] | None) -> tuple[np.ndarray, np.ndarray]:
    """(colour features (N, 8), embeddings (N, D)) of image files, decoded and viewed as the Screener does."""
    from .screening import Screener, ScreenerSettings

    screener = Screener(bundle, ScreenerSettings(threads=threads, ood_refusal=False, quality_gate=False,
                                                 smart_crop=False, abcd=False, heatmap=False))
    colours, embeddings = [], []
    for k, path in enumerate(paths):
        rgb = read_image_file(path)
        colours.append(colour_features(rgb))
        embeddings.append(screener._run_model(rgb, None, False)[1])
        if progress:
            progress(k + 1)
    return np.array(colours), np.array(embeddings)


def refit_ood(bundle_path: str | Path, data_csv: Path, split_csv: Path, out: Path, *, extra: Iterable[Path] = (),
              images: Path | None = None, keep: float = EMBEDDING_KEEP, colour_keep: float = COLOUR_KEEP,
              threads: int | None = None, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Fit the colour check, re-choose both thresholds on validation, write the new bundle to ``out``."""
    for name, share in (("keep", keep), ("colour keep", colour_keep)):
        if not 0.5 <= share < 1.0:
            raise ConfigError(f"The {name} share {share:g} must be at least 0.5 and below 1.")
    out = check_new_bundle_folder(out, bundle_path)  # a bad --out must fail now, not after the images are read
    bundle = Bundle.load(bundle_path)  # verified
    m = bundle.manifest
    if m.ood is None or "ood_mean" not in bundle.arrays:
        raise ConfigError(f"{bundle.source} has no embedding OOD statistics to keep; re-export it from training.")
    from .evaluation.evaluate import check_training_split  # (imports matplotlib: only when needed)

    split = read_split_file(split_csv)
    # the CSVs use the model's own classes (a custom taxonomy is not HAM10000's)
    data = load_labels(data_csv, images, taxonomy=m.taxonomy)
    # thresholds chosen on other images than the model's own validation split (its training or test images, or
    # another file's) would be reported as "keeps X % of validation" and be wrong
    check_training_split(bundle, data, split, "refit-ood chooses the thresholds on the model's own validation split")
    train, val = ood_images(data, split, [load_labels(p, taxonomy=m.taxonomy) for p in extra])
    tick = (lambda part, n: (lambda k: progress(part, k, n))) if progress else (lambda part, n: None)
    train_colour = file_colours(train, tick("training images", len(train)))  # the model is not needed for these
    val_colour, val_emb = _features(bundle, val, threads, tick("validation images", len(val)))
    colour, ood = colour_check(MahalanobisOOD.from_arrays(bundle.arrays), train_colour, val_colour, val_emb,
                               keep, colour_keep)
    buf = io.BytesIO()
    np.savez(buf, **{**dict(bundle.arrays), **colour.to_arrays()})
    files = {name: bundle.file(name) for name in m.files if name != "arrays.npz"}
    Bundle.write(out, m.model_copy(update={"ood": ood}), {**files, "arrays.npz": buf.getvalue()})
    Bundle.load(out)  # re-read and verified, as every bundle we hand out
    return out

