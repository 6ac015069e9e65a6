"""Rejection-sampling fine-tuning, the first RLHF stage of Llama 2 (Touvron et al. 2023, "Llama 2: Open Foundation
and Fine-Tuned Chat Models", Sec. 3.2.3): sample K answers per prompt from the most recent model, keep the one the
reward model scores highest as the new gold standard, and fine-tune on those as in SFT; repeat for several rounds.
Each round:

    1. sample K completions for each of n_prompts new prompts from the current policy; score them with the
       reward model; log-probs of policy and reference for the KL of the sampled set (rlhfkit.iterative.grow,
       PPO's rollout code)
    2. keep each prompt's best completion when it ended with EOS and its score clears `threshold`
       (rlhfkit.ops.selection.rejection_sampling_keep)
    3. fine-tune the policy on the kept (prompt, completion) pairs with SFT's loop (fit_completions): loss
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

import random
import time
from pathlib import Path

import torch

from rlhfkit.config import Config
from rlhfkit.errors import RlhfkitError
from rlhfkit.iterative import fine_tune, grow, grow_metrics, resume_point, round_dir, round_seed, write_samples
from rlhfkit.models import freeze, load_policy, load_tokenizer
from rlhfkit.ops.selection import rejection_sampling_keep
from rlhfkit.reward_sources import build_scorer
from rlhfkit.rollout import FrozenReference
from rlhfkit.runio import MetricsLog, mark_complete, progress, stage_result
from rlhfkit.training import Runtime

PREFIX = "round"


def train_rejection_sampling(cfg: Config, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """Run cfg.rejection_sampling.rounds rounds into out_dir, resuming after the last complete round."""
    start_time = time.time()
    rc = cfg.rejection_sampling
    done = resume_point(out_dir, PREFIX, rc.rounds)
    previous = [stage_result(round_dir(out_dir, PREFIX, n)) for n in range(1, done + 1)]
    if previous:
        start_time -= previous[-1]["wall_time_s"]  # the whole run's time, across the interruption

    # Setup: the policy (SFT, or the last complete round's), the reference (frozen SFT), the reward model.
    tokenizer = load_tokenizer(sft_dir, "sft policy")
    policy = load_policy(round_dir(out_dir, PREFIX, done) / "model" if done else sft_dir, rt.device, "policy")
    reference = FrozenReference(freeze(load_policy(sft_dir, rt.device, "reference policy")))
    scorer = build_scorer(cfg, task, rm_dir, rt)
    log = MetricsLog(out_dir / "metrics.jsonl", resume_after_step=done)
    bar = progress(rc.rounds, "rejection_sampling", unit="round")
    bar.update(done)

    for n in range(done + 1, rc.rounds + 1):
        rdir = round_dir(out_dir, PREFIX, n)
        rdir.mkdir(parents=True)

        # 1. Sample K completions per prompt from the current policy, score them, KL to the reference.
        seed = lambda what: round_seed(cfg.seed, "rejection_sampling", n, what)  # noqa: E731 (per round: resume-exact)
        prompts = task.prompts(rc.n_prompts, random.Random(seed("prompts")))
        generator = torch.Generator(device=rt.device).manual_seed(seed("sample"))
        g = grow(policy, reference, scorer, tokenizer, prompts, k=rc.k, max_new_tokens=task.max_new_tokens,
                 temperature=rc.temperature, generator=generator, rt=rt)

        # 2. Keep each prompt's best ended completion when it clears the threshold.
        keep = rejection_sampling_keep(g.scores, g.ended, g.group, rc.threshold)  # (B,) at most one per prompt
        rows = keep.nonzero().squeeze(1).tolist()
        write_samples(rdir / "samples.jsonl", g, kept=keep.tolist())
        if not rows:
            best = g.scores[g.ended].max().item() if g.ended.any() else float("nan")
            raise RlhfkitError(f"rejection sampling round {n} kept no completion: no prompt's best completion "
                               f"(best score {best:.3f}, {int(g.ended.sum())} of {len(g.texts)} samples ended with "
                               f"EOS) reached rejection_sampling.threshold = {rc.threshold}; lower the threshold")

        # 3. Fine-tune the policy on the winners with SFT's loop.
        round_log = MetricsLog(rdir / "metrics.jsonl")
        fit = fine_tune(policy, tokenizer, [g.prompts[i] for i in rows], [g.texts[i] for i in rows],
                        epochs=rc.epochs, batch_size=rc.batch_size, lr=rc.lr,
                        seed=seed("fit"), rt=rt, log=round_log,
                        desc=f"round {n}")
        round_log.close()

        # 4. Save the round's model, log it, mark it complete (last: a round without the marker is redone).
        record = {
            "step": n,
            **grow_metrics(g, task),  # the sampled set, from the policy before this round's fine-tuning
            "selection/kept_fraction": len(rows) / rc.n_prompts,
            "selection/kept_scores": g.scores[keep].mean().item(),
            "loss/sft": fit["loss"],
        }
        policy.save_pretrained(rdir / "model")
        tokenizer.save_pretrained(rdir / "model")
        log.log(record)
        passes = {"sampled": len(g.texts), "forward": 3 * len(g.texts), "backward": fit["backward"]}
        previous.append({"record": record, "passes": passes, "steps": fit["steps"],
                         "wall_time_s": time.time() - start_time})
        mark_complete(rdir, previous[-1])
        bar.update(1)
        bar.set_postfix(score=f"{record['objective/scores']:.2f}", kept=f"{len(rows)}", refresh=False)
    bar.close()
    log.close()

    policy.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    last = previous[-1]["record"]
    return {
        "rounds": rc.rounds,
        "steps": sum(p["steps"] for p in previous),
        "kept": [p["record"]["selection/kept_fraction"] for p in previous],
        "final_scores": last["objective/scores"],  # the last round's sampled set (before its fine-tuning)
        "final_kl": last["objective/kl_k1"],
        "resumed": done > 0,
        # sequences through a model: K per prompt sampled; reward model, policy and reference without grad;
        # the kept pairs with grad in every fine-tuning step
        "passes": {k: sum(p["passes"][k] for p in previous) for k in ("sampled", "forward", "backward")},
        "wall_time_s": time.time() - start_time,
    }


def run(cfg: Config, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/methods.py): rounds from OUT's SFT policy, judged by OUT's reward model."""
    return train_rejection_sampling(cfg, task, out / "sft" / "model", out / "reward" / "model", stage_dir, rt)
