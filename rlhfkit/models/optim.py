"""Pieces every trainer shares (not loops): optimiser + schedule, RNG state, and the
checkpoints of the online loops (written whole, then swapped in). The optimiser step itself: engine.py.

Layer: models (imports core only).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def make_optimizer(params, lr: float, total_steps: int, weight_decay: float = 0.0, final_fraction: float = 0.1):
    """AdamW with a linear decay of the learning rate from lr to final_fraction * lr over total_steps."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 1.0 - (1.0 - final_fraction) * min(step, total_steps) / max(total_steps, 1)
    )
    return opt, sched


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

def save_checkpoint(ckpt_dir: Path, models: dict, tokenizer, state: dict, state_dicts: dict | None = None) -> None:
    """Write a complete checkpoint next to the old one, then swap, so a kill never leaves a half checkpoint:
    each model of `models` (name -> model) with the tokenizer in ckpt_dir/name, `state` in ckpt_dir/state.pt.
    state_dicts: name -> the model's whole state dict where it is not the model's own (trained under sharding)."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, model in models.items():
        whole = (state_dicts or {}).get(name)
        model.save_pretrained(tmp / name, **({"state_dict": whole} if whole is not None else {}))
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


def restore_loop_state(state: dict, load_optimizer: Callable[[dict], None], scheduler, prompt_rng: random.Random,
                       sample_gen: torch.Generator, order_gen: torch.Generator) -> tuple[int, float]:
    """Load loop_state's `state` into the given objects (in place; the optimiser's through `load_optimizer`, e.g.
    Engine.load_optimizer_state); returns (step, wall time so far, s)."""
    load_optimizer(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    prompt_rng.setstate(state["prompt_rng"])
    order_gen.set_state(state["order_gen"])
    set_rng_state(state["rng"], sample_gen)
    return state["step"], state.get("wall_time_s", 0.0)
