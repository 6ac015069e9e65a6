"""Direct preference optimisation: the SFT policy learns from comparisons directly, without a reward model or
sampling (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model").

    loss = -log sigma(beta * h),   h = log pi(y_c|x) / pi_ref(y_c|x) - log pi(y_r|x) / pi_ref(y_r|x)      (eq. 7)

log pi(y|x) sums the completion tokens' log-probs (EOS included; prompt and padding excluded). pi starts as the
SFT policy and is trained; pi_ref is the SFT policy, frozen. beta * log(pi / pi_ref) is the implicit reward
whose chosen-vs-rejected accuracy is measured on held-out items. Chosen and rejected go through ONE forward
(stacked on the batch axis). Variants (cDPO, IPO, hinge) are entries of DPO_LOSSES (rlhfkit/ops/losses.py);
docs/methods/dpo.md has the equations.

Deviations from Rafailov et al. (2023):
- Reference log-probs are cached by default (`dpo.reference = "cached"`): computed once before the first step
  and saved beside the run, so no epoch runs a reference forward (TRL's `precompute_ref_log_probs`). The
  paper's code runs the frozen reference every step, which `"online"` does; both give the same numbers.
- Dropout is off in policy and reference (TRL's default), so a cached log-prob equals the online one and the
  loss at step 0 is exactly ln 2.
- AdamW with a linear decay to 10% of `dpo.lr` and no warmup (the paper: RMSprop at 1e-6, warmup over 150
  steps, batch 64, beta 0.1); gradient-norm clip `dpo.max_grad_norm`.
- Evaluation is implicit-reward accuracy and loss on comparisons of held-out items (split as the reward
  model's), not the paper's GPT-4 win rates; the policy's samples are judged by the evaluation stage.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from rlhfkit.algorithms.reward import load_comparisons
from rlhfkit.config import Config, DPOConfig
from rlhfkit.data.batching import encode_pairs
from rlhfkit.data.contract import Comparison
from rlhfkit.models import autocast, disable_dropout, freeze, load_policy, load_tokenizer
from rlhfkit.ops.logprobs import sequence_logprobs
from rlhfkit.ops.losses import DPO_LOSSES
from rlhfkit.runio import MetricsLog, progress
from rlhfkit.training import Runtime, make_optimizer, optimizer_step

CACHE_FILE = "ref_logprobs.safetensors"
CACHE_FORMAT = b"rlhfkit dpo reference log-probs v1\n"  # bump when what the cache holds changes


def encode_dpo_pairs(tokenizer, comparisons: list[Comparison]):
    """(2N, T) ids, attention mask and completion mask (encode_pairs' right-padded layout): the N chosen
    rows first, then the N rejected rows in the same order."""
    prompts = [c.prompt for c in comparisons]
    return encode_pairs(tokenizer, prompts + prompts, [c.chosen for c in comparisons] + [c.rejected for c in comparisons])


def pair_logps(model, data, idx: torch.Tensor, rt: Runtime):
    """(b,) sequence log-probs of chosen and of rejected for comparisons `idx`, in ONE forward."""
    ids, mask, completion_mask = data
    n = len(ids) // 2
    rows = torch.cat([idx, idx + n])  # (2b,): chosen rows, then their rejected rows
    T = int(mask[rows].sum(dim=1).max())  # right padding: columns past the longest row hold only padding
    with autocast(rt.device, rt.dtype):
        logps = sequence_logprobs(model, ids[rows, :T], mask[rows, :T], completion_mask[rows, :T])  # (2b,)
    return logps[: len(idx)], logps[len(idx) :]


def dpo_batch_loss(policy, data, idx: torch.Tensor, ref_chosen, ref_rejected, dc: DPOConfig, rt: Runtime):
    """One batch's loss and stats: the policy's log-probs of chosen and rejected (one forward) against the
    reference's (b,) log-probs of the same comparisons, through DPO_LOSSES[dc.loss]."""
    chosen, rejected = pair_logps(policy, data, idx, rt)
    return DPO_LOSSES[dc.loss](chosen, rejected, ref_chosen, ref_rejected, dc.beta, dc.label_smoothing)


class Reference:
    """pi_ref's sequence log-probs of the comparisons: a frozen model run on demand ("online"), or a table
    {split: (chosen (N,), rejected (N,))} computed once ("cached"). `forwards` counts reference forward
    passes and `pairs` the comparisons they scored, so a test can prove what the cache spares."""

    def __init__(self, model=None, table: dict | None = None):
        assert (model is None) != (table is None), "a reference is a model or a table, not both"
        self.model, self.table = model, table
        self.forwards, self.pairs = 0, 0

    def logps(self, split: str, data, idx: torch.Tensor, rt: Runtime):
        if self.table is not None:
            chosen, rejected = self.table[split]
            return chosen[idx], rejected[idx]
        return self.forward(data, idx, rt)

    @torch.no_grad()
    def forward(self, data, idx: torch.Tensor, rt: Runtime):
        self.forwards += 1
        self.pairs += len(idx)
        return pair_logps(self.model, data, idx, rt)

    def table_of(self, data, batch_size: int, rt: Runtime):
        """(chosen (N,), rejected (N,)) of every comparison in `data`: one pass, in order."""
        n = len(data[0]) // 2
        parts = [self.forward(data, torch.arange(s, min(s + batch_size, n), device=rt.device), rt)
                 for s in range(0, n, batch_size)]
        return torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts])


