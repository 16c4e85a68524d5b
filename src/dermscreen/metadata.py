"""Patient metadata (age, sex, anatomical site) as a fixed-length float vector.

The same encoding is used in training and at inference, and its parameters (the list of sites)
are stored in the bundle manifest, so a model that fuses metadata is fed exactly what it learned.
Missing values are encoded explicitly (an "unknown" flag), never guessed.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel

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
        sex_key = (sex or "").strip().lower()
        if sex_key in ("male", "m"):
            v[2] = 1.0
        elif sex_key in ("female", "f"):
            v[3] = 1.0
        else:
            v[4] = 1.0
        site_key = (site or "").strip().lower()
        if site_key in self.sites:
            v[5 + self.sites.index(site_key)] = 1.0
        else:
            v[-1] = 1.0
        return v
