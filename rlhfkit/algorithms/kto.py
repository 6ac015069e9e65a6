"""Kahneman-Tversky optimisation: the SFT policy learns from thumbs up/down on single completions, unpaired
(Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization").

    r(x, y) = log pi(y|x) / pi_ref(y|x),   z0 = max(0, mean over mismatched pairs (x_i, y_j) of r(x_i, y_j))
    v(x, y) = lambda_D * sigma(beta * (r - z0))   thumbs up,   lambda_U * sigma(beta * (z0 - r))   thumbs down
    loss = mean over the batch of lambda_y - v(x, y)                                              (eq. 8)

log pi(y|x) sums the completion tokens' log-probs (EOS included), as DPO's. pi starts as the SFT policy and is
trained; pi_ref is the SFT policy, frozen. z0, the reference point, estimates KL(pi || pi_ref) from each thumb's
prompt paired with another thumb's completion, and is detached. The loss is `kto_loss` (rlhfkit/ops/losses.py,
KTO_LOSSES); docs/methods/kto.md has the equation, the defaults on digits and the measured numbers.

Data: thumbs (docs/data.md, "Thumb record"): kto.data (thumbs, TRL's unpaired format, or preference pairs, each a
thumb up and a thumb down), else reward.data (read the same way), else the feedback stage's thumbs.jsonl
(feedback.kind = "thumbs"), else its comparisons.jsonl unpaired the same way. Split by item as DPO's comparisons.

Deviations from Ethayarajh et al. (2024):
- The mismatched pairs are drawn once, before training (each thumb's prompt with the completion of the thumb
  before it in a seeded shuffle of its split), not re-drawn per batch; a batch's z0 is the mean over its own
  thumbs' pairs. Fixed pairs let the reference's log-probs of them be cached with the rest (TRL's KTOTrainer
  also fixes them when it builds the data set).
- Reference log-probs are cached by default (`kto.reference = "cached"`, as dpo.reference); the paper's code
  runs the frozen reference every step ("online"). Dropout is off in policy and reference.
- The KL pairs go through the policy in the same forward as the thumbs (with grad; z0 is detached, so they get
  none); the paper's code runs them under no_grad in a second forward. Same numbers.
- AdamW with a linear decay to 10% of `kto.lr`, no warmup (the paper: RMSprop, warmup 150 steps, beta 0.1).
- Held-out evaluation is the loss and the implicit rewards of up- and down-thumbed completions of held-out
  items; the policy's samples are judged by the evaluation stage. Each epoch drops its remainder batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.algorithms import Method
from rlhfkit.algorithms.dpo import cache_key, load_cache, pair_batches, pair_rows, save_cache
from rlhfkit.core.config import F
from rlhfkit.core.runio import tracked
from rlhfkit.data.batching import encode_pairs
from rlhfkit.data.contract import Thumb
from rlhfkit.data.preferences import load_thumbs
from rlhfkit.models.forward import disable_dropout, row_logprobs
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.engine import cat_over_processes, make_engine, my_share, save_pretrained
from rlhfkit.models.optim import make_optimizer
from rlhfkit.models.reference import Reference, policy_and_reference
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.losses import KTO_LOSSES
from rlhfkit.spine.epochs import Epochs, LoopOptions


@dataclass
class KTOConfig:
    """[kto] KTO on thumbs up/down (binary feedback), from the SFT policy (rlhfkit/algorithms/kto.py)."""

    data: str = F("", "Thumbs to learn from, in any format rlhfkit reads as thumbs (its thumbs, TRL's unpaired {prompt, completion, label}, or preference pairs: chosen up, rejected down; docs/data.md); empty = reward.data (read the same way), else the feedback stage's thumbs (feedback.kind = 'thumbs'), else its comparisons unpaired.")
    loss: str = F("kto", "The entry of KTO_LOSSES (rlhfkit/ops/losses.py): 'kto' (Ethayarajh et al. 2024, eq. 8).")
    beta: float = F(0.1, "beta: scale of the implicit reward beta * log(pi / pi_ref) inside the sigmoid (the paper's default 0.1); smaller lets the policy move further from the reference.")
    desirable_weight: float = F(1.0, "lambda_D, the weight of a thumb up's loss. The paper advises lambda_D * n_up / (lambda_U * n_down) in [1, 4/3].")
    undesirable_weight: float = F(1.0, "lambda_U, the weight of a thumb down's loss.")
    epochs: int = F(2, "Passes over the training thumbs.")
    batch_size: int = F(64, "Thumbs per optimiser step (each with its mismatched pair: 2 x batch_size sequences in one forward; z0 is estimated over the batch).")
    lr: float = F(5e-4, "AdamW learning rate (linear decay to 10%); with policy.path, 1e-6 (1e-5 with LoRA) unless set.")
    max_grad_norm: float = F(1.0, "Gradient-norm clip; 0 disables.")
    reference: str = F("cached", "'cached' (reference log-probs of the thumbs and their mismatched pairs computed once before training and reused: OUT/.cache/kto_ref_logprobs.safetensors) or 'online' (a frozen copy of the SFT policy, run every step).")
    heldout_fraction: float = F(0.1, "Share of items (not thumbs) held out to measure the loss and implicit rewards; the same seed and fraction hold out the same items as the reward model and DPO.")
    criterion: str = F("", "The criterion of the thumbs learned from; empty = the data must hold a single criterion.")

    # lr for a pretrained policy.path (full fine-tuning, LoRA): TRL 1.12's KTOConfig.learning_rate, x10 for LoRA.
    PRETRAINED_LR = (1e-6, 1e-5)

    def validate(self, cfg, checks) -> None:
        """[kto]'s rules (`checks`: rlhfkit.core.config.Checks)."""
        need = checks.need
        need(self.loss in KTO_LOSSES, "kto.loss", "choose " + ", ".join(map(repr, KTO_LOSSES)))
        need(self.beta > 0, "kto.beta", "must be > 0 (the implicit reward is beta * log(pi / pi_ref))")
        need(self.desirable_weight > 0, "kto.desirable_weight", "must be > 0 (lambda_D weighs the thumbs up)")
        need(self.undesirable_weight > 0, "kto.undesirable_weight", "must be > 0 (lambda_U weighs the thumbs down)")
        checks.at_least_one("kto.epochs", "kto.batch_size")
        checks.positive("kto.lr")
        need(self.max_grad_norm >= 0, "kto.max_grad_norm", "must be >= 0 (0 disables the clip)")
        need(self.reference in ("cached", "online"), "kto.reference", "choose 'cached' or 'online'")
        need(0.0 < self.heldout_fraction < 1.0, "kto.heldout_fraction", "must be in (0, 1)")
        need(self.criterion != "*", "kto.criterion", "KTO learns one judgement: name one criterion")


