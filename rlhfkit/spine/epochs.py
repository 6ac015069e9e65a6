"""The epochs of the offline trainers — SFT (and rejection sampling and ReST, which fine-tune with SFT's loop), the
reward model, DPO and its relatives (SimPO, ORPO, listwise), KTO — as an iterator over batches, so that each
trainer keeps its loop in its own file, three lines long:

    loop = Epochs(engine, n=..., batch_size=..., epochs=..., generator=..., ...)
    for idx in loop:                                  # (b,) example indices (host): this step's global batch
        out = engine.step(idx, batch_loss)           # accumulation and processes: rlhfkit/models/engine.py
        loop.done(out, {"loss/dpo": out["loss"]})    # log, evaluate, checkpoint, stop early

What Epochs does around the trainer's step:
    1. each epoch, a permutation of the n examples drawn from the trainer's seeded generator, cut into
       n // batch_size batches (the remainder is dropped; one step on everything when n < batch_size);
    2. every `log_every` steps and at the last: the trainer's metrics with "step" and "lr" (metrics.jsonl, and the
       trackers of train.tracking), and the progress bar;
    3. every train.eval_every steps: the trainer's held-out evaluation, logged as "eval/" + the training metric
       names; with train.early_stopping_patience, training stops once the held-out loss has not improved for that
       many evaluations, and the best weights are put back (TRL: load_best_model_at_end + EarlyStoppingCallback);
    4. every train.checkpoint_every steps: a checkpoint (trainable weights, optimiser, schedule, every RNG, the
       generator as it was at the start of the epoch, and the loop's own counters) written whole and swapped in,
       from which a killed run goes on mid-epoch with the same batches, so that on CPU the result is bit-identical
       to an uninterrupted run (tests/test_resume_offline.py);
    5. callbacks (on_step, on_eval, on_save) for Python users.

Under several processes every rank runs the same loop on the same global batches (the generator is seeded alike);
the engine gives each rank its share. Only the main process logs and writes checkpoints; every rank evaluates its
share of the held-out batches and the sums are added up over the ranks (rlhfkit.models.engine.my_share,
sum_over_processes), so that every rank holds the whole set's figures.

Layer: spine (imports models, core).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.core.errors import ConfigError
from rlhfkit.core.runio import MetricsLog, progress
from rlhfkit.models.engine import Engine
from rlhfkit.models.optim import rng_state, set_rng_state

CHECKPOINT = "checkpoint.pt"


@dataclass
class LoopOptions:
    """What the loop does besides stepping (the pipeline's [train] section, rlhfkit/pipeline/config.py)."""

    checkpoint_every: int = 0  # optimiser steps between checkpoints; 0 = none
    eval_every: int = 0  # optimiser steps between held-out evaluations; 0 = none during training
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = never
    callbacks: list = field(default_factory=list)  # objects with any of on_step(step, metrics),
    # on_eval(step, metrics), on_save(step, path): called on every process, after the loop's own work

    @classmethod
    def of(cls, train, callbacks=None) -> "LoopOptions":
        """From a config's [train] section (any object with these fields); callbacks default to the process-wide
        ones the Python API sets for the call it makes (use_callbacks)."""
        return cls(train.checkpoint_every, train.eval_every, train.early_stopping_patience,
                   current_callbacks() if callbacks is None else list(callbacks))


_CALLBACKS: list = []


@contextlib.contextmanager
def use_callbacks(callbacks):
    """Within the block, every trainer's loop calls `callbacks` (rlhfkit.api: a stage run from Python): these
    epochs, and the online methods' loop (rlhfkit/spine/online.py)."""
    global _CALLBACKS
    saved, _CALLBACKS = _CALLBACKS, list(callbacks)
    try:
        yield
    finally:
        _CALLBACKS = saved


def current_callbacks() -> list:
    """The callbacks use_callbacks set for the call in progress ([] outside one)."""
    return list(_CALLBACKS)


def notify(callbacks, hook: str, *args) -> None:
    """Call `hook` ('on_step', 'on_eval', 'on_save') of each callback that has it, in order."""
    for cb in callbacks:
        if hasattr(cb, hook):
            getattr(cb, hook)(*args)


class Epochs:
    """Batches for `epochs` passes over n examples, resumable and stoppable (see the module docstring)."""

    def __init__(self, engine: Engine, *, n: int, batch_size: int, epochs: int, generator: torch.Generator,
                 desc: str, log: MetricsLog | Path | None = None, log_every: int = 10,
                 step_offset: int = 0, options: LoopOptions | None = None, checkpoint: Path | None = None,
                 evaluate: Callable[[], dict] | None = None, eval_loss: str | None = None):
        self.engine, self.n, self.batch_size, self.epochs = engine, n, batch_size, epochs
        self.generator, self.log_every, self.step_offset = generator, log_every, step_offset
        self.options = options or LoopOptions()
        self.steps_per_epoch = max(n // batch_size, 1)
        self.total_steps = self.count(n, batch_size, epochs)
        self.checkpoint = checkpoint if self.options.checkpoint_every > 0 else None
        self.evaluate, self.eval_loss = evaluate, eval_loss
        if self.options.eval_every > 0 and evaluate is None:
            raise ValueError(f"{desc}: eval_every is set but the trainer gave no evaluation")
        self.step = 0
        self.totals: dict = {}  # the trainer's own running figures, saved with the checkpoint
        self.loss_sum = 0.0
        self.best: tuple[float, int, dict] | None = None  # (held-out loss, step, trainable weights)
        self.evals_since_best, self.stopped_early = 0, False
        self._epoch_start = generator.get_state()  # the generator before the current epoch's permutation
        resumed = self.checkpoint is not None and (self.checkpoint / CHECKPOINT).is_file()
        if resumed:
            self._restore()
        self._own_log = isinstance(log, Path)  # a path: the loop opens the log (and on resume drops later lines)
        if self._own_log:
            log = MetricsLog(log, resume_after_step=self.step + step_offset if resumed else None)
        self.log = log
        self.bar = progress(self.total_steps, desc) if engine.is_main else None
        if self.bar is not None:
            self.bar.update(self.step)

    @staticmethod
    def count(n: int, batch_size: int, epochs: int) -> int:
        """The optimiser steps of `epochs` passes over n examples (the schedule's length)."""
        return max(n // batch_size, 1) * epochs

    # ------------------------------------------------------------------ 1. the batches
    def __iter__(self):
        while self.step < self.total_steps and not self.stopped_early:
            self._epoch_start = self.generator.get_state()
            order = torch.randperm(self.n, generator=self.generator)  # on the host, as the data (Runtime.put)
            for b in range(self.step % self.steps_per_epoch, self.steps_per_epoch):
                yield order[b * self.batch_size : (b + 1) * self.batch_size]
                if self.stopped_early:
                    return

    # ------------------------------------------------------------------ 2-5. after each step
    def done(self, out: dict, metrics: dict) -> None:
        """Record the step just made: `out` is Engine.step's, `metrics` what to log under which names."""
        self.step += 1
        loss = float(out["loss"])
        self.loss_sum += loss
        last = self.step == self.total_steps
        if self.log is not None and (self.step % self.log_every == 0 or last):
            record = {"step": self.step_offset + self.step, **{k: float(v) for k, v in metrics.items()},
                      "lr": self.engine.optimizer.param_groups[0]["lr"] if self.engine.scheduler is None
                      else self.engine.scheduler.get_last_lr()[0]}
            self.log.log(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        notify(self.options.callbacks, "on_step", self.step, metrics)
        if self.options.eval_every > 0 and self.step % self.options.eval_every == 0 and not last:
            self._evaluate()
        if self.checkpoint is not None and self.step % self.options.checkpoint_every == 0 and not last:
            self._save()

    def _evaluate(self) -> None:
        with self.engine.gathered():  # under train.sharding: each block gathered once for the whole evaluation
            figures = self.evaluate()
        for model in self.engine.models.values():
            model.train()
        if self.log is not None:
            self.log.log({"step": self.step_offset + self.step, **{f"eval/{k}": float(v) for k, v in figures.items()}})
        notify(self.options.callbacks, "on_eval", self.step, figures)
        held_out = float(figures[self.eval_loss])
        if self.best is None or held_out < self.best[0]:
            keep = {k: p.detach().clone() for k, p in self.engine.trainable().items()} \
                if self.options.early_stopping_patience > 0 else {}
            self.best, self.evals_since_best = (held_out, self.step, keep), 0
        else:
            self.evals_since_best += 1
            if 0 < self.options.early_stopping_patience <= self.evals_since_best:
                self.stopped_early = True

    def _save(self) -> None:
        """Write the checkpoint whole beside the old one, then swap it in (a kill never leaves half of one)."""
        epoch_start = self.generator.get_state() if self.step % self.steps_per_epoch == 0 else self._epoch_start
        # every process takes part (under train.sharding the weights and the optimiser state are gathered)
        state = {"step": self.step, "weights": self.engine.full_weights(),
                 "optimizer": self.engine.optimizer_state(), "sharding": self.engine.sharding,
                 "scheduler": self.engine.scheduler.state_dict() if self.engine.scheduler is not None else None,
                 "rng": rng_state(), "epoch_start": epoch_start, "totals": self.totals, "loss_sum": self.loss_sum,
                 "best": self.best, "evals_since_best": self.evals_since_best}
        if self.engine.is_main:
            self.checkpoint.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint / (CHECKPOINT + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.checkpoint / CHECKPOINT)
        self.engine.barrier()
        notify(self.options.callbacks, "on_save", self.step, self.checkpoint / CHECKPOINT)

    def _restore(self) -> None:
        state = torch.load(self.checkpoint / CHECKPOINT, map_location="cpu", weights_only=False)
        written = state.get("sharding", "none")
        if (written == "none") != (self.engine.sharding == "none"):  # the optimiser state is keyed differently
            raise ConfigError(f"{self.checkpoint / CHECKPOINT} was written with train.sharding = {written!r}; resume "
                              f"it with the same (this run has {self.engine.sharding!r}), or start the stage afresh")
        self.engine.load_weights(state["weights"])
        self.engine.load_optimizer_state(state["optimizer"])
        if self.engine.scheduler is not None:
            self.engine.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.generator.set_state(state["epoch_start"])
        self.step, self.totals, self.loss_sum = state["step"], state["totals"], state["loss_sum"]
        self.best, self.evals_since_best = state["best"], state["evals_since_best"]

    def finish(self) -> dict:
        """Close the bar and the log the loop opened; with early stopping, put the best weights back. Returns the
        steps made, the mean training loss over them and, with evaluations, the best held-out loss and its step."""
        if self.bar is not None:
            self.bar.close()
        if self._own_log:
            self.log.close()
        if self.checkpoint is not None and self.engine.is_main:  # done: the trained model is what counts now
            (self.checkpoint / CHECKPOINT).unlink(missing_ok=True)
        restored = False
        if self.options.early_stopping_patience > 0 and self.best is not None and self.best[2]:
            self.engine.load_weights(self.best[2])
            restored = True
        self.engine.keep_gathered()  # under train.sharding: whole models for the final evaluation
        result = {"steps": self.step, "loss": self.loss_sum / max(self.step, 1), "stopped_early": self.stopped_early}
        if self.best is not None:
            result |= {"best_eval_loss": self.best[0], "best_step": self.best[1], "best_restored": restored}
        return result
