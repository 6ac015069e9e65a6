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


def fit_completions(model, data, *, epochs: int, batch_size: int, lr: float, rt: Runtime, generator: torch.Generator,
                    log: MetricsLog | None = None, weight_decay: float = 0.0, desc: str = "sft",
                    log_every: int = 10, step_offset: int = 0) -> dict:
    """Fine-tune `model` on prompt/completion pairs, loss on completion tokens only: the SFT loop, shared by
    SFT and by the methods that fine-tune on their own selected samples (rejection sampling, ReST).

    `data` is encode_pairs' (ids, mask, completion_mask) on the run's device. Each epoch visits the pairs in a
    random order drawn from `generator` and makes len // batch_size steps (the last partial batch is dropped;
    one full-data step when fewer pairs than batch_size); a fresh AdamW decays linearly to 10% of `lr`.
    Logs step (+ `step_offset`, for several fits into one log), loss/sft and lr every `log_every` steps and at
    the last. Returns the number of steps and the mean loss over them."""
    n = len(data[0])
    steps_per_epoch = max(n // batch_size, 1)
    total_steps = steps_per_epoch * epochs
    optimizer, scheduler = make_optimizer(model.parameters(), lr, total_steps, weight_decay)
    bar = progress(total_steps, desc)
    step, running, total = 0, None, 0.0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(rt.device)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            loss = completion_nll(model, data[0][idx], data[1][idx], data[2][idx], rt)
            optimizer_step(loss, model.parameters(), optimizer, scheduler)
            step += 1
            value = loss.item()
            total += value
            running = value if running is None else 0.98 * running + 0.02 * value
            if log is not None and (step % log_every == 0 or step == total_steps):
                log.log({"step": step_offset + step, "loss/sft": value, "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
    bar.close()
    return {"steps": total_steps, "loss": total / total_steps}


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
    if cfg.lora.sft:  # adapters on the pretrained model in policy.path (Config.validate requires one)
        from rlhfkit.lora import wrap_lora

        model = wrap_lora(model, cfg.lora, Path(cfg.policy.path), cfg.seed)

    # 2. Demonstrations, tokenised once: prompt + completion + EOS; loss only on completion tokens.
    demos, heldout = task.sft_split(sc.n_demos, rng)
    check_representable(tokenizer, [(f"demonstration {i} {field}", text) for i, (p, c) in enumerate(demos[:256])
                                    for field, text in (("prompt", p), ("completion", c))],
                        f"task '{task.name}'", "policy")
    train = [t.to(rt.device) for t in encode_pairs(tokenizer, [p for p, _ in demos], [c for _, c in demos])]
    test = [t.to(rt.device) for t in encode_pairs(tokenizer, [p for p, _ in heldout], [c for _, c in heldout])]

    # 3. Train: shuffled minibatches, AdamW with linear decay (fit_completions, shared with the methods that
    # fine-tune on selected samples: rejection sampling, ReST).
    if len(demos) < sc.batch_size:  # Config.validate refuses this too; a stage that trains nothing must never look done
        raise RlhfkitError(f"sft.batch_size = {sc.batch_size} > the {len(demos)} demonstrations (sft.n_demos = "
                           f"{sc.n_demos}): no SFT step would run")
    log = MetricsLog(out_dir / "metrics.jsonl")
    fit = fit_completions(model, train, epochs=sc.epochs, batch_size=sc.batch_size, lr=sc.lr,
                          weight_decay=sc.weight_decay, generator=torch.Generator().manual_seed(cfg.seed), rt=rt,
                          log=log, desc="sft")
    log.close()

    # 4. Evaluate on held-out demonstrations and save with save_pretrained. With LoRA the adapter is kept in
    #    adapter/ and merged into model/: the SFT policy is every later stage's start and reference.
    heldout_loss = evaluate_nll(model, test, 256, rt)
    floor = task.sft_loss_floor()
    if cfg.lora.sft:
        model.save_pretrained(out_dir / "adapter")
        tokenizer.save_pretrained(out_dir / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    return {
        "heldout_loss": heldout_loss,
        "loss_floor": floor if floor is not None else math.nan,
        "excess_loss": heldout_loss - floor if floor is not None else math.nan,
        "steps": fit["steps"],
        "n_demos": len(demos),
        "wall_time_s": time.time() - start,
    }
