"""ReST, Reinforced Self-Training (Gulcehre et al. 2023, "Reinforced Self-Training (ReST) for Language Modeling",
Algorithm 1): alternate a Grow step, which samples a dataset from the current policy, and several Improve steps,
which filter that dataset by reward at rising thresholds tau_1 < tau_2 < ... and fine-tune on what passes. Each
iteration:

    1. Grow: sample K completions for each of n_prompts new prompts from the current policy; score them with the
       reward model; log-probs of policy and reference for the KL of the set (rlhfkit.spine.self_training,
       PPO's rollout code)
    2. thresholds tau_i: the quantiles[i] quantile of the Grow set's scores, never below their mean
       (rlhfkit.ops.selection.rest_thresholds)
    3. Improve steps, i = 1..len(quantiles): keep every ended sample scoring >= tau_i, over the whole set (not
       per prompt), and fine-tune on them with SFT's loop (rlhfkit.spine.finetune; the paper's BC loss, its best),
       `epochs` passes with a fresh AdamW; log the step
    4. write STAGE/iter-N/ (grow.jsonl with an `improve_steps` column: how many Improve steps kept the sample,
       metrics.jsonl of the fine-tuning, model/), mark the iteration complete: a killed run resumes at the
       iteration it was in

Each Improve step continues from the policy the previous one left, and each Grow samples from the policy the
last Improve step left, as in the paper (Sec. 2: the Improve steps refine the current policy). ReST-EM (Singh
et al. 2023) differs exactly here: it fine-tunes the base model afresh in every iteration to limit drift.
There is no KL term: the fine-tuning budget (epochs x lr x steps) and the fact that the data are the policy's
own samples keep it near the reference; the KL of each Grow set to the SFT policy is logged and the evaluation
reports the final policy's.

Deviations from Gulcehre et al., on purpose:
- Thresholds are quantiles of each Grow set's scores (raised to the mean, the paper's tau_1 > V), not fixed
  numbers: a Bradley-Terry reward model is defined only up to an added constant (the paper's reward lies in
  [0, 1]). The filter keeps scores >= tau (the paper's indicator; equal for continuous scores). The quantiles and
  the mean V are over the Grow set's responses that ended with EOS, not the whole set (the others are never kept).
- The Grow set is the policy's samples only; the paper adds the original supervised data D (ReST-EM drops it
  too). Each iteration draws new prompts from the task instead of re-sampling a fixed set.
- Each Improve step trains a fixed number of epochs; the paper trains "while reward improves on D_eval".
- A response that never emitted EOS is never kept (rlhfkit.ops.selection).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.algorithms import Method
from rlhfkit.core.config import F
from rlhfkit.core.errors import RlhfkitError
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.selection import rest_keep, rest_thresholds
from rlhfkit.spine.self_training import RoundContext, RoundResult, fine_tune, grow_metrics, run_rounds, write_samples


@dataclass
class ReSTConfig:
    """[rest] ReST, Reinforced Self-Training (Gulcehre et al. 2023): Grow, then Improve steps at rising thresholds (rlhfkit/algorithms/rest.py)."""

    iterations: int = F(2, "Grow steps; each samples a new dataset from the current policy, then runs one Improve step per entry of quantiles.")
    n_prompts: int = F(512, "Prompts per Grow step (new ones each iteration, from the task's training prompts).")
    k: int = F(4, "Completions sampled per prompt in a Grow step.")
    quantiles: list[float] = F([0.5, 0.7, 0.9], "One Improve step per entry, strictly increasing in (0, 1): threshold tau_i = this quantile of the Grow set's scores, never below their mean; each step fine-tunes on the samples scoring >= tau_i.")
    temperature: float = F(1.0, "Sampling temperature of the Grow step.")
    epochs: int = F(1, "Passes over the kept samples in each Improve step (with lr, the fine-tuning budget that keeps the policy near the reference: there is no KL term).")
    batch_size: int = F(64, "Samples per optimiser step (fewer kept than this: one step on all of them per epoch).")
    lr: float = F(1e-3, "AdamW learning rate of each Improve step (a fresh optimiser per step, linear decay to 10%); each step continues from the policy the previous one left; with policy.path, 2e-5 (2e-4 with LoRA) unless set.")

    # lr for a pretrained policy.path (full fine-tuning, LoRA): each Improve step is SFT on the kept samples, so SFT's
    # (TRL 1.12's SFTConfig.learning_rate; x10 for LoRA, its sft.py example). 1e-3 above suits a tiny model from
    # scratch.
    PRETRAINED_LR = (2e-5, 2e-4)

    def validate(self, cfg, checks) -> None:
        """[rest]'s rules (`checks`: rlhfkit.core.config.Checks)."""
        need = checks.need
        checks.at_least_one("rest.iterations", "rest.n_prompts", "rest.k", "rest.epochs", "rest.batch_size")
        checks.positive("rest.lr", "rest.temperature")
        q = self.quantiles
        need(len(q) >= 1, "rest.quantiles", "give at least one quantile, e.g. [0.5, 0.7, 0.9] (one Improve step each)")
        need(all(0.0 < x < 1.0 for x in q), "rest.quantiles", "each quantile must be in (0, 1)")
        need(all(a < b for a, b in zip(q, q[1:])), "rest.quantiles",
             "must be strictly increasing: ReST's Improve thresholds rise (tau_1 < tau_2 < ...)")


