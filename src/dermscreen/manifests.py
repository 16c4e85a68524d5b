"""Labelled manifests: CSV files that pair images with diagnoses.

Three formats are recognised from the header:

- ``ham10000``: the official HAM10000 metadata (``lesion_id,image_id,dx,dx_type,age,sex,localization``)
  with an images folder holding ``<image_id>.jpg``;
- ``isic``: the ISIC 2018 ground truth (one-hot ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``) with an
  images folder;
- ``plain``: ``image,dx`` plus optional ``lesion_id``/``patient_id``, ``age``, ``sex``, ``site``;
  image paths are relative to the CSV (or to ``images_dir`` when given).

Every image's id is its name without folders and a known image extension (:func:`image_id_of`), in every
format; two rows whose ids collide (``nv/0.jpg`` and ``mel/0.jpg``) are refused, since a run's ``split.csv``
and evaluation tell images apart by id.

Every problem raises :class:`ManifestError` naming the file and the row (1-based, header = row 1).
"""
from __future__ import annotations

import csv
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import ManifestError, TaxonomyError, printable
from .metadata import sex_code
from .taxonomy import HAM10000, Taxonomy

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
HAM_COLUMNS = ("lesion_id", "image_id", "dx")
ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
_MISSING = {"", "unknown", "nan", "na", "n/a", "none", "null", "?"}


@dataclass(frozen=True)
class Sample:
    """One labelled image and what is known of the patient and lesion."""

    image_id: str
    image_path: Path
    dx: str
    lesion_id: str | None = None
    patient_id: str | None = None
    age: float | None = None
    sex: str | None = None  # "male" | "female" | None
    site: str | None = None  # anatomical site, lower case
    dx_type: str | None = None

    @property
    def group_id(self) -> str:
        """What a split must keep together: the lesion, else the patient, else the image."""
        if self.lesion_id:
            return f"lesion:{self.lesion_id}"
        if self.patient_id:
            return f"patient:{self.patient_id}"
        return f"image:{self.image_id}"


@dataclass
class LabelledSet:
    """Samples read from one manifest, with where they came from."""

    samples: list[Sample]
    source: Path | None = None
    format: str = "plain"
    taxonomy: Taxonomy = field(default_factory=lambda: HAM10000)
    sha256: str | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Iterable[int]) -> "LabelledSet":
        return LabelledSet([self.samples[i] for i in indices], self.source, self.format, self.taxonomy, self.sha256)

    @property
    def labels(self) -> list[int]:
        """Class indices in taxonomy order."""
        return [self.taxonomy.index(s.dx) for s in self.samples]

    def class_counts(self) -> dict[str, int]:
        """Images per class code, in taxonomy order, zeros included."""
        counts = Counter(s.dx for s in self.samples)
        return {code: counts.get(code, 0) for code in self.taxonomy.codes}

    def ids_sha256(self) -> str:
        """sha256 of the sorted image ids: the same selection of images, whatever the file or row order."""
        return hashlib.sha256("\n".join(sorted(s.image_id for s in self.samples)).encode("utf-8")).hexdigest()

    def group_kind(self, plural: bool = True) -> str:
        """What the split groups are (``Sample.group_id``), in words: 'lesions', 'patients', 'images' or a mix;
        singular ('lesion' ...) with ``plural=False``."""
        kinds = {s.group_id.split(":", 1)[0] for s in self.samples}
        kind = kinds.pop() if len(kinds) == 1 else "group"
        if plural:
            return f"{kind}s" if kind != "group" else "groups (lesions, else patients, else single images)"
        return kind if kind != "group" else "lesion or patient"

    def summary(self) -> dict:
        """A JSON-ready description of the data: counts, groups, source and manifest hash."""
        return {
            "source": str(self.source) if self.source else None,
            "format": self.format,
            "manifest_sha256": self.sha256,
            "images": len(self.samples),
            "groups": len({s.group_id for s in self.samples}),
            "grouped_by": self.group_kind() if self.samples else None,
            "class_counts": self.class_counts(),
            "has_metadata": {
                "age": any(s.age is not None for s in self.samples),
                "sex": any(s.sex is not None for s in self.samples),
                "site": any(s.site is not None for s in self.samples),
            },
        }


def detect_format(header: list[str]) -> str:
    """``ham10000``, ``isic`` or ``plain`` from a CSV header; raises ManifestError otherwise."""
    cols = {h.strip() for h in header}
    if all(c in cols for c in HAM_COLUMNS):
        return "ham10000"
    if "image" in cols and all(c in cols for c in ISIC_COLUMNS):
        return "isic"
    if "image" in cols and "dx" in cols:
        return "plain"
    raise ManifestError(
        "Unrecognised manifest header "
        f"({', '.join(header) or 'empty'}). Expected the HAM10000 metadata columns "
        "(lesion_id,image_id,dx,...), the ISIC one-hot ground truth (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC) "
        "or a plain CSV with image,dx."
    )


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip()
    return None if v.lower() in _MISSING else v


def _parse_age(value: str | None, where: str) -> float | None:
    v = _clean(value)
    if v is None:
        return None
    try:
        age = float(v)
    except ValueError:
        raise ManifestError(f"{where}: age {value!r} is not a number (leave it empty if unknown).") from None
    if math.isnan(age):
        return None
    if not 0 <= age <= 120:
        raise ManifestError(f"{where}: age {age:g} is outside 0-120.")
    return age


def _parse_sex(value: str | None) -> str | None:
    code = sex_code(_clean(value))
    return code if code in ("male", "female") else None  # unknown and unreadable alike: not known


