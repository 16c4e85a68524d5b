"""Patient metadata (age, sex, anatomical site) as a fixed-length float vector.

The same encoding is used in training and at inference, and its parameters (the list of sites)
are stored in the bundle manifest, so a model that fuses metadata is fed exactly what it learned.
Missing values are encoded explicitly (an "unknown" flag), never guessed.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel

# Every spelling of sex dermscreen accepts (CSV columns, --sex, the API), case and spaces ignored
SEX_SPELLINGS = {"male": "male", "m": "male", "female": "female", "f": "female", "unknown": "unknown", "u": "unknown"}


def sex_code(value: object) -> str | None:
    """'male', 'female' or 'unknown' for an accepted spelling; None for anything else."""
    return SEX_SPELLINGS.get(value.strip().lower()) if isinstance(value, str) else None


HAM10000_SITES = [
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
    "lower extremity", "neck", "scalp", "trunk", "upper extremity",
]


class MetadataSpec(BaseModel):
    """How patient metadata is encoded: [age/100, age_missing, male, female, sex_missing, site one-hot..., site_missing]."""

    sites: list[str] = HAM10000_SITES

    @property
    def dim(self) -> int:
        return 2 + 3 + len(self.sites) + 1

    def encode(self, age: float | None = None, sex: str | None = None, site: str | None = None) -> np.ndarray:
        """One patient's metadata as a float32 vector of length ``dim``; unknowns get their flag."""
        v = np.zeros(self.dim, dtype=np.float32)
        if age is None:
            v[1] = 1.0
        else:
            v[0] = float(age) / 100.0
        code = sex_code(sex)
        if code == "male":
            v[2] = 1.0
        elif code == "female":
            v[3] = 1.0
        else:
            v[4] = 1.0
        site_key = (site or "").strip().lower()
        if site_key in self.sites:
            v[5 + self.sites.index(site_key)] = 1.0
        else:
            v[-1] = 1.0
        return v
