"""The torch-free commands around a bundle: ``predict`` and ``info`` (the Screener from the command line),
``calibrate`` (refit temperature and referral thresholds), ``refit-ood`` (refit the "cannot assess" checks) and
``quantize`` (an int8 copy of the classifier, refitted on its validation split)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import DISCLAIMER
from .errors import DermscreenError, printable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".dcm", ".dicom"}
_TIER_STYLE = {"high": "bold white on red3", "moderate": "bold black on dark_orange",
               "low": "bold white on green4", "cannot_assess": "bold white on grey42"}

# str, not Path: a bare name picks a shipped model ("default-int8"), and pathlib would turn "./default-int8" into one
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Bundle folder or zip, or the name of a model "
                                                "installed with dermscreen: default, default-int8 (default: "
                                                "$DERMSCREEN_MODEL, then the installed default model).")]
# options calibrate and quantize share (both refit a bundle's thresholds on labelled images)
ImagesOpt = Annotated[Optional[Path], typer.Option(help="Images folder (default: as for dermscreen evaluate).")]
SensitivityOpt = Annotated[float, typer.Option(help="Target sensitivity of the sensitivity-first operating point, at "
                                                    "least 0.5 and below 1.")]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Images per model call.")]


# what predict itself writes (--heatmap): never screened as a lesion when a later run walks the same folder
GENERATED_SUFFIXES = (".heatmap.png",)


def iter_images(paths: list[Path], skip: tuple[Path, ...] = ()) -> Iterator[tuple[Path, str]]:
    """(file, name to show) for files given directly and for image files (by suffix, sorted, recursive) inside
    given folders, leaving out heatmaps an earlier run wrote and the folders in ``skip`` (this run's report
    folders) where they lie inside a given folder. The name is the file's name, or its path from the given
    folder's name on ("photos/a/x.jpg"): two folders' x.jpg are told apart, and no report names the folders above
    it (a user's home, a patient-named folder)."""
    skip = tuple(s.resolve() for s in skip)
    for path in paths:
        if not path.is_dir():
            yield path, path.name
            continue
        top = path.resolve()
        inside = tuple(folder for folder in skip if top in folder.parents)  # never the screened folder itself

        def wanted(p: Path) -> bool:
            if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES or p.name.endswith(GENERATED_SUFFIXES):
                return False
            return not any(p.resolve().is_relative_to(folder) for folder in inside)

        for found in sorted(p for p in _walk(path) if wanted(p)):
            yield found, str(Path(top.name or str(top)) / found.relative_to(path))


def _walk(folder: Path) -> Iterator[Path]:
    """Every file under ``folder``, following linked folders (a patient's folder is often a link), each real
    folder once, so a link back up cannot loop."""
    seen: set[str] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield from (Path(root) / name for name in names)


class _Outputs:
    """Writes the per-image files the user asked for; called in whichever process analysed the image."""

    def __init__(self, html_dir: Path | None, fhir_dir: Path | None, heatmap_dir: Path | None,
                 names: dict[str, str] | None = None):
        self.dirs = {"html": html_dir, "fhir": fhir_dir, "heatmap": heatmap_dir}
        self.names = names or {}  # file → the name its report shows (iter_images)
        for kind, d in self.dirs.items():
            if d is None:
                continue
            if d.exists() and not d.is_dir():
                raise DermscreenError(f"--{kind} {d}: this is a file, not a folder; give a folder for the reports.")
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DermscreenError(f"--{kind} {d}: cannot create this folder ({exc.strerror or exc}); "
                                      "give a folder you can write to.") from None

    def __bool__(self) -> bool:
        return any(d is not None for d in self.dirs.values())

    def planned(self, stems: list[str]) -> list[Path]:
        """Every file this run may write for images of these stems."""
        suffix = {"html": ".html", "fhir": ".fhir.json", "heatmap": ".heatmap.png"}
        return [d / f"{stem}{suffix[kind]}" for kind, d in self.dirs.items() if d is not None for stem in stems]

    def __call__(self, path: Path, stem: str, result, rgb) -> list[Path]:
        """Write the HTML / FHIR / heatmap files for one result under ``stem``; returns the paths written."""
        from .report import to_fhir, to_html
        from .explain import png_bytes

        written = []
        if self.dirs["html"]:
            out = self.dirs["html"] / f"{stem}.html"
            name = printable(self.names.get(str(path), path.name))
            out.write_text(to_html(result, rgb, title=f"Skin lesion screening: {name}"), encoding="utf-8")
            written.append(out)
        if self.dirs["fhir"]:
            out = self.dirs["fhir"] / f"{stem}.fhir.json"
            out.write_text(json.dumps(to_fhir(result), indent=2), encoding="utf-8")
            written.append(out)
        if self.dirs["heatmap"] and result.heatmaps is not None:
            out = self.dirs["heatmap"] / f"{stem}.heatmap.png"
            out.write_bytes(png_bytes(result.heatmaps.blended(rgb, "malignant"), compress_level=6))
            written.append(out)
        return written


def _row(table: Table, name: str, result: dict) -> None:
    """One human-readable table row from a result's JSON."""
    risk = result["risk"]
    top = result["top_diagnoses"][0] if result.get("top_diagnoses") else None
    notes = "; ".join(list(result.get("reasons") or []) + list((result.get("quality") or {}).get("warnings") or []))
    score = result.get("malignancy_score")
    # the name as found (two folders may hold an x.jpg); text, not rich markup: "lesion[left].jpg" prints as it is
    table.add_row(escape(printable(name)), f"[{_TIER_STYLE[risk['tier']]}] {escape(risk['label'])} [/]",
                  "—" if score is None else f"{score:.0f}",
                  escape(f"{top['name']} ({100 * top['probability']:.0f} %)") if top else "—", escape(notes))


def _show(outcome, table: Table, as_json: bool, names: dict[str, str]) -> None:
    """A result as a JSON line (printed now, with the reports written for it) or as a row of the table (printed
    at the end)."""
    if as_json:
        reports = {"reports": [str(p) for p in outcome.written]} if outcome.written else {}
        print(json.dumps({"file": printable(outcome.path), **reports, **outcome.result}), flush=True)
    else:
        _row(table, names.get(str(outcome.path), outcome.path.name), outcome.result)


def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.", exists=True)],
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per image (JSON lines).")] = False,
    html_dir: Annotated[Optional[Path], typer.Option("--html", help="Write an HTML report per image here.")] = None,
    fhir_dir: Annotated[Optional[Path], typer.Option("--fhir", help="Write a FHIR R4 DiagnosticReport per image here.")] = None,
    heatmap_dir: Annotated[Optional[Path], typer.Option("--heatmap", help="Write the heatmap over each image here (PNG).")] = None,
    age: Annotated[Optional[float], typer.Option(help="Patient age in years (used by models that take metadata).")] = None,
    sex: Annotated[Optional[str], typer.Option(help="male | female | unknown.")] = None,
    site: Annotated[Optional[str], typer.Option(help="Anatomical site, e.g. back, face, lower extremity.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help=(
        "Average over 4 flipped copies (4x slower). The referral thresholds were set without it; for the default "
        "model it was no better on validation."))] = False,
    lesion: Annotated[bool, typer.Option("--lesion/--no-lesion", help=(
        "Outline the lesion (smart crop of a small lesion, ABCD, outline). --no-lesion skips it, ~1.3x as "
        "fast for bulk screening of ordinary dermoscopic photos; a lesion photographed small in a wide frame "
        "is then classified from the whole frame, which is less accurate."))] = True,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime threads per analysis (default: all cores; "
                                                   "1 per worker when several workers run).", min=1)] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Processes analysing many files, this one included (default: one per core).", min=1)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace reports an earlier run left in the --html/--fhir/--heatmap folders.")] = False,
) -> None:
    """Screen dermoscopic images: a risk tier, malignancy score and top diagnoses per image."""
    from .screening import Screener, ScreenerSettings

    from .batch import default_workers

    err = Console(stderr=True)
    report_dirs = tuple(d for d in (html_dir, fhir_dir, heatmap_dir) if d is not None)
    found = list(iter_images(images, skip=report_dirs))
    files, names = [f for f, _ in found], {str(f): name for f, name in found}
    if not files:
        err.print("[red]error:[/] no image files found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ").")
        raise typer.Exit(2)
    workers = workers or default_workers()
    parallel = workers > 1 and len(files) > workers
    settings = ScreenerSettings(tta=tta, threads=threads if threads or not parallel else 1, smart_crop=lesion,
                                abcd=lesion)
    from .batch import unique_stems

    try:
        outputs = _Outputs(html_dir, fhir_dir, heatmap_dir, names)  # before the model loads: a bad folder fails now
        clash = [p for p in outputs.planned(unique_stems(files)) if p.exists()] if not overwrite else []
        if clash:  # another image's (another patient's) report must not be replaced without a word
            raise DermscreenError(f"{len(clash)} report file(s) of an earlier run would be replaced (e.g. "
                                  f"{clash[0]}): give an empty folder, or --overwrite to replace them.")
        # loaded here even when workers will load their own copy: a missing or tampered bundle and bad
        # age/sex/site fail once, with one message, before any worker starts
        screener = Screener(model, settings)
        screener._metadata_vector(age, sex, site)
    except DermscreenError as exc:
        err.print("[red]error:[/]", escape(str(exc)), highlight=False)
        raise typer.Exit(2)
    if screener.metadata_spec is None and (age is not None or sex or site):
        err.print("[yellow]note:[/] this model does not use age, sex or site; they were checked, not used, and are "
                  "not written to any output.")
    options = dict(age=age, sex=sex, site=site, tta=tta, heatmap=bool(html_dir or heatmap_dir))
    failures = _predict_files(files, model, settings, screener, workers if parallel else 1,
                              outputs if outputs else None, as_json, options, err, names)
    if not as_json:
        err.print(f"[dim]{DISCLAIMER}[/]")
    if failures:
        err.print(f"[red]{failures} of {len(files)} file(s) could not be analysed.[/]")
        raise typer.Exit(1)