def _find_image(folder: Path, image_id: str) -> Path | None:
    candidate = folder / image_id
    if candidate.suffix.lower() in IMAGE_SUFFIXES and candidate.is_file():
        return candidate
    for suffix in IMAGE_SUFFIXES:
        p = folder / f"{image_id}{suffix}"
        if p.is_file():
            return p
    return None


def image_id_of(name: str) -> str:
    """The image id of a manifest's image name: without folders and a known image extension.

    ``nv/ISIC_0024306.jpg`` and ``ISIC_0024306`` both give ``ISIC_0024306``. The manifests, a run's
    ``split.csv`` and its readers all use this one rule, so their ids always match.
    """
    name = name.strip().rsplit("/", 1)[-1]
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and stem and f".{suffix.lower()}" in IMAGE_SUFFIXES else name


def _isic_dx(row: dict, where: str) -> str:
    try:
        values = {c: float(row[c]) for c in ISIC_COLUMNS}
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: the one-hot columns {', '.join(ISIC_COLUMNS)} must hold 0 or 1.") from None
    hot = [c for c, v in values.items() if v >= 0.5]
    if len(hot) != 1:
        raise ManifestError(f"{where}: exactly one of {', '.join(ISIC_COLUMNS)} must be 1 (found {len(hot)}).")
    return hot[0].lower()


def load_labels(
    csv_path: str | Path,
    images_dir: str | Path | None = None,
    taxonomy: Taxonomy | None = None,
    check_files: bool = True,
) -> LabelledSet:
    """Read a labelled manifest of any supported format into a :class:`LabelledSet`.

    ``images_dir`` defaults to ``<csv folder>/images`` for HAM10000/ISIC manifests and to the CSV's
    folder for plain ones. Raises ManifestError naming the file and row for any problem.
    """
    taxonomy = taxonomy or HAM10000
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ManifestError(f"Labels file not found: {printable(csv_path)}.")
    try:  # its path is written into reports and manifests (UTF-8 text): refused now, not after the work
        str(csv_path).encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"The path of the labels file {printable(csv_path)} is not valid UTF-8 (a name from "
                            "another system's encoding): rename the file or its folder.") from None
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"{csv_path} is not a UTF-8 text CSV file.") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    fmt = detect_format(header)
    if images_dir is not None:
        folder = Path(images_dir)
    elif fmt == "plain":
        folder = csv_path.parent
    else:
        folder = csv_path.parent / "images"
    if check_files and not folder.is_dir():
        raise ManifestError(f"Images folder not found: {folder} (give it with --images).")

    samples: list[Sample] = []
    seen: dict[str, tuple[int, str]] = {}  # image id -> (row, image name as written)
    for rownum, row in enumerate(reader, start=2):
        where = f"{csv_path}, row {rownum}"
        if None in row or any(v is None for v in row.values()):
            raise ManifestError(f"{where}: wrong number of fields for header ({len(header)} columns).")
        if fmt == "ham10000":
            image_id, dx = row["image_id"].strip(), row["dx"].strip().lower()
            lesion_id, patient_id = _clean(row.get("lesion_id")), _clean(row.get("patient_id"))
            site = _clean(row.get("localization"))
        elif fmt == "isic":
            image_id, dx = row["image"].strip(), _isic_dx(row, where)
            lesion_id, patient_id = _clean(row.get("lesion_id")), _clean(row.get("patient_id"))
            site = _clean(row.get("site") or row.get("localization"))
        else:
            image_id, dx = row["image"].strip(), (row["dx"] or "").strip().lower()
            lesion_id, patient_id = _clean(row.get("lesion_id")), _clean(row.get("patient_id"))
            site = _clean(row.get("site") or row.get("localization"))
        if not image_id:
            raise ManifestError(f"{where}: the image column is empty.")
        if not dx:
            raise ManifestError(f"{where}: the diagnosis is empty.")
        try:
            taxonomy.index(dx)
        except TaxonomyError:
            raise ManifestError(
                f"{where}: unknown diagnosis code {dx!r}; the taxonomy {taxonomy.name} knows "
                f"{', '.join(taxonomy.codes)}."
            ) from None
        sample_id = image_id_of(image_id)
        if sample_id in seen:
            first_row, first_name = seen[sample_id]
            if first_name == image_id:
                raise ManifestError(f"{where}: image {image_id!r} is listed twice (first at row {first_row}).")
            raise ManifestError(
                f"{where}: images {first_name!r} (row {first_row}) and {image_id!r} would share the image id "
                f"{sample_id!r}. Image ids are the file names without folder and extension, and split.csv and "
                "evaluation tell images apart by them: rename one of the files so every name is unique."
            )
        seen[sample_id] = (rownum, image_id)
        if check_files:
            path = _find_image(folder, image_id)
            if path is None:
                raise ManifestError(f"{where}: image file for {image_id!r} not found in {folder}.")
        else:
            path = folder / image_id
        samples.append(
            Sample(
                image_id=sample_id,
                image_path=path,
                dx=dx,
                lesion_id=lesion_id,
                patient_id=patient_id,
                age=_parse_age(row.get("age"), where),
                sex=_parse_sex(row.get("sex")),
                site=site.lower() if site else None,
                dx_type=_clean(row.get("dx_type")),
            )
        )
    if not samples:
        raise ManifestError(f"{csv_path} has a header but no rows.")
    return LabelledSet(samples, csv_path, fmt, taxonomy, hashlib.sha256(raw).hexdigest())
