"""Experiment trackers beside metrics.jsonl (TRL's `report_to`): TensorBoard, Weights & Biases, Trackio.

`OUT/STAGE/metrics.jsonl` stays the record: rlhfkit/core/runio.py's MetricsLog writes each line there first and
only then hands the line's numbers to the trackers chosen here, under the same names (docs/metrics.md). The
pipeline chooses them once for the process (`configure_tracking`, from `train.tracking`); every MetricsLog opened
afterwards picks them up, so no trainer passes them along. docs/tracking.md says where each one writes.

Each tracker's package is imported only when a log opens it, so `import rlhfkit` stays light and a run without
trackers needs none of them; `check_trackers` is the preflight that says which package to install.

Layer: core (imports only the standard library, rlhfkit.core.errors, and the trackers' packages where used).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhfkit.core.errors import ConfigError

# Tracker -> the package it needs. The same names as rlhfkit/pipeline/config.py's TRACKERS (tests/test_tracking.py
# keeps the two in step). TensorBoard's writer is torch's (torch.utils.tensorboard), which needs `tensorboard`.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
PROJECT = "rlhfkit"  # the W&B and Trackio project every stage logs to; the run is named after the stage

# The process-wide choice (configure_tracking): what a MetricsLog opened with tracking=None uses.
_names: tuple[str, ...] = ()
_config: dict | None = None


def check_trackers(names: Iterable[str]) -> None:
    """Raise ConfigError, naming train.tracking and the command that fixes it, for a name that is not a tracker or
    whose package is not installed. Looks the packages up without importing them (preflight: cheap)."""
    for name in names:
        if name not in PACKAGES:
            raise ConfigError(f"train.tracking: {name!r} is not a tracker; choose from "
                              f"{', '.join(map(repr, PACKAGES))}")
        package = PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.tracking: {name!r} needs the {package!r} package, which is not installed: "
                              f"pip install 'rlhfkit[tracking]' (all trackers) or pip install {package}")


def configure_tracking(names: Iterable[str], config: dict | None = None) -> None:
    """Choose the trackers of every MetricsLog this process opens from now on (one opened with tracking=None);
    [] turns them off. `config`: the run's configuration as a dict, recorded by W&B and Trackio with each run."""
    global _names, _config
    names = tuple(dict.fromkeys(names))  # in order, each once
    check_trackers(names)
    _names, _config = names, config


def tracking_default() -> tuple[tuple[str, ...], dict | None]:
    """The process-wide choice: (tracker names, config)."""
    return _names, _config


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics line that trackers plot: every value but "step" that is a number (a bool counts
    as 0/1); None, strings and lists are left to metrics.jsonl."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


class Trackers:
    """The trackers of one metrics log: opened by the first line (so a stage that logs nothing opens none), each
    line's numbers sent to all, closed together. `stage_dir` is where metrics.jsonl lies; `purge_step`: the first
    step TensorBoard forgets from earlier event files (a resumed run's next step; 0 on a fresh start)."""

    def __init__(self, names: Iterable[str], stage_dir: str | Path, config: dict | None = None, purge_step: int = 0):
        self.names, self.stage_dir, self.config, self.purge_step = tuple(names), Path(stage_dir), config, purge_step
        self._open: list | None = None

    def log(self, record: dict) -> None:
        if not self.names:
            return
        if self._open is None:
            self._open = [OPENERS[name](self.stage_dir, self.config, self.purge_step) for name in self.names]
        values = scalars(record)
        step = int(record["step"])
        for tracker in self._open:
            tracker.log(values, step)

    def close(self) -> None:
        for tracker in self._open or ():
            tracker.close()
        self._open = None


class _TensorBoard:
    """Event files in STAGE/tensorboard, one scalar per metric name. purge_step: TensorBoard drops the steps from
    there on that earlier event files hold (a resumed run logs them again), as metrics.jsonl drops its lines."""

    def __init__(self, stage_dir: Path, config: dict | None, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(stage_dir / "tensorboard"), purge_step=purge_step)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _WandB:
    """A W&B run named after the stage, its files in STAGE/wandb; offline unless WANDB_MODE says otherwise
    (`wandb sync STAGE/wandb/offline-run-*` uploads it later). reinit="create_new": a log may open while another
    is open (a self-training round's log inside the stage's), each its own run."""

    def __init__(self, stage_dir: Path, config: dict | None, purge_step: int):
        import wandb

        self.run = wandb.init(project=PROJECT, name=stage_dir.name, dir=stage_dir, config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """A Trackio run named after the stage, in Trackio's own store (TRACKIO_DIR, by default under HF_HOME), or a
    Space or server when TRACKIO_SPACE_ID or TRACKIO_SERVER_URL says so. Logs through the run object that init
    returns rather than trackio.log, so that two logs open at once each keep their own run."""

    def __init__(self, stage_dir: Path, config: dict | None, purge_step: int):
        import trackio

        self.run = trackio.init(project=PROJECT, name=stage_dir.name, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}
