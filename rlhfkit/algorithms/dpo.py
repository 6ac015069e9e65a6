"""Direct preference optimisation: the SFT policy learns from comparisons directly, without a reward model or
sampling (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model").

    loss = -log sigma(beta * h),   h = log pi(y_c|x) / pi_ref(y_c|x) - log pi(y_r|x) / pi_ref(y_r|x)      (eq. 7)

log pi(y|x) sums the completion tokens' log-probs (EOS included; prompt and padding excluded). pi starts as the
SFT policy and is trained; pi_ref is the SFT policy, frozen. beta * log(pi / pi_ref) is the implicit reward
whose chosen-vs-rejected accuracy is measured on held-out items. Chosen and rejected go through ONE forward
(stacked on the batch axis). Variants (cDPO, IPO, hinge) are entries of DPO_LOSSES (rlhfkit/ops/losses.py);
docs/methods/dpo.md has the equations.

Without a reference (SimPO and ORPO, REFERENCE_FREE_LOSSES; the methods `simpo` and `orpo`, whose files hold their
config and call train_dpo with their section): the same data, batches, optimiser and evaluation, no reference in
memory and no cache; the losses normalise each sequence log-prob by its completion length.

Over K-way rankings (`dpo.loss = "plackett_luce"`, LISTWISE_DPO_LOSSES; Rafailov et al. App. A.3): the data are
the rankings (rankings.jsonl), batched by item as the Plackett-Luce reward model's (rlhfkit/data/ranked.py): an
item's K completions in ONE forward, each labeler's ranking one Plackett-Luce term over their implicit rewards.
The reference, cache included, works on sequences (rows) either way; held-out accuracy, margin and log-probs
are measured on the held-out items' consensus comparisons, as for the pairwise losses.

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
- Each epoch drops its remainder batch (len(train) % batch_size comparisons, different ones each epoch, as
  the reward model); LoRA's dropout is zeroed with every other dropout.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.algorithms import Method
from rlhfkit.core import dist
from rlhfkit.core.config import F
from rlhfkit.core.runio import tracked
from rlhfkit.data.batching import encode_pairs
from rlhfkit.data.contract import Comparison
from rlhfkit.data.preferences import load_comparisons, load_rankings, preference_files
from rlhfkit.data.ranked import RankedData, encode_ranked_items, to_grid
from rlhfkit.models.forward import disable_dropout, row_logprobs
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.engine import cat_over_processes, make_engine, my_share, save_pretrained, sum_over_processes
from rlhfkit.models.optim import make_optimizer
from rlhfkit.models.reference import Reference, policy_and_reference
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.losses import DPO_LOSSES, LISTWISE_DPO_LOSSES, REFERENCE_FREE_LOSSES, _dpo_stats
from rlhfkit.spine.epochs import Epochs, LoopOptions

CACHE_FILE = "ref_logprobs.safetensors"
CACHE_FORMAT = b"rlhfkit dpo reference log-probs v2\n"  # bump when what the cache holds changes (v2: per row)


@dataclass
class DPOConfig:
    """[dpo] Direct preference optimisation on comparisons, from the SFT policy (rlhfkit/algorithms/dpo.py)."""

    loss: str = F("sigmoid", "'sigmoid' (DPO), 'conservative' (cDPO, with label_smoothing), 'ipo', 'hinge' (SLiC) on comparisons, or 'plackett_luce' on whole K-way rankings; docs/methods/dpo.md.")
    beta: float = F(0.1, "beta: scale of the implicit reward beta * log(pi / pi_ref); smaller lets the policy move further from the reference.")
    label_smoothing: float = F(0.0, "loss = 'conservative' only: assumed probability in [0, 0.5) that a label is flipped.")
    epochs: int = F(2, "Passes over the training comparisons.")
    batch_size: int = F(64, "Comparisons per optimiser step (chosen and rejected go through one forward); plackett_luce: about as many rankings, as whole items (an item's K completions in one forward).")
    lr: float = F(5e-4, "AdamW learning rate (linear decay to 10%); with policy.path, 1e-6 (1e-5 with LoRA) unless set.")
    max_grad_norm: float = F(1.0, "Gradient-norm clip; 0 disables.")
    reference: str = F("cached", "'cached' (reference log-probs computed once before training, saved as OUT/dpo/ref_logprobs.safetensors and reused) or 'online' (a frozen copy of the SFT policy, run every step).")
    heldout_fraction: float = F(0.1, "Share of items (not pairs) held out to measure implicit-reward accuracy; the same seed and fraction hold out the same items as the reward model.")
    criterion: str = F("", "The criterion of the comparisons DPO learns from (one of feedback.criteria, or of reward.data); empty = reward.criterion. Needed when reward.criterion = '*' trains one reward model per criterion.")

    # lr for a pretrained policy.path (full fine-tuning, LoRA): TRL 1.12's DPOConfig.learning_rate, and x10 for LoRA
    # (TRL's dpo.py example: 5e-7 full, 5e-6 LoRA). The 5e-4 above suits a tiny model trained from scratch.
    PRETRAINED_LR = (1e-6, 1e-5)

    def validate(self, cfg, checks) -> None:
        """[dpo]'s rules (`checks`: rlhfkit.core.config.Checks)."""
        need, ref = checks.need, checks.ref
        losses = (*DPO_LOSSES, *LISTWISE_DPO_LOSSES)
        need(self.loss in losses, "dpo.loss", "choose " + ", ".join(map(repr, losses)))
        need(self.beta > 0, "dpo.beta", "must be > 0 (the implicit reward is beta * log(pi / pi_ref))")
        need(self.label_smoothing == 0.0 or self.loss == "conservative", "dpo.label_smoothing",
             f"only the 'conservative' loss (cDPO) models flipped labels, and {ref('dpo.loss')}; set "
             "dpo.loss = 'conservative' or dpo.label_smoothing = 0")
        need(0.0 <= self.label_smoothing < 0.5, "dpo.label_smoothing",
             "must be in [0, 0.5): a label-flip probability (at 0.5 the labels carry no information)")
        checks.at_least_one("dpo.epochs", "dpo.batch_size")
        checks.positive("dpo.lr")
        need(self.max_grad_norm >= 0, "dpo.max_grad_norm", "must be >= 0 (0 disables the clip)")
        need(self.reference in ("cached", "online"), "dpo.reference", "choose 'cached' or 'online'")
        need(0.0 < self.heldout_fraction < 1.0, "dpo.heldout_fraction", "must be in (0, 1)")
        need(self.criterion != "*", "dpo.criterion", "DPO learns one preference: name one criterion")


