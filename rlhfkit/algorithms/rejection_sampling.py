"""Rejection-sampling fine-tuning, the first RLHF stage of Llama 2 (Touvron et al. 2023, "Llama 2: Open Foundation
and Fine-Tuned Chat Models", Sec. 3.2.3): sample K answers per prompt from the most recent model, keep the one the
reward model scores highest as the new gold standard, and fine-tune on those as in SFT; repeat for several rounds.
Each round:

    1. sample K completions for each of n_prompts new prompts from the current policy; score them with the
       reward model; log-probs of policy and reference for the KL of the sampled set (rlhfkit.spine.self_training,
       PPO's rollout code)
    2. keep each prompt's best completion when it ended with EOS and its score clears `threshold`
       (rlhfkit.ops.selection.rejection_sampling_keep)
    3. fine-tune the policy on the kept (prompt, completion) pairs with SFT's loop (rlhfkit.spine.finetune): loss
       on completion tokens, `epochs` passes, a fresh AdamW
    4. write STAGE/round-N/ (samples.jsonl with a `kept` column, metrics.jsonl of the fine-tuning, model/),
       log the round, mark the round complete: a killed run resumes at the round it was in

There is no KL term: the policy stays near the reference only because each round fine-tunes on samples of the
policy itself for a small budget (epochs x lr); the KL of each round's sampled set to the SFT policy is logged
(objective/kl_k1) and the evaluation reports the final policy's.

Deviations from Llama 2, on purpose:
- `threshold` (an rlhfkit addition, off at -inf): a prompt whose best completion scores below it contributes
  nothing, instead of its least-bad completion.
- A response that never emitted EOS is never kept (rlhfkit.ops.selection); a prompt whose K samples all lack
  EOS contributes nothing.
- Each round draws new prompts from the task; Llama 2 re-samples a fixed prompt set. Each round trains only on
  its own winners (Llama 2 up to RLHF V3; from V4 it also pooled the best samples of earlier rounds), starting
  from the previous round's policy. Sampling is at one temperature (Llama 2 tuned it per round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.algorithms import Method
from rlhfkit.core.config import F
from rlhfkit.core.errors import RlhfkitError
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.selection import rejection_sampling_keep
from rlhfkit.spine.self_training import RoundContext, RoundResult, fine_tune, grow_metrics, run_rounds, write_samples


@dataclass
class RejectionSamplingConfig:
    """[rejection_sampling] Rejection-sampling fine-tuning, Llama 2's first RLHF stage (rlhfkit/algorithms/rejection_sampling.py)."""

    rounds: int = F(2, "Rounds of sample -> keep each prompt's best -> fine-tune; each round samples from the policy the previous round fine-tuned.")
    n_prompts: int = F(1024, "Prompts per round (new ones each round, from the task's training prompts).")
    k: int = F(4, "Completions sampled per prompt; the one the reward model scores highest is the candidate (a larger k also selects harder on the reward model's noise: more KL per round).")
    threshold: float = F(-math.inf, "Keep a prompt's best completion only when its reward-model score is >= this (-inf = always, as Llama 2); a response without EOS is never kept.")
    temperature: float = F(1.0, "Sampling temperature.")
    epochs: int = F(2, "Passes over a round's kept completions (the fine-tuning budget, with lr: what keeps the policy near the reference, as there is no KL term).")
    batch_size: int = F(64, "Completions per optimiser step (fewer kept than this: one step on all of them per epoch).")
    lr: float = F(1e-3, "AdamW learning rate of each round's fine-tuning (a fresh optimiser per round, linear decay to 10%); with policy.path, 2e-5 (2e-4 with LoRA) unless set.")

    # lr for a pretrained policy.path (full fine-tuning, LoRA): each round is SFT on the kept samples, so SFT's (TRL
    # 1.12's SFTConfig.learning_rate; x10 for LoRA, its sft.py example). 1e-3 above suits a tiny model from scratch.
    PRETRAINED_LR = (2e-5, 2e-4)

    def validate(self, cfg, checks) -> None:
        """[rejection_sampling]'s rules (`checks`: rlhfkit.core.config.Checks)."""
        checks.at_least_one("rejection_sampling.rounds", "rejection_sampling.n_prompts", "rejection_sampling.k",
                            "rejection_sampling.epochs", "rejection_sampling.batch_size")
        checks.positive("rejection_sampling.lr", "rejection_sampling.temperature")
        checks.need(not math.isnan(self.threshold) and self.threshold != math.inf, "rejection_sampling.threshold",
                    "must be a number or -inf (-inf keeps every prompt's best completion)")


METHOD = Method(
    "rejection_sampling", RejectionSamplingConfig, ("sft", "reward"),
    (("reward-model score: sampled set and kept winners", ("objective/scores", "selection/kept_scores")),
     ("gold metrics of the sampled set", ("gold/*",)),
     ("KL(policy || reference) of the sampled set, nats", ("objective/kl_k1",))),
    resumable=True, step_label="round")


def train_rejection_sampling(cfg, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """Run cfg.rejection_sampling.rounds rounds into out_dir, resuming after the last complete round."""
    rc = cfg.rejection_sampling

    def improve(ctx: RoundContext) -> RoundResult:
        g, n = ctx.grow, ctx.n
        # 2. Keep each prompt's best ended completion when it clears the threshold.
        keep = rejection_sampling_keep(g.scores, g.ended, g.group, rc.threshold)  # (B,) at most one per prompt
        rows = keep.nonzero().squeeze(1).tolist()
        write_samples(ctx.dir / "samples.jsonl", g, kept=keep.tolist())
        if not rows:
            best = g.scores[g.ended].max().item() if g.ended.any() else float("nan")
            raise RlhfkitError(f"rejection sampling round {n} kept no completion: no prompt's best completion "
                               f"(best score {best:.3f}, {int(g.ended.sum())} of {len(g.texts)} samples ended with "
                               f"EOS) reached rejection_sampling.threshold = {rc.threshold}; lower the threshold")

        # 3. Fine-tune the policy on the winners with SFT's loop.
        fit = fine_tune(ctx.policy, ctx.tokenizer, [g.prompts[i] for i in rows], [g.texts[i] for i in rows],
                        epochs=rc.epochs, batch_size=rc.batch_size, lr=rc.lr, seed=ctx.seed("fit"), rt=rt,
                        log=ctx.log, desc=f"round {n}")
        record = {
            "step": n,
            **grow_metrics(g, task),  # the sampled set, from the policy before this round's fine-tuning
            "selection/kept_fraction": len(rows) / rc.n_prompts,
            "selection/kept_scores": g.scores[keep].mean().item(),
            "loss/sft": fit["loss"],
        }
        return RoundResult([record], fit["steps"], fit["backward"],
                           {"score": f"{record['objective/scores']:.2f}", "kept": f"{len(rows)}"})

    # 1-4. Rounds of Grow (K samples per prompt), improve (above), save (rlhfkit.spine.self_training).
    previous, summary = run_rounds(cfg, task, sft_dir, rm_dir, out_dir, rt, name="rejection_sampling", prefix="round",
                                   rounds=rc.rounds, lines_per_round=1, n_prompts=rc.n_prompts, k=rc.k,
                                   temperature=rc.temperature, unit="round", improve=improve)
    return {"rounds": rc.rounds, "kept": [p["records"][0]["selection/kept_fraction"] for p in previous], **summary}


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/algorithms/__init__.py): rounds from OUT's SFT policy, judged by OUT's
    reward model."""
    return train_rejection_sampling(cfg, task, out / "sft" / "model", out / "reward" / "model", stage_dir, rt)
