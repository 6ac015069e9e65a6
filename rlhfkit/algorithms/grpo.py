"""GRPO, group relative policy optimisation, in one file (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of
Mathematical Reasoning in Open Language Models", Sec. 4.1, outcome supervision). No critic: each response's
advantage is its score's z-score within the K responses to the same prompt. Each iteration:

    1. sample K responses for each of prompts_per_step prompts (shared KV-cache sampler; K consecutive rows)
    2. score them with the reward model (text in); subtract the missing-EOS penalty
    3. logprobs (the old policy) and ref_logprobs (no grad)
    4. group-normalised advantages A_i = (s_i - mean(s)) / (std(s) + eps) over the group, the same for every
       token of response i; no KL in the reward
    5. epochs over minibatches of the clipped per-token loss + beta * k3 KL(pi || pi_ref) per token, averaged
       over each response's tokens, then over responses (the paper's eq. 3)
    6. log, checkpoint

The KL is in the loss (one code path; RLOO, rlhfkit/algorithms/rloo.py, puts it in the reward): the unbiased,
non-negative k3 estimator at the current policy on tokens sampled from the old one (the paper's eq. 4).

Deviations from the paper, on purpose:
- Loss normalisation: the paper's per-response mean over tokens, then the mean over responses (TRL's
  loss_type = "grpo"), not DAPO's token-level mean. On digits every well-formed response has the same length,
  so the two agree there; they differ when lengths differ (a short response's tokens weigh more here).
- std is the unbiased (n - 1) standard deviation and eps = 1e-4, as TRL (rlhfkit.ops.advantages.grpo_advantages);
  an all-equal group gives advantage exactly 0.
- The reference stays the SFT policy (the paper's iterative GRPO re-sets it to the policy; not here), and one
  update pass per batch by default (the paper's mu = 1), so the ratio is 1 at the first minibatch.
- The reward model reads decoded text, a truncated response is scored with an EOS appended and lowered by
  `missing_eos_penalty`, dropout is off, the learning rate is constant: as PPO (rlhfkit/algorithms/ppo.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import Config
from rlhfkit.models import disable_dropout
from rlhfkit.ops.advantages import grpo_advantages, penalise_missing_eos, zero_std_share
from rlhfkit.ops.kl import kl_k1, kl_k3
from rlhfkit.ops.losses import grpo_policy_loss
from rlhfkit.rollout import collect_rollouts, forward_response, load_online_models, rollout_metrics
from rlhfkit.runio import MetricsLog, progress, read_metrics
from rlhfkit.training import (Runtime, loop_generators, loop_state, make_optimizer, optimizer_step, restore_loop_state,
                              save_checkpoint)


@dataclass
class GRPOTargets:
    """What phases 2 and 4 make of one batch. Shapes: B = prompts x K responses (K consecutive rows per prompt)."""

    penalised: torch.Tensor  # (B,) reward-model scores minus the missing-EOS penalty (objective/scores)
    advantages: torch.Tensor  # (B,) z-score of penalised within the prompt's group of K


def grpo_targets(raw_scores: torch.Tensor, ended: torch.Tensor, k: int, missing_eos_penalty: float) -> GRPOTargets:
    """Phases 2b and 4 as one pure function of a batch, so a fixed-batch test can check it against a loop."""
    penalised = penalise_missing_eos(raw_scores, ended, missing_eos_penalty)  # (B,)
    return GRPOTargets(penalised, grpo_advantages(penalised, group_size=k))


def train_grpo(cfg: Config, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """Run GRPO into out_dir, resuming from out_dir/checkpoint when one exists."""
    start_time = time.time()  # moved back by the time spent before a resume, so wall_time_s is the whole run
    gc = cfg.grpo
    ckpt_dir = out_dir / "checkpoint"
    batch = gc.prompts_per_step * gc.k  # B, responses per iteration

    # Setup: policy (trained), reference (frozen SFT copy), reward model (frozen). No value model.
    m = load_online_models(cfg, task, sft_dir, rm_dir, ckpt_dir, rt)  # rlhfkit.rollout, shared by the online methods
    tokenizer, policy, reference, scorer, resume = m.tokenizer, m.policy, m.reference, m.scorer, m.resume
    disable_dropout(policy)  # with dropout, the first ratio would differ from 1 (TRL and OpenRLHF do the same)
    policy.train()
    params = list(policy.parameters())
    optimizer, scheduler = make_optimizer(params, gc.lr, gc.total_steps, final_fraction=1.0)
    prompt_rng, sample_gen, order_gen = loop_generators(cfg.seed, "grpo", rt.device)
    step = 0
    if resume:
        state = torch.load(ckpt_dir / "state.pt", weights_only=False)
        step, elapsed = restore_loop_state(state, optimizer, scheduler, prompt_rng, sample_gen, order_gen)
        start_time -= elapsed
    log = MetricsLog(out_dir / "metrics.jsonl", resume_after_step=step if resume else None)
    bar = progress(gc.total_steps, "grpo")
    bar.update(step)

    while step < gc.total_steps:
        # 1-3. Sample K responses per prompt, score the decoded text, log-probs of policy and reference, once
        # and without grad (rlhfkit.rollout, shared by every online method).
        prompts = task.prompts(gc.prompts_per_step, prompt_rng)
        r = collect_rollouts(policy, reference, scorer, tokenizer, prompts, k=gc.k, max_new_tokens=task.max_new_tokens,
                             temperature=gc.temperature, generator=sample_gen, rt=rt)
        mask = r.response_mask  # (B, Tr)

        # 2b, 4. Missing-EOS penalty, group-normalised advantages (no KL in the reward).
        t = grpo_targets(r.scores, r.ended, gc.k, gc.missing_eos_penalty)

        # 5. Epochs over shuffled minibatches of the clipped per-token loss + beta * k3 KL (grpo_policy_loss).
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(gc.epochs):
            order = torch.randperm(batch, generator=order_gen).to(rt.device)
            for start in range(0, batch, gc.minibatch_size):
                idx = order[start : start + gc.minibatch_size]
                new_logprobs, _, _ = forward_response(policy, None, r.queries[idx], r.query_mask[idx], r.responses[idx],
                                                      mask[idx], gc.temperature, rt)  # (b, Tr)
                loss, loss_stats = grpo_policy_loss(new_logprobs, r.logprobs[idx], r.ref_logprobs[idx],
                                                    t.advantages[idx], mask[idx], gc.clip_range, gc.beta)
                optimizer_step(loss, params, optimizer, max_grad_norm=gc.max_grad_norm)
                for key, v in loss_stats.items():
                    stats.setdefault(key, []).append(v)  # detached; no .item() here: no device sync per minibatch
        scheduler.step()
        step += 1

        # 6. Log and checkpoint.
        m = mask.to(r.logprobs.dtype)
        record = {
            "step": step,
            "objective/scores": t.penalised.mean().item(),
            # the estimate in the loss (k3), summed over each response like PPO's, and the k1 sum
            "objective/kl": (kl_k3(r.logprobs, r.ref_logprobs) * m).sum(1).mean().item(),
            "objective/kl_k1": (kl_k1(r.logprobs, r.ref_logprobs) * m).sum(1).mean().item(),
            "objective/kl_coef": gc.beta,
            "objective/zero_std_groups": zero_std_share(t.penalised, gc.k).item(),
            **{key: torch.stack(v).mean().item() for key, v in stats.items()},
            **rollout_metrics(r, task),
        }
        log.log(record)
        bar.update(1)
        bar.set_postfix(score=f"{record['objective/scores']:.2f}", kl=f"{record['objective/kl']:.3f}", refresh=False)
        if step % gc.checkpoint_every == 0 or step == gc.total_steps:
            save_checkpoint(ckpt_dir, {"policy": policy}, tokenizer, loop_state(
                step, optimizer, scheduler, prompt_rng, sample_gen, order_gen, time.time() - start_time))
    bar.close()
    log.close()

    policy.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    last = read_metrics(out_dir / "metrics.jsonl")[-1]
    return {
        "steps": step,
        "final_scores": last["objective/scores"],
        "final_kl": last["objective/kl_k1"],
        "resumed": resume,
        # sequences through a model per iteration: sampled once; reward model, policy and reference without
        # grad; the policy with grad in every epoch
        "passes": {"sampled": step * batch, "forward": 3 * step * batch, "backward": step * batch * gc.epochs},
        "wall_time_s": time.time() - start_time,
    }


def run(cfg: Config, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/methods.py): GRPO from OUT's SFT policy against OUT's reward model."""
    return train_grpo(cfg, task, out / "sft" / "model", out / "reward" / "model", stage_dir, rt)
