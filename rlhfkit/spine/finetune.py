"""Fine-tuning on (prompt, completion) pairs, loss on completion tokens only: the SFT loop, shared by SFT
(rlhfkit/algorithms/sft.py) and by the methods that fine-tune on their own selected samples (rejection sampling,
ReST: rlhfkit/spine/self_training.py).

Layer: spine (imports models, data, ops, core).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.core.runio import MetricsLog
from rlhfkit.data.batching import packed_rows, used_columns
from rlhfkit.models.engine import make_engine, my_share, sum_over_processes
from rlhfkit.models.forward import causal_logits, ensure_packing, packed_causal_logits
from rlhfkit.models.optim import make_optimizer
from rlhfkit.models.runtime import Runtime, autocast
from rlhfkit.ops.logprobs import gather_logprobs
from rlhfkit.ops.losses import sft_loss
from rlhfkit.spine.epochs import Epochs, LoopOptions


def completion_nll(model, ids, mask, comp_mask, rt: Runtime) -> torch.Tensor:
    """Mean negative log-likelihood per completion token of a batch."""
    with autocast(rt.device, rt.dtype):
        logits = causal_logits(model, ids, mask)[:, :-1]  # (B, T-1, V): position t predicts t + 1
    logprobs = gather_logprobs(logits, ids[:, 1:])  # (B, T-1)
    return sft_loss(logprobs, comp_mask[:, 1:])


def packed_completion_nll(model, ids, positions, comp_mask, rt: Runtime) -> torch.Tensor:
    """completion_nll of rows packed padding-free (rlhfkit.data.batching.packed_rows): the same mean over the same
    completion tokens (a sequence's first token is a prompt token, so no loss crosses from one sequence into the
    next)."""
    with autocast(rt.device, rt.dtype):
        logits = packed_causal_logits(model, ids, positions)[:, :-1]
    return sft_loss(gather_logprobs(logits, ids[:, 1:]), comp_mask[:, 1:])


@torch.no_grad()
def evaluate_nll(model, data, batch_size: int, rt: Runtime) -> float:
    model.eval()
    ids, mask, comp = data
    total, count = 0.0, 0
    starts = range(0, len(ids), batch_size)
    for b in my_share(len(starts)):  # this process's batches; the sums added up over the processes
        sl = slice(starts[b], starts[b] + batch_size)
        n = comp[sl, 1:].sum().item()
        T = used_columns(mask[sl])  # the batch's own longest row (the data is padded to the longest of all)
        total += completion_nll(model, rt.put(ids[sl, :T]), rt.put(mask[sl, :T]), rt.put(comp[sl, :T]), rt).item() * n
        count += n
    sums = sum_over_processes({"total": total, "count": count})
    return sums["total"] / sums["count"]


def fit_completions(model, data, *, epochs: int, batch_size: int, lr: float, rt: Runtime, generator: torch.Generator,
                    log: MetricsLog | Path | None = None, weight_decay: float = 0.0, desc: str = "sft",
                    log_every: int = 10, step_offset: int = 0, options: LoopOptions | None = None,
                    checkpoint: Path | None = None, heldout=None, alone: bool = False) -> dict:
    """Fine-tune `model` on prompt/completion pairs, loss on completion tokens only: the SFT loop, shared by
    SFT and by the methods that fine-tune on their own selected samples (rejection sampling, ReST).

    `data` is encode_pairs' (ids, mask, completion_mask) in host memory (each batch moved: Runtime.put). Each
    epoch visits the pairs in a random order drawn from `generator` and makes len // batch_size steps (the last partial batch is dropped;
    one full-data step when fewer pairs than batch_size); a fresh AdamW decays linearly to 10% of `lr`.
    A step's loss is the mean over the batch's completion tokens, also when it is cut into micro-batches or
    shared by processes (each part weighted by its tokens: rlhfkit/models/engine.py).
    Logs step (+ `step_offset`, for several fits into one log), loss/sft and lr every `log_every` steps and at
    the last; `options` (train.*): checkpoints in `checkpoint`, evaluations on `heldout` (same layout as data).
    alone: this process fine-tunes by itself under `accelerate launch` (a stage run on the main process only).
    Returns the number of steps and the mean loss over them (Epochs.finish)."""
    n = len(data[0])
    batches = Epochs.count(n, batch_size, epochs)
    optimizer, scheduler = make_optimizer(model.parameters(), lr, batches, weight_decay)
    engine = make_engine({"policy": model}, optimizer, scheduler, rt.device, accumulation=rt.accumulation,
                         checkpointing=rt.checkpointing, sharding=rt.sharding, alone=alone)
    engine.check_batch(min(batch_size, n), "the SFT batch size")
    ids, mask, comp = data

    if rt.padding_free:  # a model that would attend across packed sequences is refused, not trained
        ensure_packing(model, ids, mask, rt)

    def batch_loss(rows: torch.Tensor):
        if rt.padding_free:  # whole sequences back to back: no padding computed (packed_rows)
            return packed_completion_nll(model, *map(rt.put, packed_rows(ids[rows], mask[rows], comp[rows])), rt), {}
        T = used_columns(mask[rows])  # the batch's own longest row (the data is padded to the longest of all)
        return completion_nll(model, rt.put(ids[rows, :T]), rt.put(mask[rows, :T]), rt.put(comp[rows, :T]), rt), {}

    def evaluate() -> dict:
        return {"loss/sft": evaluate_nll(model, heldout, 256, rt)}

    loop = Epochs(engine, n=n, batch_size=batch_size, epochs=epochs, generator=generator,
                  desc=desc, log=log, log_every=log_every, step_offset=step_offset, options=options,
                  checkpoint=checkpoint, evaluate=evaluate if heldout is not None else None, eval_loss="loss/sft")
    model.train()
    for idx in loop:
        out = engine.step(idx, batch_loss, units=lambda rows: comp[rows, 1:].sum())  # token-mean: tokens weigh
        loop.done(out, {"loss/sft": out["loss"]})
    return loop.finish()
