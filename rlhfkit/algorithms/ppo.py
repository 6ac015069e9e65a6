"""PPO for language models, the classic InstructGPT recipe, in one file.

References: Ziegler et al. (2019) "Fine-Tuning Language Models from Human Preferences" and its code
(lm-human-preferences); Stiennon et al. (2020); Ouyang et al. (2022) "InstructGPT"; Huang et al. (2024)
"The N+ Implementation Details of RLHF with PPO". Each iteration:

    1. sample a rollout batch (shared KV-cache sampler)      5. GAE advantages and returns; whiten
    2. score responses with the reward model (text in)       6. PPO epochs over minibatches: clipped policy
    3. logprobs, ref_logprobs, values (no grad)                 loss + vf_coef * clipped value loss
    4. shaped rewards: -beta * KL_t per token, + score       7. log, update beta, checkpoint, maybe stop
       at the last response token

Deviations from the papers, on purpose:
- No pretraining-mix loss (PPO-ptx) and no entropy bonus; the KL penalty alone regularises.
- The reward model sees decoded text and re-tokenises it with its own tokenizer (an encoder reward model, or
  several reward sources: rlhfkit/reward_sources.py). The text is every sampled token before EOS, special
  tokens included (a `<unk>` sampled mid-response stays visible to the reward model and the gold labeler
  instead of silently vanishing).
- The score sits on the last response token: EOS when the response ended (OpenRLHF's convention; TRL's
  PPO trainer puts it on the last token before the first pad, the token before EOS when pad = EOS).
  A response that hit max_new_tokens without EOS is still scored with an EOS appended, because a decoder
  reward model only ever learned to read its score at an EOS (an encoder reads the pair, no EOS); its score is lowered by
  `missing_eos_penalty` (TRL's convention) instead of being replaced by a fixed low score.
- The adaptive KL controller is fed the k1 estimate (sum of log-ratios, unbiased, as Ziegler et al.) even
  when the reward uses k2, which is biased low for large KL.
- `objective/entropy` is the per-response sum of token entropies averaged over responses (TRL's
  definition); docs/metrics.md lists each metric's exact definition.
- One AdamW for policy and value model (separate parameter sets, same learning rate), constant LR.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import Config, PPOConfig
from rlhfkit.models import disable_dropout, load_scalar_model
from rlhfkit.ops.advantages import (RunningMoments, gae, kl_penalized_rewards, masked_mean, masked_whiten,
                                    penalise_missing_eos)
from rlhfkit.ops.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from rlhfkit.ops.losses import ppo_policy_loss, ppo_value_loss
from rlhfkit.reward_sources import check_value_init, value_reward_model
from rlhfkit.rollout import collect_rollouts, forward_response, load_online_models, rollout_metrics
from rlhfkit.runio import MetricsLog, progress, read_metrics
from rlhfkit.training import (Runtime, loop_generators, loop_state, make_optimizer, optimizer_step, restore_loop_state,
                              save_checkpoint)


@dataclass
class PPOTargets:
    """What phases 2-5 make of one rollout batch. Shapes: B responses, Tr response tokens."""

    penalised: torch.Tensor  # (B,) reward-model scores minus the missing-EOS penalty (objective/scores)
    scores: torch.Tensor  # (B,) the same after normalisation and clipping: what enters the reward
    kl: torch.Tensor  # (B, Tr) per-token KL estimate used in the reward, 0 outside the mask
    rewards: torch.Tensor  # (B, Tr) -beta * kl, plus the score at the last response token
    advantages: torch.Tensor  # (B, Tr) GAE, whitened over the batch when configured
    returns: torch.Tensor  # (B, Tr) GAE advantages (before whitening) + values: the critic's targets


def ppo_targets(raw_scores: torch.Tensor, ended: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                values: torch.Tensor, mask: torch.Tensor, pc: PPOConfig, kl_coef: float,
                score_moments: RunningMoments | None = None) -> PPOTargets:
    """The composition of phases 2 (penalty, normalisation), 4 (shaped rewards) and 5 (advantages), as one
    pure function of a rollout batch so a fixed-batch test can check it against a loop reference.
    `score_moments` (updated in place) is used when pc.reward_norm is on."""
    mask = mask.to(logprobs.dtype)
    logprobs, ref_logprobs, values = logprobs * mask, ref_logprobs * mask, values * mask

    # 2b. Penalise responses that never emitted EOS; optionally normalise and clip the scores.
    penalised = penalise_missing_eos(raw_scores, ended, pc.missing_eos_penalty)
    scores = penalised
    if pc.reward_norm:
        score_moments.update(scores)
        scores = (scores - score_moments.mean) / score_moments.std
    if pc.reward_clip > 0:
        scores = scores.clamp(-pc.reward_clip, pc.reward_clip)

    # 4. Shaped rewards: per-token KL penalty, plus the score at the last response token.
    kl = KL_ESTIMATORS[pc.kl_estimator](logprobs, ref_logprobs) * mask  # (B, Tr)
    rewards = kl_penalized_rewards(scores, kl, mask, kl_coef)  # (B, Tr)

    # 5. Advantages (GAE) and returns; whiten advantages over the batch.
    advantages, returns = gae(rewards, values, mask, pc.gamma, pc.lam)
    if pc.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return PPOTargets(penalised, scores, kl, rewards, advantages, returns)


def train_ppo(cfg: Config, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """Run PPO into out_dir, resuming from out_dir/checkpoint when one exists."""
    start_time = time.time()  # moved back by the time spent before a resume, so wall_time_s is the whole run
    pc = cfg.ppo
    ckpt_dir = out_dir / "checkpoint"

    # Setup: policy (trained), reference (frozen SFT copy), reward model (frozen), value model (trained).
    m = load_online_models(cfg, task, sft_dir, rm_dir, ckpt_dir, rt)  # rlhfkit.rollout, shared by the online methods
    tokenizer, policy, reference, scorer, resume = m.tokenizer, m.policy, m.reference, m.scorer, m.resume
    value_rm = value_reward_model(cfg, rm_dir)  # the run's reward model, or the first 'reward_model' source
    if pc.value_init == "reward":  # a decoder reading the policy's tokens (not an encoder, not another vocabulary)
        check_value_init(value_rm, tokenizer)
    value_src = ckpt_dir / "value" if resume else (value_rm if pc.value_init == "reward" else sft_dir)
    torch.manual_seed(cfg.seed)  # a value head initialised from the policy is new
    value_model = load_scalar_model(value_src, rt.device, "value model")
    # Dropout off: with it, new/old ratios differ from 1 before any update (TRL and OpenRLHF do the same).
    disable_dropout(policy), disable_dropout(value_model)
    policy.train(), value_model.train()
    params = list(policy.parameters()) + list(value_model.parameters())
    optimizer, scheduler = make_optimizer(params, pc.lr, pc.total_steps, final_fraction=1.0)
    kl_ctl = (AdaptiveKLController(pc.kl_coef, pc.target_kl, pc.kl_horizon) if pc.adaptive_kl
              else FixedKLController(pc.kl_coef))
    score_moments = RunningMoments()
    prompt_rng, sample_gen, order_gen = loop_generators(cfg.seed, "ppo", rt.device)
    step = 0
    if resume:
        state = torch.load(ckpt_dir / "state.pt", weights_only=False)
        step, elapsed = restore_loop_state(state, optimizer, scheduler, prompt_rng, sample_gen, order_gen)
        start_time -= elapsed
        kl_ctl.value = state["kl_coef"]
        score_moments = RunningMoments(**state["score_moments"])
    log = MetricsLog(out_dir / "metrics.jsonl", resume_after_step=step if resume else None)
    bar = progress(pc.total_steps, "ppo")
    bar.update(step)
    n_mini = pc.rollout_batch_size // pc.minibatch_size
    stopped_by_threshold = False

    while step < pc.total_steps:
        # 1-3. Sample a rollout batch (shared KV-cache sampler), score the decoded text with the reward model,
        # and compute log-probs under the policy and the reference and the values, once, without grad
        # (rlhfkit.rollout, shared by every online method).
        prompts = task.prompts(pc.rollout_batch_size, prompt_rng)
        r = collect_rollouts(policy, reference, scorer, tokenizer, prompts, value_model=value_model,
                             max_new_tokens=task.max_new_tokens, temperature=pc.temperature, generator=sample_gen, rt=rt)
        queries, query_mask, responses, mask = r.queries, r.query_mask, r.responses, r.response_mask  # (B, Tq|Tr)
        logprobs, ref_logprobs, values = r.logprobs, r.ref_logprobs, r.values

        # 4-5. Shaped rewards, GAE advantages and returns (ppo_targets, tested against a loop reference);
        # the missing-EOS penalty (2b) is applied there too.
        t = ppo_targets(r.scores, r.ended, logprobs, ref_logprobs, values, mask, pc, kl_ctl.value, score_moments)
        advantages, returns = t.advantages, t.returns

        # 6. PPO epochs over shuffled minibatches.
        policy.train()
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(pc.ppo_epochs):
            order = torch.randperm(pc.rollout_batch_size, generator=order_gen).to(rt.device)
            for m in range(n_mini):
                idx = order[m * pc.minibatch_size : (m + 1) * pc.minibatch_size]
                mb_mask = mask[idx]
                new_logprobs, new_values, _ = forward_response(
                    policy, value_model, queries[idx], query_mask[idx], responses[idx], mb_mask, pc.temperature, rt)
                pg_loss, pg_stats = ppo_policy_loss(new_logprobs, logprobs[idx], advantages[idx], mb_mask, pc.clip_range)
                vf_loss, vf_stats = ppo_value_loss(new_values, values[idx], returns[idx], mb_mask, pc.clip_range_value)
                loss = pg_loss + pc.vf_coef * vf_loss
                optimizer_step(loss, params, optimizer, max_grad_norm=pc.max_grad_norm)
                for k, v in {"loss/policy": pg_loss, "loss/value": vf_loss, **pg_stats, **vf_stats}.items():
                    stats.setdefault(k, []).append(v.detach())  # no .item() here: no device sync per minibatch
        scheduler.step()
        step += 1

        # 7. Log, update the KL coefficient, checkpoint, stop at the threshold.
        mean_kl = t.kl.sum(1).mean().item()  # per response, with the configured estimator
        kl_k1 = (logprobs - ref_logprobs).sum(1).mean().item()  # unbiased: what the adaptive controller tracks
        record = {
            "step": step,
            "objective/scores": t.penalised.mean().item(),
            "objective/kl": mean_kl,
            "objective/kl_k1": kl_k1,
            "objective/kl_coef": kl_ctl.value,
            "objective/rlhf_reward": (t.penalised - kl_ctl.value * t.kl.sum(1)).mean().item(),
            "value/mean": masked_mean(values, mask).item(),
            "value/returns": masked_mean(returns, mask).item(),
            **{k: torch.stack(v).mean().item() for k, v in stats.items()},
            # entropy, EOS, length, and the task's true objective on the same rollouts (proxy vs gold)
            **rollout_metrics(r, task),
        }
        log.log(record)
        kl_ctl.update(kl_k1, pc.rollout_batch_size)
        bar.update(1)
        bar.set_postfix(score=f"{record['objective/scores']:.2f}", kl=f"{mean_kl:.3f}", refresh=False)
        if record["objective/scores"] >= pc.reward_threshold:
            stopped_by_threshold = True
        if step % pc.checkpoint_every == 0 or step == pc.total_steps or stopped_by_threshold:
            save_checkpoint(ckpt_dir, {"policy": policy, "value": value_model}, tokenizer, loop_state(
                step, optimizer, scheduler, prompt_rng, sample_gen, order_gen, time.time() - start_time,
                kl_coef=kl_ctl.value, score_moments=vars(score_moments)))
        if stopped_by_threshold:
            break
    bar.close()
    log.close()

    policy.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    last = read_metrics(out_dir / "metrics.jsonl")[-1]
    return {
        "steps": step,
        "stopped_by_threshold": stopped_by_threshold,
        "final_scores": last["objective/scores"],
        "final_kl": last["objective/kl_k1"],
        "final_kl_coef": last["objective/kl_coef"],
        "resumed": resume,
        # sequences through a model per iteration: sampled once; policy, value model, reference and reward
        # model without grad; policy and value model with grad in every PPO epoch
        "passes": {"sampled": step * pc.rollout_batch_size, "forward": 4 * step * pc.rollout_batch_size,
                   "backward": 2 * step * pc.rollout_batch_size * pc.ppo_epochs},
        "wall_time_s": time.time() - start_time,
    }


def run(cfg: Config, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/methods.py): PPO from OUT's SFT policy against OUT's reward model."""
    return train_ppo(cfg, task, out / "sft" / "model", out / "reward" / "model", stage_dir, rt)