def _predict_files(files: list[Path], model, settings, screener, workers: int, writer, as_json: bool,
                   options: dict, err: Console, names: dict[str, str]) -> int:
    """Analyse every file, print results in order as they come, report bad files and go on; the failure count."""
    from rich.progress import Progress

    from .batch import screen_files

    table = Table(title="dermscreen — screening aid, not a diagnosis")
    for col in ("image", "risk", "score /100", "top diagnosis", "notes"):
        table.add_column(col, overflow="fold")
    failures = 0
    tiers_seen: list[str] = []
    # redirect_stdout off: rich would otherwise send the --json lines printed meanwhile to its console (stderr)
    with Progress(console=err, transient=True, disable=len(files) < 2, redirect_stdout=False) as progress:
        task = progress.add_task("Screening", total=len(files))
        outcomes = screen_files(files, model, settings, workers=workers, writer=writer, screener=screener, **options)
        for outcome in outcomes:
            if outcome.fatal:
                outcomes.close()
                if outcome.result is not None:  # analysed, but its report could not be written: show it
                    _show(outcome, table, as_json, names)
                    if not as_json and table.row_count:
                        Console().print(table)
                        _print_recommendations(tiers_seen + [outcome.result["risk"]["tier"]])
                progress.console.print("[red]error:[/]", escape(outcome.error), highlight=False)
                raise typer.Exit(2)
            if outcome.error is not None:
                failures += 1
                # the message names the file itself (Screener errors start "name: "); the path says where it is
                message = outcome.error.removeprefix(f"{outcome.path.name}: ")
                progress.console.print(f"[red]{escape(printable(outcome.path))}:[/]", escape(message), highlight=False)
                if as_json:
                    print(json.dumps({"file": printable(outcome.path),
                                      "error": {"type": outcome.error_type, "message": outcome.error}}), flush=True)
            else:
                _show(outcome, table, as_json, names)
                tiers_seen.append(outcome.result["risk"]["tier"])
                heat = outcome.result.get("heatmap") or {}
                if writer is not None and writer.dirs["heatmap"] and heat and not heat.get("malignant_evidence", True):
                    progress.console.print(f"[dim]{escape(printable(outcome.path))}: no area of the image raised the "
                                           "malignancy score, so its heatmap shows the image alone.[/]")
                if writer is not None and writer.dirs["heatmap"] and outcome.result["risk"]["tier"] == "cannot_assess":
                    # said, so a folder of heatmaps with gaps is not mistaken for files lost
                    progress.console.print(f"[dim]{escape(printable(outcome.path))}: no heatmap written: the image was "
                                           "not assessed (see its reasons).[/]")
            progress.advance(task)
    if not as_json and table.row_count:
        Console().print(table)
        _print_recommendations(tiers_seen)
    return failures


