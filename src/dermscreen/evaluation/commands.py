"""``dermscreen evaluate``: the command-line face of :func:`dermscreen.evaluation.evaluate.evaluate`.

Imports nothing heavy at module import time (``dermscreen --help`` stays instant); never imports torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def _summary_table(metrics: dict):
    """A short rich table of the headline metrics and operating points."""
    from rich.markup import escape
    from rich.table import Table

    overall = metrics["overall"]
    table = Table(title=escape(f"{metrics['model']['name']} on {overall['n']} images"), title_justify="left")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    table.add_column("95% CI", justify="right", style="dim")

    def add(name: str, entry: dict | None) -> None:
        if entry:
            ci = entry.get("ci95")
            table.add_row(escape(name), f"{entry['value']:.3f}", f"{ci[0]:.3f} - {ci[1]:.3f}" if ci else "")

    for key, entry in overall["headline"].items():
        add(key.replace("_", " "), entry)
    for name, op in overall["operating_points"].items():
        add(f"{name} sensitivity (t={op['threshold']:.3f})", op.get("sensitivity"))
        add(f"{name} specificity", op.get("specificity"))
    return table


def _rich_progress(console):
    """A Progress (evaluate's callback protocol) drawing a rich progress bar on ``console``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TimeRemainingColumn

    from .evaluate import Progress

    class RichEvaluationProgress(Progress):
        def __init__(self) -> None:
            self.bar = RichProgress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                    TimeRemainingColumn(), console=console, transient=False)
            self.task = None

        def phase(self, message: str) -> None:
            console.print(f"[dim]{message}...[/dim]")

        def start_images(self, total: int) -> None:
            self.bar.start()
            self.task = self.bar.add_task("Predicting", total=total)

        def advance(self, n: int) -> None:
            self.bar.advance(self.task, n)
            if self.bar.finished:
                self.bar.stop()

        def close(self) -> None:
            if self.task is not None:
                self.bar.stop()

    return RichEvaluationProgress()


def evaluate(
    labels: Annotated[Path, typer.Option(help="Labelled CSV: HAM10000 metadata, ISIC one-hot ground truth, "
                                              "or plain image,dx.")],
    out: Annotated[Path, typer.Option(help="Folder for predictions.csv, metrics.json, metrics.md, plots and report.html.")],
    model: Annotated[Optional[str], typer.Option(help="Model bundle (folder or zip, or an installed model's name: "
                                                "default, default-int8). Default: $DERMSCREEN_MODEL, "
                                                "else the installed default model.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Images folder. Default: <labels folder>/images for "
                                                        "HAM10000/ISIC CSVs, the CSV's folder for plain ones.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 32,
    tta: Annotated[bool, typer.Option(help="Average the logits over 4 flipped views (4x slower).")] = False,
    split_file: Annotated[Optional[Path], typer.Option(help="image_id,split CSV from a training run; evaluate "
                                                            "only the --split images.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Which split to evaluate: train, val or test (default with "
                                                     "--split-file: test). Without --split-file, the model's own "
                                                     "lesion-grouped split is remade from --labels, which must be "
                                                     "the labels it was trained on (checked against its "
                                                     "manifest).")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the 95% CIs (0: no CIs).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    min_subgroup: Annotated[int, typer.Option(min=1, help="Smallest subgroup (sex, age band, site) "
                                                          "that gets metrics.")] = 20,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier evaluation's files in --out.")] = False,
) -> None:
    """Evaluate a model bundle on labelled images: metrics with 95% CIs, subgroups, plots, HTML report."""
    from rich.console import Console
    from rich.markup import escape

    from ..errors import DermscreenError
    from .evaluate import evaluate as run_evaluation

    console, stdout = Console(stderr=True), Console()
    progress = _rich_progress(console)
    try:
        result = run_evaluation(model, labels, images, out, batch_size=batch_size, tta=tta,
                                split_file=split_file, split=split, bootstrap=bootstrap, seed=seed,
                                min_subgroup=min_subgroup, progress=progress, overwrite=overwrite)
    except DermscreenError as exc:
        progress.close()
        console.print("[bold red]Error:[/bold red]", escape(str(exc)), highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    data = result.metrics["data"]
    missing = (data.get("split") or {}).get("missing_from_labels")
    stdout.print(escape(f"{data['selection']}: {result.metrics['overall']['n']:,} images")
                 + (f" ({missing:,} listed images are not in the labels)" if missing else "") + ".",
                 highlight=False, soft_wrap=True)
    stdout.print(_summary_table(result.metrics))
    for warning in result.metrics.get("warnings", []):
        console.print("[bold yellow]Warning:[/bold yellow]", escape(warning), highlight=False, soft_wrap=True)
    if result.metrics["classes_absent"]:
        stdout.print(escape(f"Evaluated on the classes present only: {', '.join(result.metrics['classes_evaluated'])} "
                            f"(absent: {', '.join(result.metrics['classes_absent'])})."), highlight=False)
    stdout.print(escape(f"Wrote {result.out}/: predictions.csv, metrics.json, metrics.md (tables for a model card), "
                        "report.html and plots."), highlight=False)
    stdout.print("[dim]Screening aid, not a diagnosis.[/dim]")