METHOD = Method("dpo", DPOConfig, ("sft", "feedback"),
                (("implicit reward margin (chosen - rejected)", ("rewards/margins",)),
                 ("implicit reward accuracy", ("rewards/accuracies",)),
                 ("sequence log-probs: healthy runs do not lower both", ("logps/chosen", "logps/rejected"))))


def dpo_criterion(cfg, dc=None) -> str:
    """The criterion of the comparisons DPO (or `dc`, SimPO's or ORPO's section) learns from: its criterion, else
    reward.criterion."""
    return (dc or cfg.dpo).criterion or cfg.reward.criterion


def encode_dpo_pairs(tokenizer, comparisons: list[Comparison]):
    """(2N, T) ids, attention mask and completion mask (encode_pairs' right-padded layout): the N chosen
    rows first, then the N rejected rows in the same order."""
    prompts = [c.prompt for c in comparisons]
    return encode_pairs(tokenizer, prompts + prompts, [c.chosen for c in comparisons] + [c.rejected for c in comparisons])


def pair_rows(data, idx: torch.Tensor) -> torch.Tensor:
    """(2b,) rows of comparisons `idx` in encode_dpo_pairs' layout: chosen rows, then their rejected rows."""
    return torch.cat([idx, idx + len(data[0]) // 2])


def ref_pair_logps(reference: Reference, split: str, data, idx: torch.Tensor, rt: Runtime):
    """(chosen (b,), rejected (b,)) reference log-probs of comparisons `idx` of encode_dpo_pairs' `data`."""
    logps = reference.rows(split, data, pair_rows(data, idx), rt)
    return logps[: len(idx)], logps[len(idx) :]


def pair_logps(model, data, idx: torch.Tensor, rt: Runtime):
    """(b,) sequence log-probs of chosen and of rejected for comparisons `idx`, in ONE forward."""
    logps = row_logprobs(model, data, pair_rows(data, idx), rt)  # (2b,)
    return logps[: len(idx)], logps[len(idx) :]


def dpo_batch_loss(policy, data, idx: torch.Tensor, ref_chosen, ref_rejected, dc: DPOConfig, rt: Runtime):
    """One batch's loss and stats: the policy's log-probs of chosen and rejected (one forward) against the
    reference's (b,) log-probs of the same comparisons, through DPO_LOSSES[dc.loss]."""
    chosen, rejected = pair_logps(policy, data, idx, rt)
    return DPO_LOSSES[dc.loss](chosen, rejected, ref_chosen, ref_rejected, dc.beta, dc.label_smoothing)


def completion_lengths(data, idx: torch.Tensor):
    """(chosen (b,), rejected (b,)) completion lengths in tokens (EOS included) of comparisons `idx`."""
    lengths = data[2][pair_rows(data, idx)].sum(-1)  # (2b,)
    return lengths[: len(idx)], lengths[len(idx) :]


def reference_free_batch_loss(policy, data, idx: torch.Tensor, dc, rt: Runtime):
    """One batch's loss and stats without a reference: the policy's log-probs of chosen and rejected (one forward)
    and their completion lengths, through REFERENCE_FREE_LOSSES[dc.loss] (gamma: SimPO's target margin)."""
    chosen, rejected = pair_logps(policy, data, idx, rt)
    return REFERENCE_FREE_LOSSES[dc.loss](chosen, rejected, *map(rt.put, completion_lengths(data, idx)), dc.beta,
                                          getattr(dc, "gamma", 0.0))


def listwise_batch_loss(policy, data: RankedData, items: torch.Tensor, reference: Reference, split: str,
                        dc: DPOConfig, rt: Runtime):
    """One batch of items' loss and stats over every ranking of them: the policy's log-probs of the items' K
    completions (one forward) and the reference's, through LISTWISE_DPO_LOSSES[dc.loss]."""
    rows, present, ranks, owner = data.batch(items)
    policy_logps = row_logprobs(policy, data.seqs, rows, rt)  # (F,)
    ref_logps = reference.rows(split, data.seqs, rows, rt)  # (F,)
    present, ranks, owner = rt.put(present), rt.put(ranks), rt.put(owner)  # the host's, as the data
    return LISTWISE_DPO_LOSSES[dc.loss](to_grid(policy_logps, present)[owner], to_grid(ref_logps, present)[owner],
                                        ranks, dc.beta)  # (R, K) each: an item's log-probs once per ranking of it


def pair_batches(data, batch_size: int) -> list[torch.Tensor]:
    """The rows of every comparison of `data`, batch_size comparisons a batch (chosen rows, then their rejected
    rows: as a training step forwards them)."""
    n = len(data[0]) // 2
    return [pair_rows(data, idx) for idx in torch.arange(n, device=data[0].device).split(batch_size)]


def cache_key(model_dir: Path, splits: dict, rt: Runtime) -> str:
    """What the cached log-probs depend on: the reference's files, the token ids and masks of every split
    (order included), and how they are computed (device kind, autocast dtype, padded, packed or prefixes shared). Same key => same
    numbers."""
    h = hashlib.sha256(CACHE_FORMAT)
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(model_dir)}\n".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    packed = " shared" if rt.shared_prefix else " packed" if rt.padding_free else ""
    h.update(f"{rt.device.type} {rt.dtype}{packed}\n".encode())  # old keys unchanged
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
        return {split: t[f"{split}/logps"] for split in ("train", "heldout")}
    except (OSError, KeyError, SafetensorError):
        return None


def save_cache(path: Path, table: dict, key: str) -> None:
    """Write the reference log-probs (by the main process only: every rank computed the same table)."""
    from safetensors.torch import save_file

    if not dist.is_main_process():
        return

    tensors = {f"{split}/logps": t.detach().cpu().contiguous() for split, t in table.items()}  # (M,) per split
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"key": key})
    os.replace(tmp, path)  # a killed run never leaves half a cache under the real name