METHOD = Method(
    "rest", ReSTConfig, ("sft", "reward"),
    (("reward-model score: Grow set, threshold and kept", ("objective/scores", "selection/threshold",
                                                            "selection/kept_scores")),
     ("gold metrics of the Grow set", ("gold/*",)),
     ("KL(policy || reference) of the Grow set, nats", ("objective/kl_k1",))),
    resumable=True, step_label="Improve step")


def train_rest(cfg, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """Run cfg.rest.iterations Grow/Improve iterations into out_dir, resuming after the last complete one."""
    rc = cfg.rest
    n_improve = len(rc.quantiles)

    def improve(ctx: RoundContext) -> RoundResult:
        g, n = ctx.grow, ctx.n
        grown = grow_metrics(g, task)  # the Grow set, which every Improve step of this iteration filters

        # 2. Rising thresholds on this Grow set's scores.
        thresholds = rest_thresholds(g.scores, g.ended, rc.quantiles)
        keeps = [rest_keep(g.scores, g.ended, tau) for tau in thresholds]  # (B,) each, nested
        write_samples(ctx.dir / "grow.jsonl", g, improve_steps=torch.stack(keeps).sum(0).tolist())
        if not keeps[0].any():
            raise RlhfkitError(f"ReST iteration {n}: none of the {len(g.texts)} sampled responses ended with EOS "
                               f"within the task's {task.max_new_tokens} new tokens, so the Grow set has nothing to "
                               "keep; check that the SFT policy learned to emit EOS")

        # 3. Improve steps: filter at tau_i, fine-tune the current policy on what passes.
        steps, backward, records = 0, 0, []
        for i, (tau, keep) in enumerate(zip(thresholds, keeps), start=1):
            rows = keep.nonzero().squeeze(1).tolist()
            fit = fine_tune(ctx.policy, ctx.tokenizer, [g.prompts[r] for r in rows], [g.texts[r] for r in rows],
                            epochs=rc.epochs, batch_size=rc.batch_size, lr=rc.lr, seed=ctx.seed(f"improve-{i}"),
                            rt=rt, log=ctx.log, desc=f"iter {n} improve {i}", step_offset=steps)
            steps, backward = steps + fit["steps"], backward + fit["backward"]
            records.append({
                "step": (n - 1) * n_improve + i,
                "rest/iteration": n,
                **grown,
                "selection/threshold": tau,
                "selection/kept_fraction": len(rows) / len(g.texts),
                "selection/kept_scores": g.scores[keep].mean().item(),
                "loss/sft": fit["loss"],
            })
        return RoundResult(records, steps, backward,
                           {"score": f"{grown['objective/scores']:.2f}", "tau": f"{thresholds[-1]:.2f}"})

    # 1-4. Iterations of Grow (K samples per prompt), Improve steps (above), save (rlhfkit.spine.self_training).
    previous, summary = run_rounds(cfg, task, sft_dir, rm_dir, out_dir, rt, name="rest", prefix="iter",
                                   rounds=rc.iterations, lines_per_round=n_improve, n_prompts=rc.n_prompts, k=rc.k,
                                   temperature=rc.temperature, unit="improve step", improve=improve)
    return {
        "iterations": rc.iterations,
        "improve_steps": rc.iterations * n_improve,
        "thresholds": [[r["selection/threshold"] for r in p["records"]] for p in previous],
        "kept": [[r["selection/kept_fraction"] for r in p["records"]] for p in previous],
        **summary,
    }


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/algorithms/__init__.py): ReST from OUT's SFT policy, judged by OUT's
    reward model."""
    return train_rest(cfg, task, out / "sft" / "model", out / "reward" / "model", stage_dir, rt)
