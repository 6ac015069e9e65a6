"""Supervised fine-tuning: maximise log-likelihood of demonstration completions (prompt tokens masked).

Ouyang et al. (2022), "Training language models to follow instructions with human feedback", Sec. 3.5.
Deviations: demonstrations come from the task's generator; the loss is reported next to the task's
entropy floor (a model that learned the data distribution exactly cannot go below it).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from rlhfkit.config import Config
from rlhfkit.data.batching import check_representable, encode_pairs
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import TinyModelSpec, autocast, build_tiny_policy, causal_logits, load_policy, load_tokenizer
from rlhfkit.ops.logprobs import gather_logprobs
from rlhfkit.ops.losses import sft_loss
from rlhfkit.runio import MetricsLog, progress
from rlhfkit.training import Runtime, make_optimizer, optimizer_step


def completion_nll(model, ids, mask, comp_mask, rt: Runtime) -> torch.Tensor:
    """Mean negative log-likelihood per completion token of a batch."""
    with autocast(rt.device, rt.dtype):
        logits = causal_logits(model, ids, mask)[:, :-1]  # (B, T-1, V): position t predicts t + 1
    logprobs = gather_logprobs(logits, ids[:, 1:])  # (B, T-1)
    return sft_loss(logprobs, comp_mask[:, 1:])


@torch.no_grad()
def evaluate_nll(model, data, batch_size: int, rt: Runtime) -> float:
    model.eval()
    ids, mask, comp = data
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        sl = slice(i, i + batch_size)
        n = comp[sl, 1:].sum().item()
        total += completion_nll(model, ids[sl], mask[sl], comp[sl], rt).item() * n
        count += n
    return total / count


def train_sft(cfg: Config, task, out_dir: Path, rt: Runtime) -> dict:
    start = time.time()
    sc = cfg.sft
    rng = random.Random(cfg.seed)

    # 1. Model and tokenizer: a user's local causal LM, or a tiny one built from the config.
    if cfg.policy.path:
        model = load_policy(cfg.policy.path, rt.device, "policy.path")
        tokenizer = load_tokenizer(cfg.policy.path, "policy.path")
    else:
        tokenizer = task.build_tokenizer()
        p = cfg.policy
        model = build_tiny_policy(TinyModelSpec(p.arch, p.n_layer, p.n_embd, p.n_head, p.n_ctx), tokenizer, cfg.seed).to(rt.device)

    # 2. Demonstrations, tokenised once: prompt + completion + EOS; loss only on completion tokens.
    demos = task.demonstrations(sc.n_demos, rng)
    heldout = task.demonstrations(max(256, sc.n_demos // 20), rng)
    check_representable(tokenizer, [(f"demonstration {i} {field}", text) for i, (p, c) in enumerate(demos[:256])
                                    for field, text in (("prompt", p), ("completion", c))],
                        f"task '{task.name}'", "policy")
    train = [t.to(rt.device) for t in encode_pairs(tokenizer, [p for p, _ in demos], [c for _, c in demos])]
    test = [t.to(rt.device) for t in encode_pairs(tokenizer, [p for p, _ in heldout], [c for _, c in heldout])]

    # 3. Train: shuffled minibatches, AdamW with linear decay.
    steps_per_epoch = len(demos) // sc.batch_size
    total_steps = steps_per_epoch * sc.epochs
    if total_steps == 0:  # Config.validate refuses this too; a stage that trains nothing must never look done
        raise RlhfkitError(f"sft.batch_size = {sc.batch_size} > sft.n_demos = {sc.n_demos}: no SFT step would run")
    optimizer, scheduler = make_optimizer(model.parameters(), sc.lr, total_steps, sc.weight_decay)
    log = MetricsLog(out_dir / "metrics.jsonl")
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = progress(total_steps, "sft")
    step, running = 0, None
    model.train()
    for _ in range(sc.epochs):
        order = torch.randperm(len(demos), generator=generator).to(rt.device)
        for b in range(steps_per_epoch):
            idx = order[b * sc.batch_size : (b + 1) * sc.batch_size]
            loss = completion_nll(model, train[0][idx], train[1][idx], train[2][idx], rt)
            optimizer_step(loss, model.parameters(), optimizer, scheduler)
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 10 == 0 or step == total_steps:
                log.log({"step": step, "loss/sft": loss.item(), "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
    bar.close()
    log.close()

    # 4. Evaluate on held-out demonstrations and save with save_pretrained.
    heldout_loss = evaluate_nll(model, test, 256, rt)
    floor = task.sft_loss_floor()
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    return {
        "heldout_loss": heldout_loss,
        "loss_floor": floor if floor is not None else math.nan,
        "excess_loss": heldout_loss - floor if floor is not None else math.nan,
        "steps": total_steps,
        "n_demos": sc.n_demos,
        "wall_time_s": time.time() - start,
    }