def _print_recommendations(tiers: list[str]) -> None:
    """What each risk tier in the table recommends, once per tier (the table has no room for it)."""
    from .screening import TIERS

    console = Console()
    for tier in [t for t in TIERS if t in tiers]:
        console.print(f"[{_TIER_STYLE[tier]}] {TIERS[tier]['label']} [/] {escape(TIERS[tier]['recommendation'])}",
                      highlight=False)


def info(
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full model card as JSON.")] = False,
) -> None:
    """Show the model card of a bundle: identity, classes, operating points, metrics, licence, intended use."""
    from .screening import Screener

    try:
        card = Screener(model).model_card()
    except DermscreenError as exc:
        Console(stderr=True).print("[red]error:[/]", escape(str(exc)), highlight=False)
        raise typer.Exit(2)
    if as_json:
        print(json.dumps(card, indent=2, default=str))
        return
    _print_card(card, Console())


def _print_card(card: dict, console: Console) -> None:
    """Human-readable model card summary."""
    # everything printed here comes from the bundle's manifest: text, never rich markup (escape)
    console.print(f"[bold]{escape(card['name'])}[/] " + escape(f"{card['version']}  ({card['backbone']}, "
                                                            f"{card['image_size']} px)"), highlight=False)
    console.print(escape(f"sha256 {card['sha256']}  created {card['created']}"), highlight=False)
    console.print(escape("classes: " + ", ".join(f"{c['code']} ({c['group']})" for c in card["classes"])),
                  highlight=False)
    fitted_on = (card.get("calibration") or {}).get("split", "val")
    ops = Table(title="Operating points (validation)" if fitted_on == "val" else
                f"Operating points ({fitted_on}; measured on those images)")
    for col in ("name", "threshold P(malignant)", "sensitivity", "specificity"):
        ops.add_column(col)
    for op in card["operating_points"]:
        ops.add_row(escape(op["name"]), f"{op['threshold']:.3f}", f"{op['sensitivity']:.3f}",
                    f"{op['specificity']:.3f}")
    console.print(ops)
    ood = card["ood"]
    if ood is None:
        console.print(f"temperature {card['temperature']:.3f}; no OOD statistics")
    else:
        colour = "" if ood.get("colour_threshold") is None else (
            f"; colour check {ood['colour_threshold']:.3g} (keeps {ood['colour_validation_kept']:.1%}; both "
            f"{ood['validation_kept_both']:.1%})")
        console.print(f"temperature {card['temperature']:.3f}; OOD threshold {ood['threshold']:.3g} "
                      f"(keeps {ood['validation_kept']:.1%} of validation){colour}")
    refits = (card.get("training") or {}).get("recalibrations") or []
    if refits:  # the thresholds and temperature are no longer the validation split's: say whose they are
        last = refits[-1]
        console.print(f"[bold]recalibrated[/] {last['date'][:10]} on {last['images']} images "
                      f"({last['malignant']} malignant) of {escape(Path(str(last['labels']['source'])).name)} "
                      f"(dermscreen calibrate; target sensitivity {last['target_sensitivity']:g}); the metrics below "
                      "are the original validation's", highlight=False)
    scalar = {k: v for k, v in card["metrics"].items() if isinstance(v, (int, float)) and k != "images"}
    if scalar:
        split = card["metrics"].get("split") or "validation"
        split = {"val": "validation"}.get(split, split)
        count = card["metrics"].get("images")
        console.print(f"{split} metrics" + (f" ({count:.0f} images)" if count else "") + ": "
                      + ", ".join(f"{k} {v:.3f}" for k, v in sorted(scalar.items())))
    held = card.get("held_out")
    if held:  # measured after the bundle was sealed, recorded beside it for this sha256
        def ci(entry: dict) -> str:
            low_high = entry.get("ci95")
            return f"{entry['value']:.3f}" + (f" ({low_high[0]:.3f}-{low_high[1]:.3f})" if low_high else "")

        shown = ("balanced_accuracy", "malignant_auc", "melanoma_auc", "ece")
        console.print(f"held-out {held['split'] or 'test'} results ({held['images']} images, "
                      f"{str(held['evaluated'])[:10]}): " + ", ".join(
                          f"{k} {ci(held['metrics'][k])}" for k in shown if held["metrics"].get(k)), highlight=False)
        for name, op in held["operating_points"].items():
            console.print(f"  {name} (P(malignant) >= {op['threshold']:.3f}): sensitivity {ci(op['sensitivity'])}, "
                          f"specificity {ci(op['specificity'])}", highlight=False)
    shipped = _shipped_sha256s().get(card["sha256"])
    if shipped == "default":
        console.print("  per class, subgroups and the targets met or missed: the model card "
                      "(docs/model-card.md in the source repository)")
    elif shipped:  # the card's tables are the float model's; its own section compares the two
        console.print(f"  how {shipped} compares with the float model it was made from: the model card's section "
                      "\"The int8 copy\" (docs/model-card.md in the source repository)", highlight=False)
    elif not held:  # docs/model-card.md describes the shipped model, not this one
        console.print("  held-out test results: dermscreen evaluate --split test (on its training labels), "
                      "or on other labelled cases", highlight=False)
    console.print(f"uses patient metadata: {'yes' if card['uses_metadata'] else 'no'}")
    console.print(f"lesion outline: {_segmenter_line(card.get('segmenter'))}")
    for label, key in (("intended use", "intended_use"), ("training data", "training_data"), ("licence", "licence")):
        if card.get(key):
            console.print(f"[bold]{label}:[/]", escape(str(card[key])), highlight=False)
    for item in card.get("limitations") or []:
        console.print("  •", escape(str(item)), highlight=False)
    console.print(f"[dim]{escape(card['disclaimer'])}[/]")