@torch.no_grad()
def evaluate_dpo(policy, data, reference: Reference | None, split: str, dc, rt: Runtime, batch_size: int = 256) -> dict:
    """Means over every comparison of `data`: the loss, the DPO stats and the reference's log-probs (none without a
    reference: SimPO, ORPO)."""
    policy.eval()
    n = len(data[0]) // 2
    sums: dict[str, float] = defaultdict(float)
    stage = dc.loss if reference is None else "dpo"  # simpo and orpo: their losses' names
    starts = range(0, n, batch_size)
    for b in tracked(my_share(len(starts)), f"{stage}: evaluating ({split})"):  # this process's batches
        idx = torch.arange(starts[b], min(starts[b] + batch_size, n))
        if reference is None:  # SimPO, ORPO
            loss, stats = reference_free_batch_loss(policy, data, idx, dc, rt)
            means = {"loss/dpo": loss, **stats}
        else:
            ref_chosen, ref_rejected = ref_pair_logps(reference, split, data, idx, rt)
            loss, stats = dpo_batch_loss(policy, data, idx, ref_chosen, ref_rejected, dc, rt)
            means = {"loss/dpo": loss, **stats, "ref_logps/chosen": ref_chosen.mean(),
                     "ref_logps/rejected": ref_rejected.mean()}
        for name, value in means.items():
            sums[name] += value.item() * len(idx)
    return {name: total / n for name, total in sum_over_processes(dict(sums)).items()}  # over the processes


