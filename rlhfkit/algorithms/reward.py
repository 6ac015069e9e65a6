"""Reward model: a scalar head trained on comparisons with the Bradley-Terry loss.

    loss = -log sigma(r(x, y_chosen) - r(x, y_rejected) - m)      (InstructGPT eq. 1; Llama 2 eq. 2)

r is the head's output at the last real token of prompt + completion + EOS. Chosen and rejected go
through ONE forward pass (stacked on the batch axis). Held-out items (not pairs: pairs of one item
share a prompt) measure pairwise accuracy. One reward model learns one criterion (`reward.criterion`):
mixing, say, helpfulness and harmlessness labels would fit neither.
Deviation from InstructGPT: comparisons of one item are not forced into one batch (K is small here).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import torch

from rlhfkit.config import Config
from rlhfkit.data.batching import check_representable, encode_completion, encode_prompt, pad_right
from rlhfkit.data.contract import Comparison, read_comparisons
from rlhfkit.errors import DataError
from rlhfkit.models import autocast, load_scalar_model, load_tokenizer, sequence_scores
from rlhfkit.ops.losses import bradley_terry_loss
from rlhfkit.runio import MetricsLog, progress
from rlhfkit.training import Runtime, make_optimizer, optimizer_step


def select_criterion(comparisons: list[Comparison], criterion: str, source: str | Path) -> tuple[list[Comparison], str]:
    """The comparisons of one criterion, and its name. `criterion` empty: the data must hold a single
    criterion (whatever it is), else an error lists those found, so mixed labels never train one model."""
    counts = Counter(c.criterion for c in comparisons).most_common()
    found = ", ".join(f"'{name}' ({n} comparisons)" for name, n in counts)
    if not criterion:
        if len(counts) > 1:
            raise DataError(f"{source}: comparisons of {len(counts)} criteria ({found}); a reward model learns one, "
                            f"so set reward.criterion to one of them")
        return comparisons, counts[0][0] if counts else ""
    selected = [c for c in comparisons if c.criterion == criterion]
    if not selected:
        raise DataError(f"{source}: no comparisons with reward.criterion = '{criterion}'; the file holds {found}")
    return selected, criterion


def load_comparisons(path: str | Path, criterion: str, heldout_fraction: float, seed: int, tokenizer,
                     stage: str = "reward"):
    """(train, held-out) comparisons a stage learns from (the reward model, or DPO's policy): read (errors
    name file:line:field), one criterion, text the stage's tokenizer can represent, enough items to hold
    some out (`{stage}.heldout_fraction`). The pipeline calls this before anything runs, so bad data fails
    before SFT, not after it."""
    comparisons, _ = select_criterion(read_comparisons(path), criterion, path)
    texts = [(f"item {c.item_id!r} field {field!r}", getattr(c, field))
             for c in comparisons for field in ("prompt", "chosen", "rejected")]
    check_representable(tokenizer, texts, str(path), "reward model" if stage == "reward" else f"{stage} policy")
    train, test = split_by_item(comparisons, heldout_fraction, seed)
    if not train or not test:
        raise DataError(f"{path}: {len(comparisons)} comparisons are too few to hold out "
                        f"{heldout_fraction:.0%} of items; label more items or change {stage}.heldout_fraction")
    return train, test


def split_by_item(comparisons: list[Comparison], heldout_fraction: float, seed: int):
    """Deterministic train / held-out split by hashing item ids, so no prompt is in both."""
    def heldout(item_id: str) -> bool:
        h = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64 < heldout_fraction

    train = [c for c in comparisons if not heldout(c.item_id)]
    test = [c for c in comparisons if heldout(c.item_id)]
    return train, test


def encode_comparisons(tokenizer, comparisons: list[Comparison]):
    """(2N, T) ids and mask, chosen rows first then rejected rows, plus (N,) margins (0 where unknown)."""
    seqs = []
    for side in ("chosen", "rejected"):
        seqs += [encode_prompt(tokenizer, c.prompt) + encode_completion(tokenizer, getattr(c, side)) for c in comparisons]
    ids, mask = pad_right(seqs, tokenizer.pad_token_id)
    margins = torch.tensor([c.margin or 0.0 for c in comparisons], dtype=torch.float32)
    return ids, mask, margins


def pair_scores(model, ids, mask, idx, n: int, rt: Runtime):
    """Scores of chosen and rejected for comparisons `idx`, in one forward pass."""
    rows = torch.cat([idx, idx + n])  # chosen rows, then their rejected rows
    with autocast(rt.device, rt.dtype):
        scores = sequence_scores(model, ids[rows], mask[rows])  # (2b,)
    return scores[: len(idx)], scores[len(idx) :]


@torch.no_grad()
def evaluate_pairs(model, data, rt: Runtime, batch_size: int = 512) -> dict:
    model.eval()
    ids, mask, margins = data
    n = len(margins)
    correct, loss_sum = 0.0, 0.0
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n), device=rt.device)
        c, r = pair_scores(model, ids, mask, idx, n, rt)
        loss, stats = bradley_terry_loss(c, r)
        correct += stats["accuracy"].item() * len(idx)
        loss_sum += loss.item() * len(idx)
    return {"accuracy": correct / n, "loss": loss_sum / n}


def train_reward_model(cfg: Config, comparisons_path: Path, init_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    start = time.time()
    rc = cfg.reward

    # 1. Data: the one contract (rlhfkit.data.contract), one criterion, split by item.
    tokenizer = load_tokenizer(init_dir, "reward.init")
    train, test = load_comparisons(comparisons_path, rc.criterion, rc.heldout_fraction, cfg.seed, tokenizer)

    # 2. Model: the initial backbone (the SFT policy by default) with a fresh scalar head.
    torch.manual_seed(cfg.seed)  # the new head's init
    model = load_scalar_model(init_dir, rt.device, "reward.init")
    train_data = [t.to(rt.device) for t in encode_comparisons(tokenizer, train)]
    test_data = [t.to(rt.device) for t in encode_comparisons(tokenizer, test)]
    if not rc.use_margin:
        train_data[2].zero_()

    # 3. Train with Bradley-Terry, chosen+rejected in one forward.
    n = len(train)
    steps_per_epoch = max(n // rc.batch_size, 1)
    total_steps = steps_per_epoch * rc.epochs
    optimizer, scheduler = make_optimizer(model.parameters(), rc.lr, total_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    log = MetricsLog(out_dir / "metrics.jsonl")
    bar = progress(total_steps, "reward model")
    step = 0
    for _ in range(rc.epochs):
        model.train()
        order = torch.randperm(n, generator=generator).to(rt.device)
        for b in range(steps_per_epoch):
            idx = order[b * rc.batch_size : (b + 1) * rc.batch_size]
            chosen, rejected = pair_scores(model, train_data[0], train_data[1], idx, n, rt)
            loss, stats = bradley_terry_loss(chosen, rejected, train_data[2][idx])
            optimizer_step(loss, model.parameters(), optimizer, scheduler)
            step += 1
            if step % 10 == 0 or step == total_steps:
                log.log({"step": step, "loss/reward": loss.item(), "reward/accuracy": stats["accuracy"].item()})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{stats['accuracy'].item():.2f}", refresh=False)
    bar.close()
    log.close()

    # 4. Held-out accuracy; save with save_pretrained.
    heldout = evaluate_pairs(model, test_data, rt)
    train_eval = evaluate_pairs(model, train_data, rt)
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    return {
        "criterion": train[0].criterion,
        "data": cfg.reward.data or "feedback/comparisons.jsonl",  # what it was trained on, for the report
        "heldout_accuracy": heldout["accuracy"],
        "heldout_loss": heldout["loss"],
        "train_accuracy": train_eval["accuracy"],
        "n_train": len(train),
        "n_heldout": len(test),
        "steps": total_steps,
        "wall_time_s": time.time() - start,
    }
