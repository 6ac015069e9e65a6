"""RLOO, REINFORCE with a leave-one-out baseline, in one file (Ahmadian et al. 2024, "Back to Basics: Revisiting
REINFORCE Style Optimization for Learning from Human Feedback in LLMs"; the baseline from Kool et al. 2019,
"Buy 4 REINFORCE Samples, Get a Baseline for Free!"). No critic: the other K - 1 samples of the same prompt
are the baseline. Each iteration:

    1. sample K responses for each of prompts_per_step prompts (shared KV-cache sampler; K consecutive rows)
    2. score them with the reward model (text in); subtract the missing-EOS penalty
    3. logprobs and ref_logprobs (no grad)
    4. sequence rewards R_i = score_i - beta * sum_t (logprobs_it - ref_logprobs_it)    (KL in the reward, k1)
    5. leave-one-out advantages A_i = R_i - mean_{j != i} R_j within each prompt's group
    6. epochs over minibatches of the loss -A_i * rho_i on the sequence ratio rho_i (clipped as in PPO)
    7. log, checkpoint

The KL is in the reward (one code path; GRPO, rlhfkit/algorithms/grpo.py, puts it in the loss), so the baseline
also covers it and the loss has no separate KL term: this is Ahmadian et al.'s objective.

Deviations from the paper, on purpose:
- The update is written as PPO's clipped surrogate on the *sequence* ratio (TRL's RLOOTrainer) so that
  `rloo.epochs` > 1 or several minibatches stay safe; at the default (one epoch, one minibatch per batch) the
  ratio is exactly 1, the clip never acts and the gradient is the paper's REINFORCE -A_i grad log pi(y_i|x_i).
- The reward model reads decoded text, a truncated response is scored with an EOS appended and lowered by
  `missing_eos_penalty`, dropout is off, the learning rate is constant: as PPO (rlhfkit/algorithms/ppo.py).
- No advantage whitening or reward normalisation (the paper has none; TRL's `normalize_advantages` is off by
  default too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import Config
from rlhfkit.models import disable_dropout
from rlhfkit.ops.advantages import penalise_missing_eos, rloo_advantages, zero_std_share
from rlhfkit.ops.kl import kl_k1
from rlhfkit.ops.losses import rloo_policy_loss
from rlhfkit.rollout import collect_rollouts, forward_response, load_online_models, rollout_metrics
from rlhfkit.runio import MetricsLog, progress, read_metrics
from rlhfkit.training import (Runtime, loop_generators, loop_state, make_optimizer, optimizer_step, restore_loop_state,
                              save_checkpoint)


@dataclass
class RLOOTargets:
    """What phases 2-5 make of one batch. Shapes: B = prompts x K responses (K consecutive rows per prompt)."""

    penalised: torch.Tensor  # (B,) reward-model scores minus the missing-EOS penalty (objective/scores)
    kl: torch.Tensor  # (B,) sum over response tokens of logprobs - ref_logprobs (k1)
    rewards: torch.Tensor  # (B,) penalised - beta * kl: the KL-regularised sequence reward
    advantages: torch.Tensor  # (B,) rewards minus the mean reward of the other K - 1 responses to the prompt


def rloo_targets(raw_scores: torch.Tensor, ended: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                 mask: torch.Tensor, k: int, beta: float, missing_eos_penalty: float) -> RLOOTargets:
    """Phases 2b, 4 and 5 as one pure function of a batch, so a fixed-batch test can check it against a loop."""
    penalised = penalise_missing_eos(raw_scores, ended, missing_eos_penalty)  # (B,)
    kl = (kl_k1(logprobs, ref_logprobs) * mask.to(logprobs.dtype)).sum(1)  # (B,)
    rewards = penalised - beta * kl
    return RLOOTargets(penalised, kl, rewards, rloo_advantages(rewards, group_size=k))


def train_rloo(cfg: Config, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """Run RLOO into out_dir, resuming from out_dir/checkpoint when one exists."""
    start_time = time.time()  # moved back by the time spent before a resume, so wall_time_s is the whole run
    rc = cfg.rloo
    ckpt_dir = out_dir / "checkpoint"
    batch = rc.prompts_per_step * rc.k  # B, responses per iteration

    # Setup: policy (trained), reference (frozen SFT copy), reward model (frozen). No value model.
    m = load_online_models(cfg, task, sft_dir, rm_dir, ckpt_dir, rt)  # rlhfkit.rollout, shared by the online methods
    tokenizer, policy, reference, scorer, resume = m.tokenizer, m.policy, m.reference, m.scorer, m.resume
    disable_dropout(policy)  # with dropout, the first ratio would differ from 1 (TRL and OpenRLHF do the same)
    policy.train()
    params = list(policy.parameters())
    optimizer, scheduler = make_optimizer(params, rc.lr, rc.total_steps, final_fraction=1.0)
    prompt_rng, sample_gen, order_gen = loop_generators(cfg.seed, "rloo", rt.device)
    step = 0
    if resume:
        state = torch.load(ckpt_dir / "state.pt", weights_only=False)
        step, elapsed = restore_loop_state(state, optimizer, scheduler, prompt_rng, sample_gen, order_gen)
        start_time -= elapsed
    log = MetricsLog(out_dir / "metrics.jsonl", resume_after_step=step if resume else None)
    bar = progress(rc.total_steps, "rloo")
    bar.update(step)

    while step < rc.total_steps:
        # 1-3. Sample K responses per prompt, score the decoded text, log-probs of policy and reference, once
        # and without grad (rlhfkit.rollout, shared by every online method).
        prompts = task.prompts(rc.prompts_per_step, prompt_rng)
        r = collect_rollouts(policy, reference, scorer, tokenizer, prompts, k=rc.k, max_new_tokens=task.max_new_tokens,
                             temperature=rc.temperature, generator=sample_gen, rt=rt)
        mask = r.response_mask  # (B, Tr)

        # 2b, 4-5. Missing-EOS penalty, KL-regularised sequence rewards, leave-one-out advantages.
        t = rloo_targets(r.scores, r.ended, r.logprobs, r.ref_logprobs, mask, rc.k, rc.beta, rc.missing_eos_penalty)

        # 6. Epochs over shuffled minibatches of the (clipped) sequence-level REINFORCE loss.
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(rc.epochs):
            order = torch.randperm(batch, generator=order_gen).to(rt.device)
            for start in range(0, batch, rc.minibatch_size):
                idx = order[start : start + rc.minibatch_size]
                new_logprobs, _, _ = forward_response(policy, None, r.queries[idx], r.query_mask[idx], r.responses[idx],
                                                      mask[idx], rc.temperature, rt)  # (b, Tr)
                loss, loss_stats = rloo_policy_loss(new_logprobs, r.logprobs[idx], t.advantages[idx], mask[idx],
                                                    rc.clip_range)
                optimizer_step(loss, params, optimizer, max_grad_norm=rc.max_grad_norm)
                for key, v in {"loss/policy": loss, **loss_stats}.items():
                    stats.setdefault(key, []).append(v.detach())  # no .item() here: no device sync per minibatch
        scheduler.step()
        step += 1

        # 7. Log and checkpoint.
        record = {
            "step": step,
            "objective/scores": t.penalised.mean().item(),
            "objective/kl": t.kl.mean().item(),  # the estimate in the reward: k1, so equal to objective/kl_k1
            "objective/kl_k1": t.kl.mean().item(),
            "objective/kl_coef": rc.beta,
            "objective/rlhf_reward": t.rewards.mean().item(),
            "objective/zero_std_groups": zero_std_share(t.penalised, rc.k).item(),
            **{key: torch.stack(v).mean().item() for key, v in stats.items()},
            **rollout_metrics(r, task),
        }
        log.log(record)
        bar.update(1)
        bar.set_postfix(score=f"{record['objective/scores']:.2f}", kl=f"{record['objective/kl']:.3f}", refresh=False)
        if step % rc.checkpoint_every == 0 or step == rc.total_steps:
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
        "passes": {"sampled": step * batch, "forward": 3 * step * batch, "backward": step * batch * rc.epochs},
        "wall_time_s": time.time() - start_time,
    }


def run(cfg: Config, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/methods.py): RLOO from OUT's SFT policy against OUT's reward model."""
    return train_rloo(cfg, task, out / "sft" / "model", out / "reward" / "model", stage_dir, rt)
