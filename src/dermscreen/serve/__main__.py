"""``python -m dermscreen.serve``: the ``dermscreen serve`` command on its own (used by tests and benchmarks)."""
import typer

from .commands import serve

if __name__ == "__main__":
    typer.run(serve)