# "thumbs": reads thumbs, the feedback stage's unless kto.data names a file (rlhfkit/pipeline/stages.py).
METHOD = Method("kto", KTOConfig, ("sft", "thumbs"),
                (("implicit reward of thumbs up and down", ("rewards/chosen", "rewards/rejected")),
                 ("reference point z0 (KL estimate)", ("kto/kl",)),
                 ("sequence log-probs: healthy runs do not lower both", ("logps/chosen", "logps/rejected"))))


def thumbs_file(cfg, out: Path) -> Path:
    """The thumbs KTO reads: kto.data, else reward.data (the preference data DPO would read, each pair a thumb up
    and a thumb down), else the feedback stage's thumbs (feedback.kind = 'thumbs'), else its comparisons."""
    if cfg.kto.data or cfg.reward.data:
        return Path(cfg.kto.data or cfg.reward.data)
    return out / "feedback" / ("thumbs.jsonl" if cfg.feedback.kind == "thumbs" else "comparisons.jsonl")


def encode_thumbs(tokenizer, thumbs: list[Thumb], seed: int):
    """(2N, T) ids, attention mask, completion mask (encode_pairs' layout), (N,) labels: rows [0, N) the thumbs,
    rows [N, 2N) the mismatched pairs, row N + i = thumb i's prompt with the completion of the thumb before it in a
    seeded shuffle (so pair_rows(data, idx) gives a batch's thumbs and their pairs, as DPO's chosen and rejected)."""
    n = len(thumbs)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    other = {order[j]: order[j - 1] for j in range(n)}  # a cycle: every completion is used once as a mismatch
    prompts = [t.prompt for t in thumbs]
    completions = [t.completion for t in thumbs] + [thumbs[other[i]].completion for i in range(n)]
    seqs = encode_pairs(tokenizer, prompts + prompts, completions)
    return seqs, torch.tensor([t.label for t in thumbs])


