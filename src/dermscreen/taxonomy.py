"""Diagnosis classes, their display names and groups; HAM10000 by default, YAML for your own.

A taxonomy is an ordered list of classes; the order is the order of the model's outputs.
Each class belongs to a group, ``malignant`` or ``benign``: P(malignant) is the sum of the
probabilities of the malignant classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from .errors import TaxonomyError

Group = Literal["malignant", "benign"]


class DiagnosisClass(BaseModel):
    """One diagnosis: a short code (``mel``), a display name and its group."""

    code: str = Field(pattern=r"^[a-z0-9_\-]+$")
    name: str
    group: Group
    description: str = ""


class Taxonomy(BaseModel):
    """An ordered set of diagnosis classes; the order is the model's output order."""

    name: str
    classes: list[DiagnosisClass]

    @field_validator("classes")
    @classmethod
    def _at_least_two(cls, classes: list[DiagnosisClass]) -> list[DiagnosisClass]:
        if len(classes) < 2:
            raise ValueError("a taxonomy needs at least two classes")
        return classes

    @model_validator(mode="after")
    def _unique_codes(self) -> "Taxonomy":
        codes = [c.code for c in self.classes]
        dupes = sorted({c for c in codes if codes.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate class codes: {', '.join(dupes)}")
        return self

    # ---- lookups -------------------------------------------------------------------------
    @property
    def codes(self) -> list[str]:
        """Class codes in output order."""
        return [c.code for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, code: str) -> int:
        """Output index of ``code`` (case-insensitive); raises TaxonomyError if unknown."""
        key = code.strip().lower()
        for i, c in enumerate(self.classes):
            if c.code == key:
                return i
        raise TaxonomyError(
            f"Unknown diagnosis code {code!r}; this taxonomy ({self.name}) knows: {', '.join(self.codes)}."
        )

    @property
    def malignant_mask(self) -> np.ndarray:
        """Boolean vector over classes: True where the class is malignant."""
        return np.array([c.group == "malignant" for c in self.classes], dtype=bool)

    @property
    def malignant_codes(self) -> list[str]:
        return [c.code for c in self.classes if c.group == "malignant"]

    def p_malignant(self, probs: np.ndarray) -> np.ndarray:
        """Sum of malignant-class probabilities; ``probs`` is (..., num_classes)."""
        return np.asarray(probs)[..., self.malignant_mask].sum(axis=-1)

    # ---- files ---------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "Taxonomy":
        """Read a taxonomy YAML: ``name:`` and ``classes: [{code, name, group}, ...]``."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TaxonomyError(f"Taxonomy file not found: {path}.") from None
        except yaml.YAMLError as exc:
            raise TaxonomyError(f"Taxonomy file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict) or "classes" not in data:
            raise TaxonomyError(
                f"Taxonomy file {path} must be a mapping with 'name' and 'classes' "
                "(a list of {code, name, group})."
            )
        data.setdefault("name", path.stem)
        try:
            return cls.model_validate(data)
        except Exception as exc:  # pydantic.ValidationError: re-raise with the file named
            raise TaxonomyError(f"Taxonomy file {path} is invalid: {exc}") from None

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(), sort_keys=False), encoding="utf-8")


HAM10000 = Taxonomy(
    name="ham10000",
    classes=[
        DiagnosisClass(code="akiec", name="Actinic keratosis / intraepithelial carcinoma", group="malignant",
                       description="Actinic keratosis or Bowen's disease: a (pre)cancerous keratinocyte lesion."),
        DiagnosisClass(code="bcc", name="Basal cell carcinoma", group="malignant",
                       description="The most common skin cancer; grows slowly, rarely spreads."),
        DiagnosisClass(code="bkl", name="Benign keratosis-like lesion", group="benign",
                       description="Seborrhoeic keratosis, solar lentigo or lichen-planus-like keratosis."),
        DiagnosisClass(code="df", name="Dermatofibroma", group="benign",
                       description="A common benign fibrous nodule."),
        DiagnosisClass(code="mel", name="Melanoma", group="malignant",
                       description="A malignant tumour of melanocytes; the deadliest common skin cancer."),
        DiagnosisClass(code="nv", name="Melanocytic nevus", group="benign",
                       description="A common mole."),
        DiagnosisClass(code="vasc", name="Vascular lesion", group="benign",
                       description="Angioma, angiokeratoma, pyogenic granuloma or haemorrhage."),
    ],
)


def load_taxonomy(spec: str | Path | None) -> Taxonomy:
    """``None`` or ``"ham10000"`` gives the built-in taxonomy; anything else is a YAML path."""
    if spec is None or str(spec).lower() == "ham10000":
        return HAM10000
    return Taxonomy.from_yaml(spec)
