"""Typed errors. Each carries a sentence a user can act on; front ends show str(error)."""


class DermscreenError(Exception):
    """Base class: every error dermscreen raises on purpose derives from it."""


class ManifestError(DermscreenError, ValueError):
    """A labelled CSV (manifest) is malformed; the message names the file and row."""


class TaxonomyError(DermscreenError, ValueError):
    """A taxonomy file or code is invalid."""


class BundleError(DermscreenError):
    """A model bundle is missing, incomplete, or fails its integrity check."""


class ImageError(DermscreenError, ValueError):
    """An image could not be read or is not acceptable for analysis."""


class ConfigError(DermscreenError, ValueError):
    """A training or evaluation configuration is invalid."""
