"""Out-of-distribution scoring (numpy only): two checks, each with its own threshold.

``MahalanobisOOD``, on the model's pooled embedding: class-conditional Mahalanobis distance with a
shared covariance (Lee et al., NeurIPS 2018), in a PCA subspace of the training embeddings, plus the
squared norm of the residual outside that subspace (as in ViM, Wang et al. CVPR 2022): images unlike
the training data are far from every class centre or have energy in directions the training data
never used. Higher = more unusual.

``ColourOOD``, on the photograph's colour statistics (``colour_features``): dermoscopic images are
colour photographs of skin, red over green over blue nearly everywhere. A grey-scale scan, a green
logo or a blue-tinted photo can land near some class centre in embedding space, but not here: a
Gaussian fitted on the training images' features, scored by Mahalanobis distance.
"""
from __future__ import annotations

import numpy as np

from .preprocess import shrink_within
from .quality import chroma

COLOUR_THUMBNAIL = 64  # colour statistics need few pixels; a thumbnail bounds the cost for large uploads
COLOUR_FEATURES = ("mean chroma", "mean red - green", "mean green - blue", "mean brightness",
                   "brightness spread", "chroma spread", "log share green > red", "log share blue > red")


def colour_features(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (8,) float64 colour statistics (COLOUR_FEATURES) of its thumbnail."""
    f = shrink_within(rgb, COLOUR_THUMBNAIL).reshape(-1, 3).astype(np.float32)
    r, g, b = f[:, 0], f[:, 1], f[:, 2]
    c = chroma(f)
    value = f.mean(axis=1)
    # shares are bounded and pile up at 0: their log (with a floor) is closer to Gaussian
    return np.array([c.mean(), (r - g).mean(), (g - b).mean(), value.mean(), value.std(), c.std(),
                     np.log((g > r).mean() + 0.01), np.log((b > r).mean() + 0.01)], dtype=np.float64)


class ColourOOD:
    """Mahalanobis distance of ``colour_features`` from the training images' (higher = less like them)."""

    def __init__(self, mean: np.ndarray, precision: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.precision = np.asarray(precision, dtype=np.float64)

    @classmethod
    def fit(cls, features: np.ndarray, shrinkage: float = 1e-3) -> "ColourOOD":
        """Fit on (N, 8) training features."""
        x = np.asarray(features, dtype=np.float64)
        mean = x.mean(axis=0)
        cov = np.cov((x - mean).T) if len(x) > 1 else np.eye(x.shape[1])
        cov += shrinkage * np.trace(cov) / len(mean) * np.eye(len(mean)) + 1e-9 * np.eye(len(mean))
        return cls(mean, np.linalg.inv(cov))

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, 8) features → (N,) squared Mahalanobis distances."""
        d = np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean
        return np.einsum("ni,ij,nj->n", d, self.precision, d)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for the bundle's ``arrays.npz``."""
        return {"ood_colour_mean": self.mean.astype(np.float64), "ood_colour_precision": self.precision.astype(np.float64)}

    @classmethod
    def from_arrays(cls, arrays) -> "ColourOOD | None":
        """The check stored in a bundle's arrays, or None for bundles from before it existed."""
        if "ood_colour_mean" not in arrays:
            return None
        return cls(arrays["ood_colour_mean"], arrays["ood_colour_precision"])


class MahalanobisOOD:
    """Fit on training embeddings; ``score`` gives a distance, higher is more out-of-distribution."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, class_means: np.ndarray,
                 precision: np.ndarray, residual_scale: float):
        self.mean = mean.astype(np.float32)
        self.components = components.astype(np.float32)  # (k, D), orthonormal rows
        self.class_means = class_means.astype(np.float32)  # (C, k)
        self.precision = precision.astype(np.float32)  # (k, k)
        self.residual_scale = float(residual_scale)

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray, n_components: int = 128, shrinkage: float = 1e-3) -> "MahalanobisOOD":
        """Fit on (N, D) training embeddings with integer class labels."""
        x = np.asarray(embeddings, dtype=np.float64)
        labels = np.asarray(labels, dtype=int)
        mean = x.mean(axis=0)
        xc = x - mean
        k = int(min(n_components, x.shape[1], max(1, x.shape[0] - 1)))
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        comps = vt[:k]
        z = xc @ comps.T
        classes = np.unique(labels)
        class_means = np.zeros((labels.max() + 1, k))
        resid = np.empty_like(z)
        for c in classes:
            m = labels == c
            class_means[c] = z[m].mean(axis=0)
            resid[m] = z[m] - class_means[c]
        # classes absent from training get a mean far away, so they never become the nearest centre
        for c in set(range(labels.max() + 1)) - set(classes.tolist()):
            class_means[c] = 1e6
        cov = resid.T @ resid / max(1, len(z) - len(classes))
        cov += shrinkage * np.trace(cov) / k * np.eye(k)
        precision = np.linalg.inv(cov)
        res_norm = np.square(xc - z @ comps).sum(axis=1)
        # scale the residual so it weighs like the Mahalanobis part on training data
        maha = cls._maha(z, class_means, precision)
        residual_scale = float(np.median(maha) / max(np.median(res_norm), 1e-12))
        return cls(mean, comps, class_means, precision, residual_scale)

    @staticmethod
    def _maha(z: np.ndarray, class_means: np.ndarray, precision: np.ndarray) -> np.ndarray:
        d = z[:, None, :] - class_means[None, :, :]  # (N, C, k)
        # d·P·d as a matrix product: np.einsum of three operands runs an unblocked loop (0.19 vs 0.01 ms per image)
        return ((d @ precision) * d).sum(axis=-1).min(axis=1)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) embeddings → (N,) OOD scores (higher = less like the training data)."""
        xc = np.asarray(embeddings, dtype=np.float32) - self.mean
        z = xc @ self.components.T
        maha = self._maha(z, self.class_means, self.precision)
        res = np.square(xc - z @ self.components).sum(axis=1)
        return (maha + self.residual_scale * res).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to store in the bundle's ``arrays.npz`` (keys prefixed ``ood_``)."""
        return {
            "ood_mean": self.mean, "ood_components": self.components, "ood_class_means": self.class_means,
            "ood_precision": self.precision, "ood_residual_scale": np.array([self.residual_scale], np.float32),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "MahalanobisOOD":
        return cls(arrays["ood_mean"], arrays["ood_components"], arrays["ood_class_means"],
                   arrays["ood_precision"], float(arrays["ood_residual_scale"][0]))