@torch.no_grad()
def evaluate_listwise(policy, data: RankedData, pairs: torch.Tensor, reference: Reference, split: str, dc: DPOConfig,
                      rt: Runtime, rows_per_forward: int = 512) -> dict:
    """evaluate_dpo's figures for a listwise loss: the loss over every ranking of `data`'s items, and the DPO
    stats and reference log-probs over the comparisons `pairs` ((P, 2) rows of chosen and rejected), so that
    they mean what they mean for the pairwise losses."""
    policy.eval()
    all_rows = torch.arange(len(data.seqs[0])).split(rows_per_forward)
    mine = [all_rows[b] for b in my_share(len(all_rows))]  # this process's rows; every process gets all of them
    policy_logps = cat_over_processes([row_logprobs(policy, data.seqs, rows, rt)
                                       for rows in tracked(mine, f"dpo: evaluating ({split})")], rt.device)  # (M,)
    ref_logps = cat_over_processes([reference.rows(split, data.seqs, rows, rt) for rows in mine], rt.device)  # (M,)
    rows, present, ranks, owner = data.batch(torch.arange(len(data.rows)))
    present, ranks, owner = rt.put(present), rt.put(ranks), rt.put(owner)
    grid = lambda logps: to_grid(logps[rows], present)[owner]  # noqa: E731  (R, K)
    loss, _ = LISTWISE_DPO_LOSSES[dc.loss](grid(policy_logps), grid(ref_logps), ranks, dc.beta)
    chosen, rejected = pairs[:, 0], pairs[:, 1]
    stats = _dpo_stats(policy_logps[chosen], policy_logps[rejected], ref_logps[chosen], ref_logps[rejected], dc.beta)
    means = {"loss/dpo": loss, **stats, "ref_logps/chosen": ref_logps[chosen].mean(),
             "ref_logps/rejected": ref_logps[rejected].mean()}
    return {name: value.item() for name, value in means.items()}


