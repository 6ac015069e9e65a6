"""Pieces every trainer shares (not loops): optimiser + schedule, RNG state, device setup."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from rlhfkit.models import resolve_device, resolve_precision


@dataclass
class Runtime:
    """Where and how tensors are computed for this run."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None = fp32


def runtime(cfg) -> Runtime:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    return Runtime(device, resolve_precision(cfg.precision, device))


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
