"""Run directories: stage markers, atomic JSON, JSONL metrics, progress bars.

A stage's directory counts as complete only once its marker `COMPLETE.json` is written, last, after
every output is in place; a killed stage never looks finished.

JSON files are strict JSON (RFC 8259: no NaN, no Infinity), so any reader (jq, a browser, pandas, Go, Rust)
can load summary.json and eval.json: a float that is not finite is written as null ("no number here": an
undefined figure such as best-of-n's per-position KL, or a config bound of inf). The exceptions are rlhfkit's
own records (RECORDS), which it reads back and compares with the config it runs: there an inf must survive the
round trip (a null would read as a changed config and make every stage look stale), so they keep Python's
NaN/Infinity.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhfkit.core.dist import is_main_process
from rlhfkit.core.tracking import Trackers, check_trackers, tracking_default

MARKER = "COMPLETE.json"
# rlhfkit's own records, read back and compared: a stage's inputs (the config it was made with, rlhfkit/pipeline/
# stages.py) and its completion marker. Written lossless (NaN and Infinity as Python writes them), see above.
RECORDS = frozenset({MARKER, "INPUTS.json"})


def finite_or_none(obj: Any) -> Any:
    """`obj` with every float that is not finite (NaN, inf, -inf) replaced by None, through dicts, lists and
    tuples (a tuple becomes a list, as JSON has it). Scalars JSON cannot hold (a numpy float32, a 0-d tensor) are
    made floats first, as write_json's `default=float` would."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if obj is None or isinstance(obj, (str, int)):  # bool is an int
        return obj
    value = float(obj)  # raises TypeError for what JSON cannot hold either
    return value if math.isfinite(value) else None


def write_json(path: str | Path, obj: Any, *, strict: bool | None = None) -> None:
    """Write JSON atomically (temp file + rename). strict: non-finite floats written as null (finite_or_none) and
    the file is strict JSON; by default every file but rlhfkit's own records (RECORDS), which stay lossless."""
    path = Path(path)
    strict = path.name not in RECORDS if strict is None else strict
    if strict:
        obj = finite_or_none(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=float, allow_nan=not strict)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def is_complete(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / MARKER).is_file()


def mark_complete(stage_dir: str | Path, result: dict) -> None:
    """Write the stage's result (its figures for summary.json) as the completion marker."""
    write_json(Path(stage_dir) / MARKER, result)


def stage_result(stage_dir: str | Path) -> dict:
    return read_json(Path(stage_dir) / MARKER)


class MetricsLog:
    """Append-only JSONL metrics, one object per step, flushed per line so a crash loses at most one; each line's
    numbers then go to the experiment trackers (rlhfkit/core/tracking.py), which open at the first line.

    tracking: tracker names ("tensorboard", "wandb", "trackio"); None = the process's choice (configure_tracking,
    which the pipeline sets from train.tracking). Only the main process of a multi-process run writes: on any
    other, the log is a no-op that leaves the file alone."""

    def __init__(self, path: str | Path, resume_after_step: int | None = None, *,
                 tracking: Iterable[str] | None = None):
        self.path = Path(path)
        self._f = None
        if not is_main_process():
            return
        names, config = tracking_default()
        if tracking is not None:
            names = tuple(tracking)
            check_trackers(names)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after_step is not None and self.path.exists():
            # Drop lines written after the checkpoint we resume from, so no step is logged twice.
            keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_after_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif resume_after_step is None:
            self.path.write_text("")
        self._f = self.path.open("a", encoding="utf-8")
        # TensorBoard forgets the same steps in its earlier event files (all of them on a fresh start).
        purge_step = 0 if resume_after_step is None else resume_after_step + 1
        self._trackers = Trackers(names, self.path.parent, config, purge_step)

    def log(self, record: dict) -> None:
        if self._f is None:
            return
        record = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        self._f.write(json.dumps(record) + "\n")  # first: the record
        self._f.flush()
        self._trackers.log(record)

    def close(self) -> None:
        if self._f is None:
            return
        self._f.close()
        self._trackers.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tracked(iterable, desc: str, unit: str = "batch", total: int | None = None):
    """`iterable` with a progress bar (what is being done, how far, time left): for every loop of a phase that can
    take more than a few seconds on a real model (an evaluation, a cache of log-probs, sampling a set)."""
    bar = progress(len(iterable) if total is None else total, desc, unit)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def progress(total: int, desc: str, unit: str = "step"):
    """A tqdm bar with ETA on stderr (the main process's only, under `accelerate launch`)."""
    import sys

    from tqdm.auto import tqdm

    # In a log file (CI, nohup) redraw rarely instead of flooding it with carriage returns.
    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=interval, leave=False,
                disable=not is_main_process())