def train_dpo(cfg, comparisons_path: Path | None, sft_dir: Path, out_dir: Path, rt: Runtime, *,
              ref_cache: Path | None = None, rankings_path: Path | None = None, section: str = "dpo") -> dict:
    """Train the SFT policy in `sft_dir` with DPO on the comparisons (a listwise dpo.loss: on the rankings, the
    comparisons, when given, measuring it); save it in out_dir/model. `ref_cache`: where the cached reference
    log-probs live (default out_dir/ref_logprobs.safetensors); a file there made from the same reference, data
    and precision is reused instead of recomputed. `section`: the config section trained by, [dpo] or a
    reference-free method's ([simpo], [orpo]: no reference at all)."""
    start = time.time()
    dc = getattr(cfg, section)
    listwise = dc.loss in LISTWISE_DPO_LOSSES
    reference_free = dc.loss in REFERENCE_FREE_LOSSES
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. Data: the one contract, one criterion (dpo.criterion, else reward.criterion), text the tokenizer covers,
    #    split by item.
    #    Pairwise: comparisons, encoded as chosen rows then rejected rows. Listwise: items (rankings), their
    #    completions as rows, and the held-out comparisons as pairs of those rows.
    tokenizer = load_tokenizer(sft_dir, "SFT policy")
    if listwise:
        train_split, test_split = load_rankings(rankings_path, comparisons_path, dpo_criterion(cfg, dc),
                                                dc.heldout_fraction, cfg.seed, tokenizer, stage=section)
        train, test = train_split.comparisons, test_split.comparisons
        ranked = {"train": encode_ranked_items(tokenizer, [it for it in train_split.items if it.rankings]),
                  "heldout": encode_ranked_items(tokenizer, test_split.items)}
        encoded = {split: r.seqs for split, r in ranked.items()}
        data = ranked  # host memory: each batch moved (Runtime.put)
        seqs = {split: d.seqs for split, d in data.items()}
        heldout_pairs = data["heldout"].comparison_rows(test)
    else:
        train, test = load_comparisons(comparisons_path, dpo_criterion(cfg, dc), dc.heldout_fraction, cfg.seed,
                                       tokenizer, stage=section)
        encoded = {"train": encode_dpo_pairs(tokenizer, train), "heldout": encode_dpo_pairs(tokenizer, test)}
        data = seqs = encoded  # host memory: each batch moved (Runtime.put)

    # 2. Policy: the SFT model, trained (or, with LoRA, adapters on it), dropout off (so cached reference
    #    log-probs equal online ones).
    #    With dpo.reference = "online", the reference comes with it (rlhfkit.models.reference: a frozen copy, or the
    #    LoRA policy with its adapter disabled); "cached" computes its table from the untrained policy (step 3).
    policy, online_reference = policy_and_reference(sft_dir, cfg.lora, rt, cfg.seed,
                                                    frozen_copy=not reference_free and dc.reference == "online")
    disable_dropout(policy)

    # 3. Reference: log-probs computed once before training and cached, or a frozen copy run every step; none for
    #    SimPO and ORPO.
    cache_status, cache_forwards, cache_sequences = "none", 0, 0
    if reference_free:
        reference = None
    elif dc.reference == "cached":
        path = Path(ref_cache) if ref_cache is not None else out_dir / CACHE_FILE
        key = cache_key(sft_dir, encoded, rt)
        table = load_cache(path, key, rt.device)
        cache_status = "loaded"
        if table is None:  # the policy has not moved yet: it is the reference, so no second copy is loaded
            builder = Reference(model=policy.eval())
            batches = {split: (torch.arange(len(s[0])).split(2 * dc.batch_size) if listwise
                               else pair_batches(s, dc.batch_size)) for split, s in seqs.items()}
            table = {split: builder.table_of(seqs[split], batches[split], rt, desc=f"dpo: reference log-probs ({split})")
                     for split in ("train", "heldout")}
            save_cache(path, table, key)
            cache_status, cache_forwards, cache_sequences = "computed", builder.forwards, builder.sequences
        reference = Reference(table=table)
    else:
        reference = online_reference

    # 4. Train: shuffled comparisons, chosen + rejected in one forward, the loss from DPO_LOSSES; or shuffled
    #    items, their K completions in one forward, every ranking of them a term of LISTWISE_DPO_LOSSES.
    def batch_loss(idx: torch.Tensor):
        if reference_free:
            return reference_free_batch_loss(policy, data["train"], idx, dc, rt)
        if listwise:
            return listwise_batch_loss(policy, data["train"], idx, reference, "train", dc, rt)
        ref_chosen, ref_rejected = ref_pair_logps(reference, "train", data["train"], idx, rt)  # (b,) each
        return dpo_batch_loss(policy, data["train"], idx, ref_chosen, ref_rejected, dc, rt)

    n = len(data["train"].rows) if listwise else len(train)
    batch_size = data["train"].items_per_batch(dc.batch_size) if listwise else dc.batch_size  # ~batch_size rankings
    total_steps = Epochs.count(n, batch_size, dc.epochs)
    optimizer, scheduler = make_optimizer(policy.parameters(), dc.lr, total_steps)
    engine = make_engine({"policy": policy}, optimizer, scheduler, rt.device, accumulation=rt.accumulation,
                         max_grad_norm=dc.max_grad_norm, checkpointing=rt.checkpointing, sharding=rt.sharding)
    engine.check_batch(min(batch_size, n), f"{section}.batch_size")
    # a listwise loss is a mean over rankings: a micro-batch of items weighs by its rankings
    units = (lambda items: (data["train"].ranks[items] >= 0).any(-1).sum()) if listwise else None  # noqa: E731

    def evaluate() -> dict:
        if listwise:
            return evaluate_listwise(policy, data["heldout"], heldout_pairs, reference, "heldout", dc, rt)
        return evaluate_dpo(policy, data["heldout"], reference, "heldout", dc, rt, dc.batch_size)

    loop = Epochs(engine, n=n, batch_size=batch_size, epochs=dc.epochs, generator=torch.Generator().manual_seed(cfg.seed),
                  desc=section, log=out_dir / "metrics.jsonl", options=LoopOptions.of(cfg.train),
                  checkpoint=out_dir, evaluate=evaluate, eval_loss="loss/dpo")
    ref_counts = reference if reference is not None else Reference(table={})  # forwards, sequences: none without one
    counts = loop.totals  # kept in the checkpoint: a resumed run reports the whole run's figures
    policy.train()
    for idx in loop:
        out = engine.step(idx, batch_loss, units)
        # policy = reference at the first step: ln 2 for 'sigmoid', mean log(# orders) for 'plackett_luce' (anything
        # else: dropout or a stale reference)
        counts.setdefault("initial_loss", float(out["loss"]))
        counts["sequences"] = counts.get("sequences", 0) + (
            (data["train"].rows[idx] >= 0).sum() if listwise else 2 * len(idx))  # no device sync
        loop.done(out, {"loss/dpo": out["loss"], **{k: v for k, v in out.items() if k != "loss"}})
        if loop.step % loop.steps_per_epoch == 0:
            epochs = counts.setdefault("forwards_per_epoch", [])
            epochs.append(ref_counts.forwards - sum(epochs))
    fit = loop.finish()
    initial_loss, trained_sequences, forwards_per_epoch = counts["initial_loss"], counts["sequences"], counts.get("forwards_per_epoch", [])

    # 5. Held-out implicit-reward accuracy and loss; save with save_pretrained.
    heldout = evaluate()
    save_pretrained(policy, tokenizer, out_dir / "model")
    return {
        "criterion": train[0].criterion,
        "loss": dc.loss,
        "initial_loss": initial_loss,
        "heldout_accuracy": heldout["rewards/accuracies"],
        "heldout_loss": heldout["loss/dpo"],
        "heldout_reward_margin": heldout["rewards/margins"],
        "heldout_logps_chosen": heldout["logps/chosen"],
        "heldout_logps_rejected": heldout["logps/rejected"],
        "heldout_ref_logps_chosen": heldout.get("ref_logps/chosen"),  # the SFT policy's: where training started
        "heldout_ref_logps_rejected": heldout.get("ref_logps/rejected"),  # (None without a reference)
        "n_train": len(train),  # comparisons (listwise: those of the training items, which it does not train on)
        "n_heldout": len(test),
        **({"n_train_items": n, "n_train_rankings": int((data["train"].ranks >= 0).any(-1).sum()),
            "n_heldout_rankings": int((data["heldout"].ranks >= 0).any(-1).sum())} if listwise else {}),
        "steps": fit["steps"],
        "reference": "none" if reference_free else dc.reference,
        "reference_cache": cache_status,  # "computed", "loaded" (from an earlier run) or "none" (online)
        "reference_cache_forwards": cache_forwards,
        "reference_cache_sequences": cache_sequences,  # one pass over every split's sequences when computed
        "reference_forwards_per_epoch": forwards_per_epoch,
        "reference_forwards": cache_forwards + ref_counts.forwards,
        # sequences through a model (chosen and rejected count one each): the compute the comparison reports
        "passes": {"sampled": 0, "forward": cache_sequences + ref_counts.sequences + len(seqs["heldout"][0]),
                   "backward": int(trained_sequences)},
        "wall_time_s": time.time() - start,
    }


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/algorithms/__init__.py): DPO from OUT's SFT policy on the run's comparisons, or
    rankings for a listwise dpo.loss (reward.data, else the feedback stage's). The reference cache lives beside
    the stages, keyed by the SFT model and the data, so redoing the stage with other [dpo] settings reuses it."""
    comparisons, rankings = preference_files(cfg, out, cfg.dpo.loss)
    return train_dpo(cfg, comparisons, out / "sft" / "model", stage_dir, rt, rankings_path=rankings,
                     ref_cache=out / ".cache" / "dpo_ref_logprobs.safetensors")