def kto_batch_loss(policy, seqs, labels, idx: torch.Tensor, ref_logps: torch.Tensor, kc: KTOConfig, rt: Runtime):
    """One batch's loss and stats: the policy's log-probs of the thumbs and their mismatched pairs (ONE forward of
    2b rows) against the reference's (2b,), through KTO_LOSSES[kc.loss]."""
    logps = row_logprobs(policy, seqs, pair_rows(seqs, idx), rt)  # (2b,): thumbs, then their pairs
    b = len(idx)
    return KTO_LOSSES[kc.loss](logps[:b], ref_logps[:b], rt.put(labels[idx]), logps[b:], ref_logps[b:], kc.beta,
                               kc.desirable_weight, kc.undesirable_weight)


@torch.no_grad()
def evaluate_kto(policy, seqs, labels, reference: Reference, split: str, kc: KTOConfig, rt: Runtime,
                 batch_size: int = 256) -> dict:
    """The loss and stats over every thumb of the split at once (z0 over all its pairs), and the reference's
    log-probs of the up and down thumbs."""
    policy.eval()
    batches = pair_batches(seqs, batch_size)
    mine = [batches[b] for b in my_share(len(batches))]  # this process's rows; every process gets all of them
    logps = cat_over_processes([row_logprobs(policy, seqs, rows, rt)
                                for rows in tracked(mine, f"kto: evaluating ({split})")], rt.device)
    ref = cat_over_processes([reference.rows(split, seqs, rows, rt) for rows in mine], rt.device)
    n, labels = len(labels), rt.put(labels)
    order = rt.put(torch.cat(batches))  # rows in the order forwarded: put them back in row order
    policy_rows, ref_rows = torch.empty_like(logps), torch.empty_like(ref)
    policy_rows[order], ref_rows[order] = logps, ref
    loss, stats = KTO_LOSSES[kc.loss](policy_rows[:n], ref_rows[:n], labels, policy_rows[n:], ref_rows[n:], kc.beta,
                                      kc.desirable_weight, kc.undesirable_weight)
    return {"loss/kto": loss.item(), **{k: v.item() for k, v in stats.items()},
            "ref_logps/chosen": ref_rows[:n][labels].mean().item(), "ref_logps/rejected": ref_rows[:n][~labels].mean().item()}


