"""The run folder: resolved config, log file, split, history, learning curves and checkpoints."""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import torch

from ..errors import ConfigError
from .config import TrainConfig, data_seed

log = logging.getLogger("dermscreen.training")

# settings a resumed run may change (anything else would make it a different run); "name" only labels the
# exported bundle (an ensemble names its members)
RESUMABLE_CHANGES = {"name", "epochs", "patience", "device", "num_workers", "threads", "export", "export_check_images",
                     "amp", "onnx_exporter"}
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_balanced_accuracy", "val_balanced_accuracy_corrected",
                   "prior_tau", "lr", "images_per_s", "seconds"]


class RunFolder:
    """Paths and writers of one run folder; only the main process writes."""

    def __init__(self, root: str | Path, writer: bool = True):
        self.root = Path(root)
        self.writer = writer
        self.config_yaml = self.root / "config.yaml"
        self.log_file = self.root / "train.log"
        self.split_csv = self.root / "split.csv"
        self.history_csv = self.root / "history.csv"
        self.curves_png = self.root / "learning_curves.png"
        self.checkpoints = self.root / "checkpoints"
        self.last_pt = self.checkpoints / "last.pt"
        self.best_pt = self.checkpoints / "best.pt"
        self.bundle_dir = self.root / "bundle"
        self._handlers: list[logging.Handler] = []

    # ---- set-up ---------------------------------------------------------------------------
    def open(self, resume: bool) -> None:
        """Create the folder (refusing to overwrite a finished or started run unless resuming) and start the log."""
        if not resume and self.last_pt.exists():
            raise ConfigError(f"{self.root} already holds a training run. Use --resume to continue it, "
                              "or choose a new --out folder.")
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # an existing file, /dev/null/x, /proc/x, no permission
            raise ConfigError(f"Cannot write the run folder {self.root}: {exc.strerror or exc}. "
                              "Choose another --out.") from None
        if not resume:
            # a fresh run (no last.pt): files left by a run stopped before its first epoch are not this run's
            for stale in (self.history_csv, self.curves_png, self.best_pt):
                stale.unlink(missing_ok=True)
        # a fresh run starts a fresh log; a resumed one continues its own
        to_file = logging.FileHandler(self.log_file, mode="a" if resume else "w", encoding="utf-8")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        # warnings (no operating points, exporter fallback) must reach the user, not only the log file
        to_console = logging.StreamHandler(sys.stderr)
        to_console.setLevel(logging.WARNING)
        to_console.setFormatter(logging.Formatter("warning: %(message)s"))
        self._handlers = [to_file, to_console]
        for h in self._handlers:
            log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
        log.info("command: %s", " ".join(sys.argv))

    def weights_source(self) -> str:
        """Where this run's pretrained backbone weights came from, as its log recorded it (for the model card)."""
        if self.log_file.is_file():
            for line in self.log_file.read_text(encoding="utf-8").splitlines():
                if " weights: " in line and "backbone " in line:
                    return line.split(" weights: ", 1)[1].split(", device", 1)[0]
        return "fine-tuned (see the run's config)"

    def close(self) -> None:
        """Stop writing to the log file."""
        for h in self._handlers:
            log.removeHandler(h)
            h.close()
        self._handlers = []

    def resumed_config(self, config: TrainConfig) -> TrainConfig:
        """``config`` if it matches the saved run's config except for resumable settings; else ConfigError."""
        if not self.last_pt.is_file() or not self.config_yaml.is_file():
            raise ConfigError(f"Nothing to resume in {self.root}: no checkpoints/last.pt. Start a new run without --resume.")
        from .config import load_config

        saved_config = load_config(self.config_yaml)
        saved = {**saved_config.model_dump(mode="json"), "split_seed": data_seed(saved_config)}
        # split_seed None means "the seed": compare the split actually used
        new = {**config.model_dump(mode="json"), "split_seed": data_seed(config)}
        changed = sorted(k for k in new if new[k] != saved.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"Cannot resume {self.root}: the config differs from the run's in {', '.join(changed)}. "
                              f"Only {', '.join(sorted(RESUMABLE_CHANGES))} may change when resuming.")
        return config

    # ---- per epoch ------------------------------------------------------------------------
    def log_epoch(self, row: dict, improved: bool) -> None:
        """Append ``row`` to history.csv and the log; redraw the learning curves."""
        new = not self.history_csv.exists()
        with open(self.history_csv, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        corrected = ""
        if "val_balanced_accuracy_corrected" in row:
            corrected = (f" ({row['val_balanced_accuracy_corrected']:.4f} after prior correction, "
                         f"tau {row['prior_tau']:g})")
        log.info("epoch %d: train loss %.4f, val loss %.4f, val balanced accuracy %.4f%s%s (%.0fs, %.1f img/s)",
                 row["epoch"], row["train_loss"], row["val_loss"], row["val_balanced_accuracy"], corrected,
                 " *best*" if improved else "", row["seconds"], row["images_per_s"])
        self.plot_curves()

    def read_history(self) -> list[dict]:
        """history.csv rows as dicts of floats."""
        if not self.history_csv.exists():
            return []
        with open(self.history_csv, newline="", encoding="utf-8") as f:
            return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]

    def plot_curves(self) -> None:
        """Write learning_curves.png: losses and validation balanced accuracy per epoch."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_history()
        if not rows:
            return
        ep = [r["epoch"] for r in rows]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
        a.plot(ep, [r["val_loss"] for r in rows], "o-", label="validation")
        a.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
        a.legend()
        b.plot(ep, [r["val_balanced_accuracy"] for r in rows], "o-", color="tab:green", label="argmax")
        if all("val_balanced_accuracy_corrected" in r for r in rows):
            b.plot(ep, [r["val_balanced_accuracy_corrected"] for r in rows], "o-", color="tab:purple",
                   label="after prior correction")
            b.legend()
        b.set(xlabel="epoch", ylabel="balanced accuracy", title="Validation balanced accuracy", ylim=(0, 1))
        for ax in (a, b):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.curves_png, dpi=100)
        plt.close(fig)

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoints(self, model, optimizer, scheduler, state, config: TrainConfig, improved: bool) -> None:
        """Write checkpoints/last.pt (everything to resume) and, if ``improved``, checkpoints/best.pt (weights)."""
        weights = model.state_dict()
        payload = {"model": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "state": _state_dict(state), "config": config.model_dump(mode="json")}
        _atomic_save(payload, self.last_pt)
        if improved:
            _atomic_save({"model": weights, "epoch": state.epoch, "val_balanced_accuracy": state.best_score},
                         self.best_pt)

    def load_last(self, model, optimizer, scheduler, device):
        """Restore model/optimizer/scheduler from last.pt; returns the saved TrainState."""
        from .fit import TrainState

        # weights_only: checkpoints hold tensors and plain containers; refuse pickled code
        payload = torch.load(self.last_pt, map_location=device, weights_only=True)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        log.info("resumed from %s after epoch %d", self.last_pt, payload["state"]["epoch"])
        return TrainState(**payload["state"])

    def load_best(self, model, device) -> None:
        """Load the best validation weights into ``model``."""
        payload = torch.load(self.best_pt, map_location=device, weights_only=True)
        model.load_state_dict(payload["model"])


def _state_dict(state) -> dict:
    return {"epoch": state.epoch, "best_score": state.best_score, "best_loss": state.best_loss,
            "best_epoch": state.best_epoch, "history": state.history}


def _atomic_save(obj, path: Path) -> None:
    # write then rename: an interrupted save must not destroy the previous checkpoint
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
