"""What makes a run resumable and its files consistent: the epoch record (a ``metrics.csv`` row), random
states, checkpoint restore, the resume check, and the files rewritten from ``last.pt`` after a kill.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..config import MONITORS, Config, ConfigError, config_differences, config_from_dict, config_to_dict
from ..io import atomic_file
from ..rundir import BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS_FILE


METRIC_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1",
                  "val_auroc", "val_qwk", "peak_memory_bytes", "peak_process_bytes", "train_time_s",
                  "encoded_with_grad", "encoded_no_grad", "epoch_time_s"]


def rng_states(generator: torch.Generator) -> dict:
    """Every random state a resumed run needs, as tensors and plain values (the safe loader reads them)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(), "sampler": generator.get_state(),
              "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                        "cached_gaussian": gauss},
              "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, generator: torch.Generator) -> None:
    # .cpu(): the checkpoint is loaded with map_location=device, but RNG states must be CPU byte tensors.
    torch.set_rng_state(states["torch"].cpu())
    generator.set_state(states["sampler"].cpu())
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def restore_training_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> None:
    """Load a checkpoint's model, optimizer and gradient scaler states (the schedule needs only the step
    count: :func:`patchgd.engine.build.build_scheduler`)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Write ``metrics.csv`` whole, atomically, from the run's rows (one per epoch, kept in the checkpoint)."""
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the generator of PatchGD's patch sampler."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a checkpoint file atomically (best.pt is last.pt of its epoch: no second serialisation)."""
    with atomic_file(target) as tmp:
        shutil.copyfile(source, tmp)


def restore_run_files(run_dir: Path, state: dict) -> None:
    """Bring the files written after ``last.pt`` in line with it, for a run killed in between.

    ``metrics.csv`` is rewritten from the rows the checkpoint holds (a row written after it is dropped, a
    row not yet written is added), and ``best.pt`` is copied from ``last.pt`` when the checkpoint's own
    epoch was the best.
    """
    write_metrics(run_dir / METRICS_FILE, state["metrics"])
    if state["best_epoch"] == state["epoch"]:
        copy_checkpoint(run_dir / LAST_CHECKPOINT, run_dir / BEST_CHECKPOINT)


def check_resume(state: dict, cfg: Config, run_dir: Path) -> None:
    """Refuse to resume ``state`` under a config that differs from the one it was trained with.

    Only ``train.epochs`` may grow (to extend a run); ``output_dir`` is where the run is now. Both configs
    are compared resolved, so a key added to the schema since the checkpoint compares by its default.

    Raises:
        ConfigError: Listing every differing key with the checkpoint's value and the new one.
    """
    saved = config_to_dict(config_from_dict(state["config"], source=f"{run_dir / 'last.pt'} (its config)"))
    differences = config_differences(saved, config_to_dict(cfg))
    differences.pop("output_dir", None)
    old_epochs, new_epochs = differences.get("train.epochs", (0, 0))
    if new_epochs > old_epochs:
        del differences["train.epochs"]
    if differences:
        listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in
                           ((k, *v) for k, v in differences.items()))
        raise ConfigError(f"--resume {run_dir}: the config differs from the one the run was trained with "
                          f"({listed}); only train.epochs may be raised. Start a new run to change anything else")


@dataclasses.dataclass
class RunProgress:
    """Where a run stands between epochs: the epoch records so far (the rows of ``metrics.csv``) and the best
    epoch by ``monitor`` (``train.monitor``; an epoch whose value is undefined, an AUROC over one class, is
    never the best while another is defined; the first of equal values is)."""

    monitor: str = "accuracy"
    history: list[dict] = dataclasses.field(default_factory=list)
    best_epoch: int = 0
    peak_memory_bytes: int = 0

    def __post_init__(self) -> None:
        self.history, rows = [], self.history
        for record in rows:
            self.add(record)

    @property
    def next_epoch(self) -> int:
        return self.history[-1]["epoch"] + 1 if self.history else 1

    @property
    def best(self) -> dict:
        """The best epoch's record (empty before any evaluation)."""
        return self.history[self.best_epoch - self.history[0]["epoch"]] if self.best_epoch else {}

    @property
    def best_value(self) -> float | None:
        return self.best.get(f"val_{self.monitor}")

    @property
    def evaluations_since_best(self) -> int:
        """Evaluated epochs after the best one (``train.patience`` counts them)."""
        return sum(1 for r in self.history if r["epoch"] > self.best_epoch and _defined(r.get("val_loss")))

    def add(self, record: dict) -> None:
        self.history = [*self.history, record]
        self.peak_memory_bytes = max(self.peak_memory_bytes, record["peak_memory_bytes"])
        if not _defined(record.get("val_loss")):
            return  # not evaluated (train.eval_every): never the best
        value = record.get(f"val_{self.monitor}")
        if not self.best_epoch:
            self.best_epoch = record["epoch"]
        elif _defined(value):
            best, larger = self.best_value, MONITORS[self.monitor]
            if not _defined(best) or (value > best if larger else value < best):
                self.best_epoch = record["epoch"]


def _defined(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def epoch_record(epoch: int, lr: float, train_stats: dict, results: dict | None, elapsed: float) -> dict:
    """An epoch's row of ``metrics.csv`` (:data:`METRIC_COLUMNS`), also kept in the checkpoint; its validation
    values None when the epoch was not evaluated (``train.eval_every``)."""
    r = results or {}
    return {"epoch": epoch, "lr": lr, "train_loss": train_stats["train_loss"], "val_loss": r.get("loss"),
            "val_accuracy": r.get("accuracy"), "val_balanced_accuracy": r.get("balanced_accuracy"),
            "val_macro_f1": r.get("macro_f1"), "val_auroc": r.get("auroc"), "val_qwk": r.get("qwk"),
            "peak_memory_bytes": train_stats["peak_memory_bytes"],
            "peak_process_bytes": train_stats["peak_process_bytes"], "train_time_s": round(train_stats["train_time_s"], 3),
            "encoded_with_grad": train_stats["encoded_with_grad"], "encoded_no_grad": train_stats["encoded_no_grad"],
            "epoch_time_s": round(elapsed, 3)}
