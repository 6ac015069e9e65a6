"""Fine-tuning on (prompt, completion) pairs, loss on completion tokens only: the SFT loop, shared by SFT
(rlhfkit/algorithms/sft.py) and by the methods that fine-tune on their own selected samples (rejection sampling,
ReST: rlhfkit/spine/self_training.py).

Layer: spine (imports models, data, ops, core).
"""

from __future__ import annotations

import torch

from rlhfkit.core.runio import MetricsLog, progress
from rlhfkit.models.forward import causal_logits
from rlhfkit.models.optim import make_optimizer, optimizer_step
from rlhfkit.models.runtime import Runtime, autocast
from rlhfkit.ops.logprobs import gather_logprobs
from rlhfkit.ops.losses import sft_loss


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
