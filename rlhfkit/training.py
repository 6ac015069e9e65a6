"""Pieces every trainer shares (not loops): optimiser + schedule, RNG state, device setup."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlhfkit.models import resolve_device, resolve_precision


TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice (cores or OMP_NUM_THREADS), for threads = 0


@dataclass
class Runtime:
    """Where and how tensors are computed for this run."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None = fp32


def runtime(cfg) -> Runtime:
    """Device, precision and CPU threads of a run. The thread count is set explicitly (the `threads` field,
    1 by default) because CPU results depend on it: float sums are split across threads, so 1 and 2
    threads give different last bits, which a long run amplifies into different models."""
    torch.set_num_threads(torch_threads(cfg))
    device = resolve_device(cfg.device)
    return Runtime(device, resolve_precision(cfg.precision, device))


def torch_threads(cfg) -> int:
    """The CPU threads a run uses: `threads`, or torch's own default when it is 0."""
    return cfg.threads if cfg.threads > 0 else TORCH_DEFAULT_THREADS


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_machine_note(threads: int) -> str | None:
    """A warning when other work already keeps the cores busy (1-minute load average), else None.
    Oversubscribed CPU threads slow a run far more than 2x, because threads wait for each other."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], usable_cores()
    if load + threads <= cores + 0.5:
        return None
    return (f"the machine is busy: load average {load:.1f} on {cores} cores, and this run uses {threads} "
            f"thread{'s' if threads > 1 else ''}; it will run slower than usual (results do not change). "
            "Lower `threads` or let the other jobs finish first.")


_load_checked = False


@contextlib.contextmanager
def cpu_watch(cfg, name: str, warn, min_seconds: float = 10.0):
    """On CPU, tell the user when the machine is oversubscribed: before the first stage of a process, when
    other jobs already load the cores; after each stage, when it got less than 60% of the CPU its threads
    ask for. Either way the run only gets slower: results do not depend on load."""
    threads = torch_threads(cfg)
    if resolve_device(cfg.device).type != "cpu":
        yield
        return
    global _load_checked
    if not _load_checked:  # once per process: later, the load average counts this run's own work too
        _load_checked = True
        if (note := busy_machine_note(threads)) is not None:
            warn(note)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    yield
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if wall >= min_seconds and cpu / (wall * threads) < 0.6:
        warn(f"{name} got {cpu / (wall * threads):.0%} of the {threads} CPU thread{'s' if threads > 1 else ''} it "
             f"asked for over {wall:.0f} s: the machine is oversubscribed, so the run is slower than usual "
             "(results do not change)")


def make_optimizer(params, lr: float, total_steps: int, weight_decay: float = 0.0, final_fraction: float = 0.1):
    """AdamW with a linear decay of the learning rate from lr to final_fraction * lr over total_steps."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 1.0 - (1.0 - final_fraction) * min(step, total_steps) / max(total_steps, 1)
    )
    return opt, sched


def optimizer_step(loss, params, optimizer, scheduler=None, max_grad_norm: float = 1.0) -> None:
    """Backward, clip the gradient norm (0 = no clip), step the optimiser and, if given, the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG a run draws from, for exact resume."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])


# ---------------------------------------------------------------- checkpoints of the online methods (PPO, RLOO, GRPO)

def save_checkpoint(ckpt_dir: Path, models: dict, tokenizer, state: dict) -> None:
    """Write a complete checkpoint next to the old one, then swap, so a kill never leaves a half checkpoint:
    each model of `models` (name -> model) with the tokenizer in ckpt_dir/name, `state` in ckpt_dir/state.pt."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, model in models.items():
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
    torch.save(state, tmp / "state.pt")
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt_dir.exists():
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def has_checkpoint(ckpt_dir: Path) -> bool:
    """Whether ckpt_dir holds a complete checkpoint to resume from. A run killed between save_checkpoint's two
    renames left only ckpt_dir.old: that swap is finished here."""
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    if not ckpt_dir.exists() and (old / "state.pt").is_file():
        old.rename(ckpt_dir)
    return (ckpt_dir / "state.pt").is_file()


def loop_generators(seed: int, name: str, device: torch.device):
    """The random streams of an online method's loop, each saved in its checkpoint: prompts (random.Random),
    sampling and minibatch order (torch generators)."""
    prompt_rng = random.Random(f"{seed}-{name}")
    sample_gen = torch.Generator(device=device).manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed + 1)
    return prompt_rng, sample_gen, order_gen


def loop_state(step: int, optimizer, scheduler, prompt_rng: random.Random, sample_gen: torch.Generator,
               order_gen: torch.Generator, wall_time_s: float, **extra) -> dict:
    """What an online loop needs to go on exactly where it stopped (the checkpoint's state.pt), plus `extra`."""
    return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "prompt_rng": prompt_rng.getstate(), "order_gen": order_gen.get_state(), "rng": rng_state(sample_gen),
            "wall_time_s": wall_time_s, **extra}


def restore_loop_state(state: dict, optimizer, scheduler, prompt_rng: random.Random, sample_gen: torch.Generator,
                       order_gen: torch.Generator) -> tuple[int, float]:
    """Load loop_state's `state` into the given objects (in place); returns (step, wall time so far, s)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    prompt_rng.setstate(state["prompt_rng"])
    order_gen.set_state(state["order_gen"])
    set_rng_state(state["rng"], sample_gen)
    return state["step"], state.get("wall_time_s", 0.0)
