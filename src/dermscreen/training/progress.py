"""Live progress bars for training (rich): epochs, batches, running loss and validation score."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """Context manager drawing an epoch bar and a batch bar; does nothing when ``enabled`` is False."""

    def __init__(self, epochs: int, batches: int, enabled: bool = True, start_epoch: int = 0):
        self.enabled = enabled
        self.batches = batches
        self._progress = None
        if enabled:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=Console(stderr=True), transient=False,
            )
            self._epochs = self._progress.add_task("epochs ", total=epochs, completed=start_epoch, info="")
            self._batch = self._progress.add_task("batches", total=batches, info="")

    def __enter__(self) -> "TrainProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start_epoch(self, epoch: int) -> None:
        """Reset the batch bar for 0-based ``epoch``."""
        if self._progress is not None:
            self._progress.reset(self._batch, total=self.batches, description=f"epoch {epoch + 1}", info="")

    def batch_done(self, running_loss: float) -> None:
        """Advance the batch bar, showing the running training loss."""
        if self._progress is not None:
            self._progress.update(self._batch, advance=1, info=f"loss {running_loss:.4f}")

    def epoch_done(self, row: dict, improved: bool) -> None:
        """Advance the epoch bar, showing the epoch's validation results."""
        if self._progress is not None:
            mark = " (best)" if improved else ""
            self._progress.update(self._epochs, advance=1, info=(
                f"val loss {row['val_loss']:.4f}  val bal. acc {row['val_balanced_accuracy']:.3f}{mark}"))
