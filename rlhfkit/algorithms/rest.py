"""ReST, Reinforced Self-Training (Gulcehre et al. 2023, "Reinforced Self-Training (ReST) for Language Modeling",
Algorithm 1): alternate a Grow step, which samples a dataset from the current policy, and several Improve steps,
which filter that dataset by reward at rising thresholds tau_1 < tau_2 < ... and fine-tune on what passes. Each
iteration:

    1. Grow: sample K completions for each of n_prompts new prompts from the current policy; score them with the
       reward model; log-probs of policy and reference for the KL of the set (rlhfkit.iterative.grow, PPO's
       rollout code)
    2. thresholds tau_i: the quantiles[i] quantile of the Grow set's scores, never below their mean
       (rlhfkit.ops.selection.rest_thresholds)
    3. Improve steps, i = 1..len(quantiles): keep every ended sample scoring >= tau_i, over the whole set (not
       per prompt), and fine-tune on them with SFT's loop (fit_completions; the paper's BC loss, its best),
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
  [0, 1]). The filter keeps scores >= tau (the paper's indicator; equal for continuous scores).
- The Grow set is the policy's samples only; the paper adds the original supervised data D (ReST-EM drops it
  too). Each iteration draws new prompts from the task instead of re-sampling a fixed set.
- Each Improve step trains a fixed number of epochs; the paper trains "while reward improves on D_eval".
- A response that never emitted EOS is never kept (rlhfkit.ops.selection).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from rlhfkit.config import Config
from rlhfkit.errors import RlhfkitError
from rlhfkit.iterative import fine_tune, grow, grow_metrics, resume_point, round_dir, round_seed, write_samples
from rlhfkit.models import freeze, load_policy, load_tokenizer
from rlhfkit.ops.selection import rest_keep, rest_thresholds
from rlhfkit.reward_sources import build_scorer
from rlhfkit.rollout import FrozenReference
from rlhfkit.runio import MetricsLog, mark_complete, progress, stage_result
from rlhfkit.training import Runtime

PREFIX = "iter"


def train_rest(cfg: Config, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """Run cfg.rest.iterations Grow/Improve iterations into out_dir, resuming after the last complete one."""
    start_time = time.time()
    rc = cfg.rest
    n_improve = len(rc.quantiles)
    done = resume_point(out_dir, PREFIX, rc.iterations)
    previous = [stage_result(round_dir(out_dir, PREFIX, n)) for n in range(1, done + 1)]
    if previous:
        start_time -= previous[-1]["wall_time_s"]  # the whole run's time, across the interruption

    # Setup: the policy (SFT, or the last complete iteration's), the reference (frozen SFT), the reward model.
    tokenizer = load_tokenizer(sft_dir, "sft policy")
    policy = load_policy(round_dir(out_dir, PREFIX, done) / "model" if done else sft_dir, rt.device, "policy")
    reference = FrozenReference(freeze(load_policy(sft_dir, rt.device, "reference policy")))
    scorer = build_scorer(cfg, task, rm_dir, rt)
    log = MetricsLog(out_dir / "metrics.jsonl", resume_after_step=done * n_improve)  # one line per Improve step
    bar = progress(rc.iterations * n_improve, "rest", unit="improve step")
    bar.update(done * n_improve)

    for n in range(done + 1, rc.iterations + 1):
        idir = round_dir(out_dir, PREFIX, n)
        idir.mkdir(parents=True)

        # 1. Grow: K completions per prompt from the current policy, scored, KL to the reference.
        prompts = task.prompts(rc.n_prompts, random.Random(round_seed(cfg.seed, "rest", n, "prompts")))
        generator = torch.Generator(device=rt.device).manual_seed(round_seed(cfg.seed, "rest", n, "sample"))
        g = grow(policy, reference, scorer, tokenizer, prompts, k=rc.k, max_new_tokens=task.max_new_tokens,
                 temperature=rc.temperature, generator=generator, rt=rt)
        grown = grow_metrics(g, task)  # the Grow set, which every Improve step of this iteration filters

        # 2. Rising thresholds on this Grow set's scores.
        thresholds = rest_thresholds(g.scores, g.ended, rc.quantiles)
        keeps = [rest_keep(g.scores, g.ended, tau) for tau in thresholds]  # (B,) each, nested
        write_samples(idir / "grow.jsonl", g, improve_steps=torch.stack(keeps).sum(0).tolist())
        if not keeps[0].any():
            raise RlhfkitError(f"ReST iteration {n}: none of the {len(g.texts)} sampled responses ended with EOS "
                               f"within the task's {task.max_new_tokens} new tokens, so the Grow set has nothing to "
                               "keep; check that the SFT policy learned to emit EOS")

        # 3. Improve steps: filter at tau_i, fine-tune the current policy on what passes.
        iter_log = MetricsLog(idir / "metrics.jsonl")
        steps, backward, records = 0, 0, []
        for i, (tau, keep) in enumerate(zip(thresholds, keeps), start=1):
            rows = keep.nonzero().squeeze(1).tolist()
            fit = fine_tune(policy, tokenizer, [g.prompts[r] for r in rows], [g.texts[r] for r in rows],
                            epochs=rc.epochs, batch_size=rc.batch_size, lr=rc.lr,
                            seed=round_seed(cfg.seed, "rest", n, f"improve-{i}"), rt=rt, log=iter_log,
                            desc=f"iter {n} improve {i}", step_offset=steps)
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
            bar.update(1)
            bar.set_postfix(score=f"{grown['objective/scores']:.2f}", tau=f"{tau:.2f}", refresh=False)
        iter_log.close()

        # 4. Save the iteration's model, log its Improve steps, mark it complete (last).
        policy.save_pretrained(idir / "model")
        tokenizer.save_pretrained(idir / "model")
        for record in records:
            log.log(record)
        passes = {"sampled": len(g.texts), "forward": 3 * len(g.texts), "backward": backward}
        previous.append({"records": records, "passes": passes, "steps": steps, "wall_time_s": time.time() - start_time})
        mark_complete(idir, previous[-1])
    bar.close()
    log.close()

    policy.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    last = previous[-1]["records"]
    return {
        "iterations": rc.iterations,
        "improve_steps": rc.iterations * n_improve,
        "steps": sum(p["steps"] for p in previous),
        "thresholds": [[r["selection/threshold"] for r in p["records"]] for p in previous],
        "kept": [[r["selection/kept_fraction"] for r in p["records"]] for p in previous],
        "final_scores": last[0]["objective/scores"],  # the last Grow set (before its Improve steps)
        "final_kl": last[0]["objective/kl_k1"],
        "resumed": done > 0,
        # sequences through a model: K per prompt sampled; reward model, policy and reference without grad;
        # the kept samples with grad in every fine-tuning step
        "passes": {k: sum(p["passes"][k] for p in previous) for k in ("sampled", "forward", "backward")},
        "wall_time_s": time.time() - start_time,
    }


def run(cfg: Config, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/methods.py): ReST from OUT's SFT policy, judged by OUT's reward model."""
    return train_rest(cfg, task, out / "sft" / "model", out / "reward" / "model", stage_dir, rt)
