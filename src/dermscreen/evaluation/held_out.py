"""Held-out test results that travel with a shipped model: a compact summary of ``dermscreen evaluate``'s metrics.json.

A bundle's manifest carries its validation metrics, the split its checkpoint, temperature and thresholds were
chosen on. Its test results are measured after the bundle is sealed (the manifest's sha256 is the model's
identity), so they live beside it, in ``models/held-out.json``, keyed by that sha256: the model card (API, info)
shows them for exactly that bundle and for no other.

    python -m dermscreen.evaluation.held_out runs/x/test/metrics.json [--into src/dermscreen/models/held-out.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELD_OUT_FILE = Path(__file__).resolve().parents[1] / "models" / "held-out.json"


def summarise(metrics: dict[str, Any]) -> dict[str, Any]:
    """The summary of one evaluation's metrics.json: what was scored, headline metrics and operating points."""
    overall, data = metrics["overall"], metrics["data"]
    split = data.get("split") or {}
    selection = data.get("selection") or ""
    if data.get("source"):  # the labels' file name, not the folder of the machine that evaluated
        selection = selection.replace(str(data["source"]), Path(str(data["source"])).name)

    def point(entry: dict | None) -> dict | None:
        return None if not entry else {"value": entry["value"], "ci95": entry.get("ci95")}

    return {
        "evaluated": metrics["created"], "dermscreen_version": metrics["dermscreen_version"],
        "selection": selection, "split": split.get("split"), "images": overall["n"],
        "class_counts": data.get("class_counts"), "tta": bool(metrics.get("settings", {}).get("tta")),
        "bootstrap": {k: metrics["bootstrap"][k] for k in ("resamples", "unit") if k in metrics["bootstrap"]},
        "metrics": {name: point(entry) for name, entry in overall["headline"].items()},
        "operating_points": {name: {"threshold": op["threshold"], "sensitivity": point(op.get("sensitivity")),
                                    "specificity": point(op.get("specificity"))}
                             for name, op in overall["operating_points"].items()},
        "warnings": metrics.get("warnings", []),
    }


def held_out_for(sha256: str, path: Path = HELD_OUT_FILE) -> dict[str, Any] | None:
    """The held-out summary recorded for the bundle with this sha256, or None."""
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = known.get(sha256) if isinstance(known, dict) else None
    return entry if isinstance(entry, dict) else None


def referral_sentence(held: dict[str, Any] | None) -> str | None:
    """How the model did on its held-out images, in a referrer's words (the web page says the same), or None."""
    referral = ((held or {}).get("operating_points") or {}).get("sensitivity_first") or {}
    sens, spec = referral.get("sensitivity"), referral.get("specificity")
    if not sens or not spec:
        return None
    ci = f" (95 % CI {100 * sens['ci95'][0]:.0f}–{100 * sens['ci95'][1]:.0f} %)" if sens.get("ci95") else ""
    return (f"On {held['images']} held-out test images, its referral threshold flagged {100 * sens['value']:.1f} %"
            f"{ci} of malignant lesions and left {100 * spec['value']:.1f} % of benign ones unreferred; it can miss a "
            "skin cancer.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, help="metrics.json of a dermscreen evaluate run on a held-out split")
    parser.add_argument("--into", type=Path, help="add it to this held-out.json (else print it)")
    args = parser.parse_args(argv)
    metrics = json.loads(args.metrics.read_text(encoding="utf-8"))
    if metrics.get("warnings"):
        parser.error("this evaluation has warnings (its images are not all held-out): " + metrics["warnings"][0])
    entry = {metrics["model"]["sha256"]: summarise(metrics)}
    if args.into is None:
        print(json.dumps(entry, indent=1))
        return
    known = json.loads(args.into.read_text(encoding="utf-8")) if args.into.is_file() else {}
    args.into.write_text(json.dumps({**known, **entry}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