def cache_key(model_dir: Path, splits: dict, rt: Runtime) -> str:
    """What the cached log-probs depend on: the reference's files, the token ids and masks of every split
    (order included), and how they are computed (device kind, autocast dtype). Same key => same numbers."""
    h = hashlib.sha256(CACHE_FORMAT)
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(model_dir)}\n".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(f"{rt.device.type} {rt.dtype}\n".encode())
    for split, tensors in splits.items():
        h.update(f"{split}\n".encode())
        for t in tensors:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_cache(path: Path, key: str, device: torch.device) -> dict | None:
    """The cached table when `path` holds one made with `key`, else None (missing, stale or unreadable)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            t = {name: f.get_tensor(name).to(device) for name in f.keys()}
        return {split: (t[f"{split}/chosen"], t[f"{split}/rejected"]) for split in ("train", "heldout")}
    except (OSError, KeyError, SafetensorError):
        return None


def save_cache(path: Path, table: dict, key: str) -> None:
    from safetensors.torch import save_file

    tensors = {f"{split}/{side}": t.detach().cpu().contiguous()
               for split, pair in table.items() for side, t in zip(("chosen", "rejected"), pair)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"key": key})
    os.replace(tmp, path)  # a killed run never leaves half a cache under the real name


@torch.no_grad()
def evaluate_dpo(policy, data, reference: Reference, split: str, dc: DPOConfig, rt: Runtime, batch_size: int = 256) -> dict:
    """Means over every comparison of `data`: the loss, the DPO stats and the reference's log-probs."""
    policy.eval()
    n = len(data[0]) // 2
    sums: dict[str, float] = defaultdict(float)
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(s + batch_size, n), device=rt.device)
        ref_chosen, ref_rejected = reference.logps(split, data, idx, rt)
        loss, stats = dpo_batch_loss(policy, data, idx, ref_chosen, ref_rejected, dc, rt)
        means = {"loss/dpo": loss, **stats, "ref_logps/chosen": ref_chosen.mean(), "ref_logps/rejected": ref_rejected.mean()}
        for name, value in means.items():
            sums[name] += value.item() * len(idx)
    return {name: total / n for name, total in sums.items()}


