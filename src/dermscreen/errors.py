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

    http_status = 422


class ConfigError(DermscreenError, ValueError):
    """A training or evaluation configuration is invalid."""


# ---- image errors: each maps to one HTTP status, so every front end answers the same way ----------


class UnsupportedImageError(ImageError):
    """The bytes are not an image format dermscreen reads (HTTP 415)."""

    http_status = 415


class CorruptImageError(ImageError):
    """The file looks like a supported format but is truncated or garbled (HTTP 422)."""

    http_status = 422


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed; raised before its pixels are decoded (HTTP 413)."""

    http_status = 413


class ImageTooSmallError(ImageError):
    """The image is too small to analyse (HTTP 422)."""

    http_status = 422


class InputError(DermscreenError, ValueError):
    """A request parameter other than the image (age, sex, site, an option) is invalid (HTTP 422)."""

    http_status = 422


def printable(path) -> str:
    """A path as text that can be printed or written anywhere, in messages and reports: bytes that are not UTF-8
    (a file named on another system) become U+FFFD instead of making the output fail."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
