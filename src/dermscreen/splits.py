"""Lesion-grouped, class-stratified, seeded splits.

Images of one lesion (else one patient, else the image alone) always land in the same split:
several HAM10000 images show the same lesion, and letting them straddle train and test makes
validation scores leak and mean nothing.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from .errors import ConfigError, ManifestError
from .manifests import LabelledSet, image_id_of

SPLIT_NAMES = ("train", "val", "test")


def _carve(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int,
           what: str = "held-out", codes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (rest, carved) with ~``fraction`` carved, grouped and stratified.

    Raises ConfigError, naming the ``what`` split and the largest class (``codes`` names the labels), when
    there are too few images or lesion groups to carve it.
    """
    n_splits = max(2, int(round(1.0 / fraction)))
    # StratifiedGroupKFold needs every class to appear at least n_splits times to stratify well;
    # it still works (with a warning) otherwise, which is acceptable for tiny test sets, but raises a bare
    # ValueError when even the largest class has fewer than n_splits images: say why in a sentence instead.
    n_groups = len(np.unique(groups))
    n_splits = min(n_splits, n_groups)
    counts = np.bincount(labels) if len(labels) else np.zeros(1, int)
    if n_splits < 2 or counts.max() < n_splits:
        # sklearn would raise "n_splits=7 cannot be greater than the number of members in each class"
        big = int(counts.argmax())
        name = codes[big] if codes and big < len(codes) else str(big)
        need = max(n_splits, 2)
        raise ConfigError(
            f"Too few images for a {what} split of {fraction:.0%} of the {len(labels)} images ({n_groups} "
            f"lesion or image groups) it is taken from: the largest class, {name!r}, has only "
            f"{int(counts.max())} images, and this split needs at least {need} images of one class and {need} "
            "groups. Add images, or raise val_fraction/test_fraction (a larger fraction needs fewer images), "
            "or set test_fraction: 0."
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest, carved = next(iter(splitter.split(np.zeros(len(labels)), labels, groups)))
    return rest, carved


def grouped_split(
    data: LabelledSet,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, list[int]]:
    """Indices of ``data.samples`` for train/val/test; no group crosses splits; deterministic by seed.

    A fraction of 0 leaves that split empty.
    """
    import warnings

    labels = np.asarray(data.labels)
    groups = np.asarray([s.group_id for s in data.samples])
    index = np.arange(len(labels))
    out: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    with warnings.catch_warnings():
        # "The least populated class in y has only N members": expected for rare classes in small sets.
        warnings.simplefilter("ignore", UserWarning)
        if test_fraction > 0:
            rest, test = _carve(labels, groups, test_fraction, seed, "test", data.taxonomy.codes)
            out["test"] = sorted(index[test].tolist())
            index = index[rest]
        if val_fraction > 0:
            rel = val_fraction / (1.0 - test_fraction)
            rest, val = _carve(labels[index], groups[index], rel, seed + 1, "validation", data.taxonomy.codes)
            out["val"] = sorted(index[val].tolist())
            index = index[rest]
    out["train"] = sorted(index.tolist())
    return out


def split_sha256(data: LabelledSet, split: dict[str, list[int]]) -> str:
    """sha256 of a split as the sorted ``image_id,split`` lines: two splits of the same images agree exactly when
    every image is in the same part, whatever the order of the rows."""
    lines = sorted(f"{data.samples[i].image_id},{name}" for name, idx in split.items() for i in idx)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def subsample(data: LabelledSet, n: int, seed: int, min_per_class: int = 4) -> LabelledSet:
    """About ``n`` images of ``data``, whole lesion groups, each class in proportion (at least ``min_per_class``)."""
    # linear-time on purpose: StratifiedGroupKFold with 1/fraction folds takes minutes on HAM10000
    rng = np.random.default_rng(seed)
    members: dict[str, list[int]] = {}
    for i, s in enumerate(data.samples):
        members.setdefault(s.group_id, []).append(i)
    labels = np.asarray(data.labels)
    counts = np.bincount(labels, minlength=data.taxonomy.num_classes)
    target = np.minimum(counts, np.maximum(min_per_class, np.round(n * counts / len(data)))).astype(int)
    taken = np.zeros_like(target)
    keep: list[int] = []
    for g in rng.permutation(list(members)):
        idx = members[g]
        c = labels[idx[0]]
        if taken[c] < target[c]:
            keep.extend(idx)
            taken[c] += len(idx)
    return data.subset(sorted(keep))


def assert_no_group_leak(data: LabelledSet, split: dict[str, list[int]]) -> None:
    """Raise AssertionError if any lesion/patient group appears in more than one split."""
    owner: dict[str, str] = {}
    for name, idx in split.items():
        for i in idx:
            g = data.samples[i].group_id
            if owner.setdefault(g, name) != name:
                raise AssertionError(f"group {g} is in both {owner[g]} and {name}")


def read_split_file(path: str | Path) -> dict[str, str]:
    """{image id: split name} from an ``image_id,split`` CSV (a training run's ``split.csv``; an ``image``
    column of file names works too); ids follow :func:`~dermscreen.manifests.image_id_of`, as the manifests'
    do. Raises ManifestError naming the file (and row)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Split file not found: {path}.")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        id_col = "image_id" if "image_id" in header else "image" if "image" in header else None
        if id_col is None or "split" not in header:
            raise ManifestError(f"{path} is not a split file: it must have the columns image_id,split (found: "
                                f"{', '.join(header) or 'none'}), as a training run's split.csv has.")
        reader.fieldnames = header
        parts = {}
        for rownum, row in enumerate(reader, start=2):
            if not (row.get(id_col) or "").strip() or not (row.get("split") or "").strip():
                raise ManifestError(f"{path}, row {rownum}: image id and split must both be given.")
            parts[image_id_of(row[id_col])] = row["split"].strip()
    return parts
