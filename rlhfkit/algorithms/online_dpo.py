"""Online (iterative) DPO: sample pairs from the current policy, label them with the reward, update with DPO,
repeat (Xu et al. 2023, "Some things are more cringe than others: iterative preference optimization with the
pairwise cringe loss"; Guo et al. 2024, "Direct language model alignment from online AI feedback"; Llama 3,
Dubey et al. 2024, Sec. 4; Dong et al. 2024, "RLHF workflow: from reward modeling to online RLHF").
Each iteration:

    1. sample K completions for each of n_prompts new prompts from the current policy; score them with the run's
       reward (the reward model, reward.sources: Python functions, the AI judge, ...); the KL of the set to the
       SFT policy (rlhfkit.spine.self_training, the rollout code every online method uses)
    2. pairs: each prompt's best and worst ended completions by the reward, when they differ by more than
       min_score_gap (rlhfkit.ops.selection.best_worst_pairs; ties give no pair); written as contract comparisons
    3. reference log-probs of the pairs, computed once: the SFT policy (reference = "sft"), or the policy as it
       is at the start of the iteration (reference = "previous")
    4. `epochs` passes of DPO over the pairs (DPO_LOSSES[loss], chosen and rejected in one forward, a fresh AdamW)
    5. write STAGE/iter-N/ (comparisons.jsonl, samples.jsonl, metrics.jsonl of the DPO steps, model/), log the
       iteration, mark it complete: a killed run resumes at the iteration it was in

    loss = -log sigma(beta * h),  h = log pi(y_c|x) / pi_ref(y_c|x) - log pi(y_r|x) / pi_ref(y_r|x)   (DPO, eq. 7)

with (y_c, y_r) = the best and the worst of K samples of pi_{t-1} by the reward r, and pi_ref = pi_SFT (TRL's
OnlineDPOTrainer, Guo et al.) or pi_{t-1} (iterative DPO as rounds: each iteration a DPO stage of its own, from and
anchored to the model it starts from, as Xu et al.'s iterations and Llama 3's rounds start from the last model).
docs/methods/online_dpo.md has the loop, the metrics and the numbers on digits.

Deviations from the sources, on purpose:
- Iterations of a fixed number of prompts with `epochs` passes over their pairs (Xu et al., Llama 3), not one
  gradient step per freshly sampled batch (Guo et al., TRL): both are on-policy at the start of each iteration.
- The pair is the best vs the worst of K by the reward ("RLHF workflow"); Guo et al. and TRL sample two and let
  the judge order them, which is k = 2 here; Llama 3's pairs are two models' responses ordered by annotators.
- A response without EOS is never in a pair (rlhfkit.ops.selection's rule; TRL penalises its score instead), and
  a pair of identical texts is dropped (a tie, however the scorer's rounding fell). A prompt without a usable
  pair gives nothing: `selection/kept_fraction` is the share that gave one.
- Each iteration trains with a fresh AdamW (linear decay to 10%), from the policy the last one left, on its own
  pairs only; Llama 3 adds an NLL term on the chosen responses (and model averaging), which this does not.
- Dropout is off (as in rlhfkit's DPO), so with reference = "previous" the first step's loss is exactly ln 2.
- The reward is the run's reward model (or reward.sources), not a GPT-4-class judge; an AI judge comes in as a
  reward source (kind = 'judge').
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.algorithms import Method
from rlhfkit.algorithms.dpo import dpo_batch_loss, encode_dpo_pairs, pair_batches, ref_pair_logps
from rlhfkit.core import dist
from rlhfkit.core.config import F
from rlhfkit.core.errors import RlhfkitError
from rlhfkit.core.runio import progress
from rlhfkit.data.contract import Comparison, prompt_item_id, write_jsonl
from rlhfkit.models.forward import disable_dropout
from rlhfkit.models.engine import make_engine
from rlhfkit.models.optim import make_optimizer
from rlhfkit.models.reference import Reference
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.losses import DPO_LOSSES
from rlhfkit.ops.selection import best_worst_pairs
from rlhfkit.spine.self_training import RoundContext, RoundResult, grow_metrics, run_rounds, write_samples

REFERENCES = ("sft", "previous")


@dataclass
class OnlineDPOConfig:
    """[online_dpo] Online (iterative) DPO: pairs sampled from the current policy and labelled by the reward, one DPO update per iteration (rlhfkit/algorithms/online_dpo.py)."""

    iterations: int = F(4, "Iterations of sample -> label the best and worst by the reward -> DPO; each samples from the policy the previous one left.")
    n_prompts: int = F(256, "Prompts per iteration (new ones each iteration, from the task's training prompts).")
    k: int = F(4, "Completions sampled per prompt; the pair is the best and the worst of them by the reward (k = 2: TRL's online DPO, two samples ordered by the reward).")
    min_score_gap: float = F(0.0, "A prompt gives a pair only when its best score exceeds its worst by more than this (>= 0; 0 skips exact ties only); a response without EOS is never in a pair.")
    temperature: float = F(1.0, "Sampling temperature.")
    loss: str = F("sigmoid", "The DPO loss on each pair, one of rlhfkit.ops.losses.DPO_LOSSES: 'sigmoid' (DPO), 'conservative' (cDPO, with label_smoothing), 'ipo', 'hinge'; docs/methods/dpo.md.")
    beta: float = F(0.1, "beta: scale of the implicit reward beta * log(pi / pi_ref); smaller lets the policy move further from the reference.")
    label_smoothing: float = F(0.0, "loss = 'conservative' only: assumed probability in [0, 0.5) that a pair's order is wrong.")
    reference: str = F("sft", "pi_ref: 'sft' (the SFT policy throughout, as TRL's OnlineDPOTrainer and Guo et al.) or 'previous' (the policy as each iteration starts: iterative DPO, each iteration a DPO stage anchored to the model it starts from).")
    epochs: int = F(2, "Passes over an iteration's pairs.")
    batch_size: int = F(32, "Pairs per optimiser step (chosen and rejected in one forward); an epoch drops its remainder, fewer pairs than this make one step on all of them.")
    lr: float = F(5e-4, "AdamW learning rate of each iteration's DPO (a fresh optimiser per iteration, linear decay to 10%); with policy.path, 5e-7 (5e-6 with LoRA) unless set.")
    max_grad_norm: float = F(1.0, "Gradient-norm clip; 0 disables.")

    # lr for a pretrained policy.path (full fine-tuning, LoRA): TRL's online DPO example (examples/scripts/
    # dpo_online.py: 5e-7, and 5e-6 with LoRA). The 5e-4 above suits a tiny model trained from scratch.
    PRETRAINED_LR = (5e-7, 5e-6)

    def validate(self, cfg, checks) -> None:
        """[online_dpo]'s rules (`checks`: rlhfkit.core.config.Checks)."""
        need, ref = checks.need, checks.ref
        checks.at_least_one("online_dpo.iterations", "online_dpo.n_prompts", "online_dpo.epochs",
                            "online_dpo.batch_size")
        need(self.k >= 2, "online_dpo.k", "must be at least 2: a pair needs two samples of a prompt")
        need(self.min_score_gap >= 0, "online_dpo.min_score_gap",
             "must be >= 0 (0 skips exact ties only; a pair's chosen must score above its rejected)")
        checks.positive("online_dpo.lr", "online_dpo.temperature")
        need(self.loss in DPO_LOSSES, "online_dpo.loss", "choose " + ", ".join(map(repr, DPO_LOSSES)))
        need(self.beta > 0, "online_dpo.beta", "must be > 0 (the implicit reward is beta * log(pi / pi_ref))")
        need(self.label_smoothing == 0.0 or self.loss == "conservative", "online_dpo.label_smoothing",
             f"only the 'conservative' loss (cDPO) models flipped labels, and {ref('online_dpo.loss')}; set "
             "online_dpo.loss = 'conservative' or online_dpo.label_smoothing = 0")
        need(0.0 <= self.label_smoothing < 0.5, "online_dpo.label_smoothing",
             "must be in [0, 0.5): a label-flip probability (at 0.5 the labels carry no information)")
        need(self.reference in REFERENCES, "online_dpo.reference",
             "choose 'sft' (the SFT policy throughout) or 'previous' (the policy at the start of each iteration)")
        need(self.max_grad_norm >= 0, "online_dpo.max_grad_norm", "must be >= 0 (0 disables the clip)")