def _shipped_sha256s() -> dict[str, str]:
    """sha256 → name of each model installed with the package (docs/model-card.md describes them all)."""
    from .bundle import MANIFEST, SHIPPED_MODELS_DIR, sha256_bytes, shipped_models

    found = {}
    for name in shipped_models():
        try:
            found[sha256_bytes((SHIPPED_MODELS_DIR / name / MANIFEST).read_bytes())] = name
        except OSError:
            pass
    return found


def _segmenter_line(spec: dict | None) -> str:
    """How this bundle outlines lesions, with the segmenter's held-out Dice/IoU when it has one."""
    if not spec:
        return "classical colour thresholding (this bundle has no segmenter.onnx)"
    v = spec.get("validation") or {}
    quality = ""
    if "test_dice" in v:
        quality = (f", test Dice {v['test_dice']:.3f} ({v.get('test_dice_ci_low', float('nan')):.3f}-"
                   f"{v.get('test_dice_ci_high', float('nan')):.3f}), IoU {v.get('test_iou', float('nan')):.3f}"
                   + (f" ({v['test_iou_ci_low']:.3f}-{v['test_iou_ci_high']:.3f})" if "test_iou_ci_low" in v else "")
                   + f" on {v.get('test_n', 0):.0f} held-out images")
    return f"segmenter.onnx ({spec.get('backbone')}, {spec.get('image_size')} px{quality})"