def train_dpo(cfg: Config, comparisons_path: Path, sft_dir: Path, out_dir: Path, rt: Runtime, *,
              ref_cache: Path | None = None) -> dict:
    """Train the SFT policy in `sft_dir` with DPO on the comparisons; save it in out_dir/model. `ref_cache`:
    where the cached reference log-probs live (default out_dir/ref_logprobs.safetensors); a file there made
    from the same reference, data and precision is reused instead of recomputed."""
    start = time.time()
    dc = cfg.dpo
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. Data: the one contract, one criterion (reward.criterion), text the tokenizer covers, split by item.
    tokenizer = load_tokenizer(sft_dir, "SFT policy")
    train, test = load_comparisons(comparisons_path, cfg.reward.criterion, dc.heldout_fraction, cfg.seed, tokenizer,
                                   stage="dpo")
    encoded = {"train": encode_dpo_pairs(tokenizer, train), "heldout": encode_dpo_pairs(tokenizer, test)}
    data = {split: [t.to(rt.device) for t in tensors] for split, tensors in encoded.items()}

    # 2. Policy: the SFT model, trained, dropout off (so cached reference log-probs equal online ones).
    policy = disable_dropout(load_policy(sft_dir, rt.device, "SFT policy"))

    # 3. Reference: log-probs computed once before training and cached, or a frozen copy run every step.
    cache_status, cache_forwards, cache_pairs = "none", 0, 0
    if dc.reference == "cached":
        path = Path(ref_cache) if ref_cache is not None else out_dir / CACHE_FILE
        key = cache_key(sft_dir, encoded, rt)
        table = load_cache(path, key, rt.device)
        cache_status = "loaded"
        if table is None:  # the policy has not moved yet: it is the reference, so no second copy is loaded
            builder = Reference(model=policy.eval())
            table = {split: builder.table_of(data[split], dc.batch_size, rt) for split in ("train", "heldout")}
            save_cache(path, table, key)
            cache_status, cache_forwards, cache_pairs = "computed", builder.forwards, builder.pairs
        reference = Reference(table=table)
    else:
        reference = Reference(model=freeze(disable_dropout(load_policy(sft_dir, rt.device, "reference policy"))))

    # 4. Train: shuffled comparisons, chosen + rejected in one forward, the loss from DPO_LOSSES.
    n = len(train)
    steps_per_epoch = max(n // dc.batch_size, 1)
    total_steps = steps_per_epoch * dc.epochs
    optimizer, scheduler = make_optimizer(policy.parameters(), dc.lr, total_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    log = MetricsLog(out_dir / "metrics.jsonl")
    bar = progress(total_steps, "dpo")
    step, forwards_per_epoch, initial_loss = 0, [], None
    for _ in range(dc.epochs):
        policy.train()
        forwards_before = reference.forwards
        order = torch.randperm(n, generator=generator).to(rt.device)
        for b in range(steps_per_epoch):
            idx = order[b * dc.batch_size : (b + 1) * dc.batch_size]
            ref_chosen, ref_rejected = reference.logps("train", data["train"], idx, rt)  # (b,) each
            loss, stats = dpo_batch_loss(policy, data["train"], idx, ref_chosen, ref_rejected, dc, rt)
            if step == 0:  # policy = reference: ln 2 for 'sigmoid' (anything else: dropout or a stale reference)
                initial_loss = loss.item()
            optimizer_step(loss, policy.parameters(), optimizer, scheduler, dc.max_grad_norm)
            step += 1
            if step % 10 == 0 or step == total_steps:
                log.log({"step": step, "loss/dpo": loss.item(), **{k: v.item() for k, v in stats.items()},
                         "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{stats['rewards/accuracies'].item():.2f}", refresh=False)
        forwards_per_epoch.append(reference.forwards - forwards_before)
    bar.close()
    log.close()

    # 5. Held-out implicit-reward accuracy and loss; save with save_pretrained.
    heldout = evaluate_dpo(policy, data["heldout"], reference, "heldout", dc, rt)
    policy.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    return {
        "criterion": train[0].criterion,
        "loss": dc.loss,
        "initial_loss": initial_loss,
        "heldout_accuracy": heldout["rewards/accuracies"],
        "heldout_loss": heldout["loss/dpo"],
        "heldout_reward_margin": heldout["rewards/margins"],
        "heldout_logps_chosen": heldout["logps/chosen"],
        "heldout_logps_rejected": heldout["logps/rejected"],
        "heldout_ref_logps_chosen": heldout["ref_logps/chosen"],  # the SFT policy's: where training started
        "heldout_ref_logps_rejected": heldout["ref_logps/rejected"],
        "n_train": len(train),
        "n_heldout": len(test),
        "steps": total_steps,
        "reference": dc.reference,
        "reference_cache": cache_status,  # "computed", "loaded" (from an earlier run) or "none" (online)
        "reference_cache_forwards": cache_forwards,
        "reference_cache_pairs": cache_pairs,  # one pass over the data: n_train + n_heldout when computed
        "reference_forwards_per_epoch": forwards_per_epoch,
        "reference_forwards": cache_forwards + reference.forwards,
        "wall_time_s": time.time() - start,
    }


def run(cfg: Config, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/methods.py): DPO from OUT's SFT policy on the run's comparisons
    (reward.data, else the feedback stage's). The reference cache lives beside the stages, keyed by the
    SFT model and the data, so redoing the stage with other [dpo] settings reuses it."""
    comparisons = Path(cfg.reward.data) if cfg.reward.data else out / "feedback" / "comparisons.jsonl"
    return train_dpo(cfg, comparisons, out / "sft" / "model", stage_dir, rt,
                     ref_cache=out / ".cache" / "dpo_ref_logprobs.safetensors")