METHOD = Method(
    "online_dpo", OnlineDPOConfig, ("sft", "reward"),
    (("reward: sampled set, chosen and rejected", ("objective/scores", "selection/chosen_scores",
                                                   "selection/rejected_scores")),
     ("DPO on the iteration's pairs: loss and implicit-reward accuracy", ("loss/dpo", "rewards/accuracies")),
     ("gold metrics of the sampled set", ("gold/*",)),
     ("KL(policy || SFT) of the sampled set, nats", ("objective/kl_k1",))),
    resumable=True, step_label="iteration")


def train_online_dpo(cfg, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """Run cfg.online_dpo.iterations iterations into out_dir, resuming after the last complete one."""
    oc = cfg.online_dpo
    criterion = cfg.reward.criterion if cfg.reward.criterion != "*" else "overall"

    def improve(ctx: RoundContext) -> RoundResult:
        g, n, policy = ctx.grow, ctx.n, ctx.policy
        disable_dropout(policy)  # the reference's log-probs must be what the policy computes before its first step

        # 2. Pairs: each prompt's best and worst ended sample by the reward; ties and identical texts give none.
        chosen, rejected = best_worst_pairs(g.scores, g.ended, g.group, oc.min_score_gap)  # (P,) rows each
        pairs = [(c, r) for c, r in zip(chosen.tolist(), rejected.tolist()) if g.texts[c] != g.texts[r]]
        role = [""] * len(g.texts)
        for c, r in pairs:
            role[c], role[r] = "chosen", "rejected"
        write_samples(ctx.dir / "samples.jsonl", g, pair=role)
        comparisons = [Comparison(prompt_item_id(g.prompts[c]), g.prompts[c], g.texts[c], g.texts[r],
                                  labeler_ids=["reward"], criterion=criterion) for c, r in pairs]
        if dist.is_main_process():
            write_jsonl(ctx.dir / "comparisons.jsonl", comparisons)
        if not pairs:
            raise RlhfkitError(
                f"online DPO iteration {n}: none of the {oc.n_prompts} prompts gave a pair (two ended samples whose "
                f"scores differ by more than online_dpo.min_score_gap = {oc.min_score_gap}; {int(g.ended.sum())} of "
                f"{len(g.texts)} samples ended with EOS); raise online_dpo.k or online_dpo.temperature, or lower "
                "online_dpo.min_score_gap")
        c_rows, r_rows = (torch.tensor(rows, device=g.scores.device) for rows in zip(*pairs))  # (P,) each

        # 3. Reference log-probs of every pair, once: the SFT policy, or the policy as the iteration starts.
        data = encode_dpo_pairs(ctx.tokenizer, comparisons)  # (2P, T) chosen, rejected; host memory (Runtime.put)
        source = ctx.reference if oc.reference == "sft" else Reference(model=policy.eval())
        reference = Reference(table={"train": source.table_of(data, pair_batches(data, oc.batch_size), rt)})

        # 4. DPO: `epochs` shuffled passes, chosen and rejected in one forward, a fresh AdamW.
        n_pairs = len(pairs)
        steps_per_epoch = max(n_pairs // oc.batch_size, 1)
        total = oc.epochs * steps_per_epoch
        optimizer, scheduler = make_optimizer(policy.parameters(), oc.lr, total)
        # under several processes each takes its share of every batch (DDP; a per-iteration optimiser is not sharded)
        engine = make_engine({"policy": policy}, optimizer, scheduler, rt.device, accumulation=rt.accumulation,
                             max_grad_norm=oc.max_grad_norm, checkpointing=rt.checkpointing)
        engine.check_batch(min(oc.batch_size, n_pairs), "online_dpo.batch_size")

        def batch_loss(rows: torch.Tensor):
            ref_chosen, ref_rejected = ref_pair_logps(reference, "train", data, rows, rt)  # (r,) each
            return dpo_batch_loss(policy, data, rows, ref_chosen, ref_rejected, oc, rt)

        order_gen = torch.Generator().manual_seed(ctx.seed("order"))
        sums: dict[str, float] = defaultdict(float)  # each DPO figure's mean over the iteration's steps
        initial_loss = float("nan")
        bar = progress(total, f"online_dpo iter {n}: dpo on {n_pairs} pairs")
        policy.train()
        step = 0
        for _ in range(oc.epochs):
            order = torch.randperm(n_pairs, generator=order_gen)  # host indices into host data
            for b in range(steps_per_epoch):
                out = engine.step(order[b * oc.batch_size : (b + 1) * oc.batch_size], batch_loss)
                loss, stats = out.pop("loss"), out
                if step == 0:  # before any update: ln 2 for 'sigmoid' when pi_ref is the policy as it is now
                    initial_loss = loss.item()
                step += 1
                line = {"loss/dpo": loss.item(), **{k: v.item() for k, v in stats.items()}}
                ctx.log.log({"step": step, **line, "lr": scheduler.get_last_lr()[0]})
                for key, v in line.items():
                    sums[key] += v / total
                bar.update(1)
                bar.set_postfix(loss=f"{line['loss/dpo']:.3f}", acc=f"{line['rewards/accuracies']:.2f}", refresh=False)
        bar.close()

        # 5. The iteration's line: the sampled set (before this iteration's update), its pairs, DPO's means.
        record = {
            "step": n,
            **grow_metrics(g, task),
            "selection/kept_fraction": n_pairs / oc.n_prompts,
            "selection/chosen_scores": g.scores[c_rows].mean().item(),
            "selection/rejected_scores": g.scores[r_rows].mean().item(),
            "loss/dpo_initial": initial_loss,
            **sums,
        }
        return RoundResult([record], total, total * 2 * min(oc.batch_size, n_pairs),
                           {"score": f"{record['objective/scores']:.2f}", "pairs": f"{n_pairs}",
                            "loss": f"{record['loss/dpo']:.3f}"}, forward=2 * n_pairs)  # the reference's pass

    # 1-5. Iterations of sampling K per prompt (rlhfkit.spine.self_training), pairs and DPO (above), save.
    previous, summary = run_rounds(cfg, task, sft_dir, rm_dir, out_dir, rt, name="online_dpo", prefix="iter",
                                   rounds=oc.iterations, lines_per_round=1, n_prompts=oc.n_prompts, k=oc.k,
                                   temperature=oc.temperature, unit="iteration", improve=improve)
    records = [p["records"][0] for p in previous]
    return {
        "iterations": oc.iterations,
        "reference": oc.reference,
        "pairs": [round(r["selection/kept_fraction"] * oc.n_prompts) for r in records],
        "kept": [r["selection/kept_fraction"] for r in records],
        "chosen_scores": [r["selection/chosen_scores"] for r in records],
        "rejected_scores": [r["selection/rejected_scores"] for r in records],
        "initial_loss": [r["loss/dpo_initial"] for r in records],
        "loss": [r["loss/dpo"] for r in records],
        "accuracy": [r["rewards/accuracies"] for r in records],
        "kl": [r["objective/kl_k1"] for r in records],
        **summary,
    }


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/algorithms/__init__.py): online DPO from OUT's SFT policy, its pairs
    labelled by OUT's reward model (or reward.sources)."""
    return train_online_dpo(cfg, task, out / "sft" / "model", out / "reward" / "model", stage_dir, rt)
