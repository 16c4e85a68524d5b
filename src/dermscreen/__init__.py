"""dermscreen: a privacy-first screening aid for skin lesions in dermoscopic images.

Outputs are screening aids, not diagnoses. See docs/model-card.md.
"""
import os as _os

# onnxruntime sends telemetry unless told not to, and reads this before it is imported:
# set it at package import so every front end (CLI, API, library use) is covered.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

DISCLAIMER = (
    "dermscreen is a screening aid, not a diagnosis. It can be wrong. "
    "Any lesion that worries the patient or the clinician should be examined by a dermatologist, "
    "whatever this tool says."
)