def train_kto(cfg, thumbs_path: Path, sft_dir: Path, out_dir: Path, rt: Runtime, *, ref_cache: Path | None = None) -> dict:
    """Train the SFT policy in `sft_dir` with KTO on the thumbs of `thumbs_path`; save it in out_dir/model.
    `ref_cache`: where the cached reference log-probs live (default out_dir/ref_logprobs.safetensors)."""
    start = time.time()
    kc = cfg.kto
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. Data: thumbs of one criterion, text the tokenizer covers, both kinds present, split by item; each thumb
    #    encoded with its mismatched pair (the z0 estimate).
    tokenizer = load_tokenizer(sft_dir, "SFT policy")
    train, test = load_thumbs(thumbs_path, kc.criterion, kc.heldout_fraction, cfg.seed, tokenizer, stage="kto")
    encoded, labels = {}, {}
    for split, thumbs in (("train", train), ("heldout", test)):
        encoded[split], labels[split] = encode_thumbs(tokenizer, thumbs, cfg.seed)
    seqs = encoded  # host memory: each batch moved (Runtime.put)

    # 2. Policy: the SFT model, trained (or LoRA adapters on it), dropout off (cached = online reference log-probs).
    policy, online_reference = policy_and_reference(sft_dir, cfg.lora, rt, cfg.seed,
                                                    frozen_copy=kc.reference == "online")
    disable_dropout(policy)

    # 3. Reference: log-probs of every thumb and mismatched pair computed once and cached, or a frozen copy.
    cache_status, cache_forwards, cache_sequences = "none", 0, 0
    if kc.reference == "cached":
        path = Path(ref_cache) if ref_cache is not None else out_dir / "ref_logprobs.safetensors"
        key = cache_key(sft_dir, encoded, rt)
        table = load_cache(path, key, rt.device)
        cache_status = "loaded"
        if table is None:  # the policy has not moved yet: it is the reference
            builder = Reference(model=policy.eval())
            table = {split: builder.table_of(s, pair_batches(s, kc.batch_size), rt, desc=f"kto: reference log-probs ({split})")
                     for split, s in seqs.items()}
            save_cache(path, table, key)
            cache_status, cache_forwards, cache_sequences = "computed", builder.forwards, builder.sequences
        reference = Reference(table=table)
    else:
        reference = online_reference

    # 4. Train: shuffled thumbs, each batch's thumbs and their pairs in one forward, z0 over the batch's pairs.
    n = len(train)
    total_steps = Epochs.count(n, kc.batch_size, kc.epochs)
    optimizer, scheduler = make_optimizer(policy.parameters(), kc.lr, total_steps)
    engine = make_engine({"policy": policy}, optimizer, scheduler, rt.device, accumulation=rt.accumulation,
                         max_grad_norm=kc.max_grad_norm, checkpointing=rt.checkpointing, sharding=rt.sharding)
    engine.check_batch(min(kc.batch_size, n), "kto.batch_size")
    batch_pairs = None  # with micro-batches or processes: the whole batch's pairs' log-probs, for z0

    def batch_loss(rows: torch.Tensor):
        ref_logps = reference.rows("train", seqs["train"], pair_rows(seqs["train"], rows), rt)  # (2r,)
        if batch_pairs is None:
            return kto_batch_loss(policy, seqs["train"], labels["train"], rows, ref_logps, kc, rt)
        r = len(rows)
        return KTO_LOSSES[kc.loss](row_logprobs(policy, seqs["train"], rows, rt), ref_logps[:r],
                                   rt.put(labels["train"][rows]),
                                   *batch_pairs, kc.beta, kc.desirable_weight, kc.undesirable_weight)

    loop = Epochs(engine, n=n, batch_size=kc.batch_size, epochs=kc.epochs, generator=torch.Generator().manual_seed(cfg.seed),
                  desc="kto", log=out_dir / "metrics.jsonl", options=LoopOptions.of(cfg.train),
                  checkpoint=out_dir, eval_loss="loss/kto",
                  evaluate=lambda: evaluate_kto(policy, seqs["heldout"], labels["heldout"], reference, "heldout", kc, rt))
    policy.train()
    for idx in loop:
        if engine.split:  # z0 is detached: the whole batch's estimate, computed once, gives one process's gradient
            with torch.no_grad():
                pairs = idx + n  # rows of the mismatched pairs (encode_thumbs)
                batch_pairs = (row_logprobs(policy, seqs["train"], pairs, rt),
                               reference.rows("train", seqs["train"], pairs, rt))
        out = engine.step(idx, batch_loss)
        # policy = reference at the first step: the mean of lambda_y / 2 (anything else: dropout or a stale cache)
        loop.totals.setdefault("initial_loss", float(out["loss"]))
        loop.done(out, {"loss/kto": out["loss"], **{k: v for k, v in out.items() if k != "loss"}})
    fit = loop.finish()
    initial_loss, total_steps = loop.totals["initial_loss"], fit["steps"]

    # 5. Held-out loss and implicit rewards; save with save_pretrained.
    heldout = evaluate_kto(policy, seqs["heldout"], labels["heldout"], reference, "heldout", kc, rt)
    save_pretrained(policy, tokenizer, out_dir / "model")
    n_up = int(labels["train"].sum())
    return {
        "criterion": train[0].criterion,
        "loss": kc.loss,
        "initial_loss": initial_loss,
        "heldout_loss": heldout["loss/kto"],
        "heldout_rewards_chosen": heldout.get("rewards/chosen"),  # thumbs up (None: the held-out items have none)
        "heldout_rewards_rejected": heldout.get("rewards/rejected"),  # thumbs down
        "heldout_reward_margin": heldout.get("rewards/margins"),
        "heldout_kl": heldout["kto/kl"],  # z0 over the held-out pairs
        "heldout_logps_chosen": heldout.get("logps/chosen"),
        "heldout_logps_rejected": heldout.get("logps/rejected"),
        "n_train": n,
        "n_train_desirable": n_up,
        "n_train_undesirable": n - n_up,
        "n_heldout": len(test),
        "steps": total_steps,
        "reference": kc.reference,
        "reference_cache": cache_status,
        "reference_cache_forwards": cache_forwards,
        "reference_cache_sequences": cache_sequences,
        "passes": {"sampled": 0, "forward": cache_sequences + reference.sequences + len(seqs["heldout"][0]),
                   "backward": 2 * total_steps * kc.batch_size},
        "wall_time_s": time.time() - start,
    }


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point: KTO from OUT's SFT policy on kto.data, reward.data or the feedback stage's thumbs."""
    return train_kto(cfg, thumbs_file(cfg, out), out / "sft" / "model", stage_dir, rt,
                     ref_cache=out / ".cache" / "kto_ref_logprobs.safetensors")