def calibrate(
    labels: Annotated[Path, typer.Option(help="Labelled CSV of new cases the model did not train on (HAM10000 "
                                              "metadata, ISIC ground truth or plain image,dx). The model's own "
                                              "training images are refused, in any file, where its training "
                                              "labels are found.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New, empty folder for the recalibrated bundle.")],
    model: ModelOpt = None,
    images: ImagesOpt = None,
    split_file: Annotated[Optional[Path], typer.Option(help="image_id,split CSV; use only the --split images.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Which split to use (as for dermscreen evaluate); the "
                                                     "model's train split is refused.")] = None,
    sensitivity: SensitivityOpt = 0.95,
    batch_size: BatchSizeOpt = 32,
) -> None:
    """Fit a bundle's temperature and referral thresholds again on your own labelled images (new bundle)."""
    from rich.progress import Progress

    from .recalibrate import recalibrate

    err = Console(stderr=True)
    try:
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("Predicting", total=None)
            result = recalibrate(model, labels, out, images=images, split_file=split_file, split=split,
                                 target_sensitivity=sensitivity, batch_size=batch_size,
                                 on_start=lambda n: bar.update(task, total=n),
                                 on_batch=lambda n: bar.advance(task, n))
    except DermscreenError as exc:
        err.print("[red]error:[/]", escape(str(exc)), highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    for warning in result.warnings:
        err.print("[yellow]warning:[/]", escape(warning), highlight=False, soft_wrap=True)
    r = result.record
    table = Table(title=f"Recalibrated on {r['images']} images ({r['malignant']} malignant)")
    for col in ("", "before", "after"):
        table.add_column(col)
    table.add_row("temperature", f"{r['temperature']['before']:.3f}", f"{r['temperature']['after']:.3f}")
    table.add_row("ECE on these images", f"{r['ece']['before']:.3f}", f"{r['ece']['after']:.3f}")
    points = r["operating_points"]
    for name in dict.fromkeys([*points["before"], *points["after"]]):
        cells = [f"P(malignant) ≥ {p['threshold']:.3f}: sensitivity {p['sensitivity']:.3f}, specificity "
                 f"{p['specificity']:.3f}" if (p := points[when].get(name)) else "—" for when in ("before", "after")]
        table.add_row(name, *cells)
    Console().print(table)
    Console().print(f"Bundle: {escape(str(result.out))} (the sensitivity and specificity above are measured on the "
                    "images the points were chosen on: check them on other held-out cases with dermscreen "
                    "evaluate).", highlight=False, soft_wrap=True)
    Console().print(f"[dim]{DISCLAIMER}[/]")


def _bar_per_part(bar):
    """A progress(part, done, total) callback that shows one bar per named part of a long job."""
    tasks: dict[str, int] = {}

    def progress(part: str, done: int, total: int) -> None:
        if part not in tasks:
            tasks[part] = bar.add_task(part, total=total)
        bar.update(tasks[part], completed=done)
    return progress


def refit_ood(
    bundle: Annotated[str, typer.Option("--bundle", "-b", help="The bundle whose OOD checks to refit (not modified); "
                                        "a folder, zip or installed model's name.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled CSV the run was trained on (HAM10000 metadata, ...).")],
    split: Annotated[Path, typer.Option("--split", help="The training run's split.csv (image_id, split).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the new bundle.")],
    extra: Annotated[Optional[list[Path]], typer.Option(
        "--extra", help="More labelled CSVs (other copies of the same lesions): their images of training lesions "
        "join the fit, those of validation lesions the thresholds; test lesions are never used.")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Images folder of --data (default: "
                                                   "<CSV folder>/images).")] = None,
    keep: Annotated[float, typer.Option(help="Share of validation images the embedding check keeps.")] = 0.97,
    colour_keep: Annotated[float, typer.Option(help="Share of validation images the colour check keeps.")] = 0.99,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime threads (default: all cores).", min=1)] = None,
) -> None:
    """Fit the colour check and re-choose both "cannot assess" thresholds of a bundle on its validation images."""
    from rich.progress import Progress

    from .bundle import resolve_bundle_path
    from .ood_fit import refit_ood as run

    try:
        with Progress(transient=True) as bar:
            folder = run(resolve_bundle_path(bundle), data, split, out, extra=extra or [], images=images, keep=keep,
                         colour_keep=colour_keep, threads=threads, progress=_bar_per_part(bar))
    except DermscreenError as exc:
        Console(stderr=True).print("[red]error:[/]", escape(str(exc)), highlight=False)
        raise typer.Exit(2)
    from .bundle import Bundle

    ood = Bundle.load(folder).manifest.ood
    typer.echo(f"Embedding check: threshold {ood.threshold:.1f} keeps {100 * ood.validation_kept:.1f} % of validation "
               f"images; colour check: threshold {ood.colour_threshold:.1f} keeps {100 * ood.colour_validation_kept:.1f} "
               f"%; both: {100 * ood.validation_kept_both:.1f} %.")
    typer.echo(f"Bundle: {folder}")


def quantize(
    labels: Annotated[Path, typer.Option(help="The labelled CSV the model was trained on (checked by sha256): its "
                                              "split is remade from it.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New, empty folder for the int8 bundle.")],
    model: ModelOpt = None,
    images: ImagesOpt = None,
    calibration_images: Annotated[int, typer.Option(min=10, help="Training images whose activation ranges set the "
                                                                 "int8 scales.")] = 300,
    sensitivity: SensitivityOpt = 0.95,
    batch_size: BatchSizeOpt = 32,
) -> None:
    """Write an 8-bit integer copy of a bundle (its classifier ~2x faster on CPUs with VNNI), refitted on validation."""
    from rich.progress import Progress

    from .quantize import quantize_bundle

    err = Console(stderr=True)
    try:
        with Progress(console=err, transient=True) as bar:
            result = quantize_bundle(model, labels, out, images=images, calibration_images=calibration_images,
                                     target_sensitivity=sensitivity, batch_size=batch_size,
                                     progress=_bar_per_part(bar))
    except DermscreenError as exc:
        err.print("[red]error:[/]", escape(str(exc)), highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    v = result.record["validation"]
    table = Table(title=f"int8 vs float on {v['images']} validation images")
    for col in ("", "float", "int8"):
        table.add_column(col)
    for key, name in (("balanced_accuracy", "balanced accuracy"), ("malignant_auc", "malignant AUC"),
                      ("macro_auc", "macro AUC"), ("ece_after", "ECE (calibrated)")):
        cells = [f"{x:.4f}" if isinstance(x := v[kind].get(key), (int, float)) else "—" for kind in ("float", "int8")]
        table.add_row(name, *cells)
    Console().print(table)
    refer = v["referral_agreement"]
    Console().print(f"Top diagnosis agreed on {100 * v['top1_agreement']:.1f} % of them"
                    + (f", the referral decision on {100 * refer:.1f} %" if refer is not None else "")
                    + f". Bundle: {escape(str(result.out))} (check it on held-out cases with dermscreen evaluate, "
                    "and its speed with benchmarks/bench_screening.py).", highlight=False, soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the dermscreen command")
