"""The one ``dermscreen`` command line: train, evaluate, predict, info, serve, ...

Each command's implementation lives with its subsystem; this module only wires them together.
Heavy imports (torch, onnxruntime) happen inside the commands, so ``dermscreen --help`` is instant
and the core install (no torch) can run everything except training.
"""
from __future__ import annotations

import typer

app = typer.Typer(
    name="dermscreen",
    help="Screening aid for skin lesions in dermoscopic images: train, evaluate, export and use classifiers. "
    "Outputs are screening aids, not diagnoses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"dermscreen {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print dermscreen's version and exit.")) -> None:
    """Screening aid for skin lesions in dermoscopic images: train, evaluate, export and use classifiers.
    Outputs are screening aids, not diagnoses."""


def _register() -> None:
    # Each subsystem exposes plain functions with typer annotations; registering them here keeps
    # one command tree while the code stays next to what it drives.
    from .training import commands as training_commands
    from .evaluation import commands as evaluation_commands

    app.command("train")(training_commands.train)
    app.command("export")(training_commands.export)
    app.command("train-segmenter")(training_commands.train_segmenter)
    app.command("add-segmenter")(training_commands.add_segmenter)
    app.command("evaluate")(evaluation_commands.evaluate)
    from .serve import commands as serve_commands

    app.command("serve")(serve_commands.serve)
    from . import screening_commands

    app.command("predict")(screening_commands.predict)
    app.command("info")(screening_commands.info)
    app.command("refit-ood")(screening_commands.refit_ood)
    app.command("calibrate")(screening_commands.calibrate)
    app.command("quantize")(screening_commands.quantize)


_register()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
