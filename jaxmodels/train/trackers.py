"""Trackers: where the metric writer sends each step's scalars (config.train.trackers).

- "jsonl": WORKDIR/metrics.jsonl, one row per write: {"step": 10, "train/loss": 3.9, ...}
  (tests, plots and experiment scripts read it);
- "tensorboard": event files in WORKDIR/tensorboard/ (tensorboardX, no TensorFlow);
- "wandb": Weights & Biases, an optional extra (pip install 'jaxmodels[wandb]').

Every tracker writes to the workdir through etils.epath (`jaxmodels.train.paths`), so a gs:// workdir
works like a local one. Only process 0 makes trackers.
"""

import json
import math
import os
import sys

from etils import epath

from jaxmodels.train.config import ConfigError
from jaxmodels.train.paths import is_local, open_append, register_tensorboard_scheme, scheme

TRACKERS = ("jsonl", "tensorboard", "wandb")


class Tracker:
    """The interface: the run's config once, then scalars by step ("train/loss", "eval/loss" ...)."""

    def log_config(self, config: dict) -> None:
        """Record the run's config (a JSON-able dict); the default keeps nothing (config.json has it)."""

    def write(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release what the tracker holds."""


def truncate_jsonl(path: epath.Path, last_step: int) -> None:
    """Drop rows after `last_step` (written after the checkpoint a resumed run restarts from)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(row + "\n" for row in rows))


class JsonlTracker(Tracker):
    """WORKDIR/metrics.jsonl, a row per write; a resumed run first drops the rows after its start step."""

    def __init__(self, workdir: epath.Path, start_step: int):
        self.path = workdir / "metrics.jsonl"
        truncate_jsonl(self.path, start_step)
        self._file = open_append(self.path)

    def write(self, step, scalars):
        self._file.write(json.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()

    def close(self):
        self._file.close()


class TensorBoardTracker(Tracker):
    """Event files in WORKDIR/tensorboard/; a resumed run purges the events after its start step."""

    def __init__(self, workdir: epath.Path, start_step: int):
        SummaryWriter = summary_writer_class()
        if not is_local(workdir):
            register_tensorboard_scheme(scheme(workdir))
        self._tb = SummaryWriter(os.fspath(workdir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step, scalars):
        for k, v in scalars.items():
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self):
        self._tb.close()


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch. tensorboardX's writer module imports torch
    whenever it is installed, only to accept torch tensors (we pass floats), which added 3-10 s to the start of
    every run. Unless torch is already loaded, "torch" maps to None in sys.modules for the import (an
    ImportError to tensorboardX) and is removed again after it."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def import_wandb():
    """The wandb module; ConfigError saying what to install when it is missing."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("config.train.trackers includes 'wandb', but wandb is not installed; "
                          "pip install 'jaxmodels[wandb]', or remove 'wandb' from config.train.trackers") from None
    return wandb


class WandbTracker(Tracker):
    """A Weights & Biases run, project `project`, named after the workdir. Its id is stored in
    WORKDIR/wandb_run_id, and a resumed run continues the same W&B run. W&B keeps the first value it
    got for a step, so the steps a resumed run repeats (those after its checkpoint) keep their old values
    there (metrics.jsonl has the new ones). W&B's local files go to WORKDIR/wandb for a local workdir,
    to ./wandb for a URL (W&B writes them with ordinary file I/O)."""

    def __init__(self, workdir: epath.Path, project: str):
        wandb = import_wandb()
        id_file = workdir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        self.run = wandb.init(project=project, id=run_id, resume="allow", name=workdir.name,
                              dir=os.fspath(workdir) if is_local(workdir) else None)
        id_file.write_text(self.run.id)

    def log_config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def write(self, step, scalars):
        self.run.log({k: v for k, v in scalars.items() if math.isfinite(v)}, step=step)

    def close(self):
        self.run.finish()


def check_trackers(names) -> None:
    """ConfigError for an unknown name in config.train.trackers, or 'wandb' without wandb installed."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"config.train.trackers={tuple(names)!r} has unknown trackers {unknown}; "
                          f"choose from {list(TRACKERS)}")
    if "wandb" in names:
        import_wandb()


def make_trackers(train_config, workdir: epath.Path, start_step: int) -> list[Tracker]:
    """The trackers config.train.trackers names, in that order (`train_config` is config.train)."""
    makers = {"jsonl": lambda: JsonlTracker(workdir, start_step),
              "tensorboard": lambda: TensorBoardTracker(workdir, start_step),
              "wandb": lambda: WandbTracker(workdir, train_config.wandb_project)}
    return [makers[name]() for name in train_config.trackers]
