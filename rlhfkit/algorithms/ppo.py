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
  several reward sources: rlhfkit/spine/reward_sources.py). The text is every sampled token before EOS, special
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
- ppo.value_init = 'shared' (off by default) puts the critic on the policy's own body, as TRL's earlier PPOTrainer
  did (AutoModelForCausalLMWithValueHead): one network, one forward for log-probs and values, the value loss
  (x vf_coef) training the body too; rlhfkit/models/value_head.py.
- With one minibatch per rollout batch (TRL's default, num_mini_batches = 1), one process and no gradient
  accumulation, the first update's forward (with grad) is the sampling policy's: its detached log-probs and values
  are the rollout's old ones, so phase 3 runs the reference alone and phases 4-5 wait for that forward (as GRPO
  does with its one update, and as TRL 1.12's GRPOTrainer); the first update's ratio is then exactly 1 and its
  value clipping idle, where a separate pass gave them within float rounding.
- With [sampling] filters on (top_k, top_p, min_p, repetition_penalty), tokens are drawn from the filtered
  distribution but logprobs, ref_logprobs and the KL are the model's at ppo.temperature without the filters
  (TRL's choice too); off by default, so the default run is exact. Stop strings end a response like EOS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.algorithms import Method
from rlhfkit.core.config import F
from rlhfkit.core.errors import ConfigError
from rlhfkit.models.forward import forward_response
from rlhfkit.models.load import load_scalar_model
from rlhfkit.models.runtime import Runtime
from rlhfkit.models.value_head import ValueHead
from rlhfkit.ops.advantages import (
    RunningMoments,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    penalise_missing_eos,
)
from rlhfkit.ops.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from rlhfkit.ops.losses import ppo_policy_loss, ppo_value_loss
from rlhfkit.spine.online import start_online
from rlhfkit.spine.reward_sources import check_value_init, value_reward_model
from rlhfkit.spine.rollout import rollout_metrics


@dataclass
class PPOConfig:
    """[ppo] PPO, the classic InstructGPT recipe (rlhfkit/algorithms/ppo.py)."""

    total_steps: int = F(120, "Step budget: PPO iterations, each one rollout batch.")
    rollout_batch_size: int = F(128, "Prompts sampled per PPO iteration.")
    minibatch_size: int = F(32, "Rollouts per gradient step; must divide rollout_batch_size.")
    ppo_epochs: int = F(4, "Passes over each rollout batch.")
    lr: float = F(5e-4, "AdamW learning rate for policy and value model; with policy.path, 3e-6 (3e-5 with LoRA) unless set.")
    kl_coef: float = F(0.6, "beta, the per-token KL penalty coefficient (initial value when adaptive_kl).")
    kl_estimator: str = F("k1", "Per-token KL estimator in the reward: 'k1', 'k2' or 'k3' (Schulman 2020).")
    adaptive_kl: bool = F(False, "Adapt beta towards target_kl (Ziegler et al. 2019).")
    target_kl: float = F(1.0, "Target KL per response (nats) for the adaptive controller.")
    kl_horizon: int = F(10000, "Horizon of the adaptive controller, in rollouts.")
    gamma: float = F(1.0, "Discount for GAE.")
    lam: float = F(0.95, "lambda for GAE.")
    clip_range: float = F(0.2, "epsilon of the clipped policy objective.")
    clip_range_value: float = F(0.2, "Clip range of the value loss.")
    vf_coef: float = F(0.1, "Weight of the value loss.")
    max_grad_norm: float = F(1.0, "Gradient-norm clip; 0 disables.")
    whiten_advantages: bool = F(True, "Whiten advantages per rollout batch.")
    reward_norm: bool = F(False, "Normalise scores by a running mean/std before shaping.")
    reward_clip: float = F(0.0, "Clip (normalised) scores to [-c, c]; 0 disables.")
    missing_eos_penalty: float = F(1.0, "Subtracted from the score of a response that hit max_new_tokens without EOS.")
    value_init: str = F("reward", "Value model initialisation: 'reward' (the reward model), 'policy' (the SFT policy) or "
                        "'shared' (no second network: a new value head on the policy's own body, one forward for "
                        "log-probs and values; the value loss trains the body too).")
    temperature: float = F(1.0, "Sampling temperature.")
    reward_threshold: float = F(math.inf, "Stop once the mean score of a rollout batch reaches this (inf = never).")
    checkpoint_every: int = F(20, "Save a resumable checkpoint every this many steps.")

    # lr for a pretrained policy.path (full fine-tuning, LoRA): TRL 1.12's PPOConfig.learning_rate
    # (trl.experimental.ppo), and x10 for LoRA (the value model, a full model, shares it). The 5e-4 above suits a
    # tiny model trained from scratch.
    PRETRAINED_LR = (3e-6, 3e-5)

    def validate(self, cfg, checks) -> None:
        """[ppo]'s rules (Config.validate calls each method section's; `checks`: rlhfkit.core.config.Checks)."""
        need, ref = checks.need, checks.ref
        checks.at_least_one("ppo.total_steps", "ppo.rollout_batch_size", "ppo.minibatch_size", "ppo.ppo_epochs",
                            "ppo.checkpoint_every", "ppo.kl_horizon")
        need(self.minibatch_size <= self.rollout_batch_size, "ppo.minibatch_size",
             f"larger than {ref('ppo.rollout_batch_size')}, so a rollout batch holds no full minibatch and PPO "
             "would make no optimiser step; lower ppo.minibatch_size or raise ppo.rollout_batch_size")
        need(self.rollout_batch_size % self.minibatch_size == 0, "ppo.minibatch_size",
             f"must divide {ref('ppo.rollout_batch_size')}")
        need(self.kl_estimator in KL_ESTIMATORS, "ppo.kl_estimator", "choose 'k1', 'k2' or 'k3'")
        need(self.value_init in ("reward", "policy", "shared"), "ppo.value_init", "choose 'reward', 'policy' or 'shared'")
        need(self.kl_coef >= 0, "ppo.kl_coef", "must be >= 0 (0 disables the KL penalty)")
        need(self.target_kl > 0, "ppo.target_kl", "must be > 0")
        need(0 <= self.gamma <= 1, "ppo.gamma", "must be in [0, 1]")
        need(0 <= self.lam <= 1, "ppo.lam", "must be in [0, 1]")
        need(self.clip_range > 0, "ppo.clip_range", "must be > 0")
        need(self.clip_range_value > 0, "ppo.clip_range_value", "must be > 0")
        checks.positive("ppo.lr", "ppo.temperature")
        if cfg.method == "ppo" and self.value_init == "reward":
            need(any(s.kind == "reward_model" for s in cfg.reward.sources) or not cfg.reward.sources, "ppo.value_init",
                 "'reward' initialises the value model from a reward model, and reward.sources holds no kind = "
                 "'reward_model'; set ppo.value_init = 'policy' (or 'shared')")


# Take the old log-probs and values from the first update's forward when it is the sampling policy's (module
# docstring); False: always the rollout's own pass (the tests compare the two).
REUSE_TRAINING_PASS = True


METHOD = Method("ppo", PPOConfig, ("sft", "reward"),
                (("reward-model score", ("objective/scores",)), ("KL(policy || reference), nats", ("objective/kl_k1",))),
                resumable=True)


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
                score_moments: RunningMoments | None = None, *, total=None, gather=None) -> PPOTargets:
    """The composition of phases 2 (penalty, normalisation), 4 (shaped rewards) and 5 (advantages), as one
    pure function of a rollout batch so a fixed-batch test can check it against a loop reference.
    `score_moments` (updated in place) is used when pc.reward_norm is on. Under several processes each holds part
    of the batch: `total` sums a tensor over the parts and `gather` concatenates them (Engine.sum, Engine.gather),
    so that the normalisation and the whitening are the whole batch's."""
    mask = mask.to(logprobs.dtype)
    logprobs, ref_logprobs, values = logprobs * mask, ref_logprobs * mask, values * mask

    # 2b. Penalise responses that never emitted EOS; optionally normalise and clip the scores.
    penalised = penalise_missing_eos(raw_scores, ended, pc.missing_eos_penalty)
    scores = penalised
    if pc.reward_norm:
        score_moments.update(scores if gather is None else gather(scores))
        scores = (scores - score_moments.mean) / score_moments.std
    if pc.reward_clip > 0:
        scores = scores.clamp(-pc.reward_clip, pc.reward_clip)

    # 4. Shaped rewards: per-token KL penalty, plus the score at the last response token.
    kl = KL_ESTIMATORS[pc.kl_estimator](logprobs, ref_logprobs) * mask  # (B, Tr)
    rewards = kl_penalized_rewards(scores, kl, mask, kl_coef)  # (B, Tr)

    # 5. Advantages (GAE) and returns; whiten advantages over the batch.
    advantages, returns = gae(rewards, values, mask, pc.gamma, pc.lam)
    if pc.whiten_advantages:
        advantages = masked_whiten(advantages, mask, total=total)
    return PPOTargets(penalised, scores, kl, rewards, advantages, returns)


def train_ppo(cfg, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """Run PPO into out_dir, resuming from out_dir/checkpoint when one exists."""
    pc = cfg.ppo

    # Setup (rlhfkit.spine.online, shared by the online methods): policy (trained), reference (frozen SFT policy),
    # reward (frozen), and PPO's own: the value model (trained), started from the reward model or the SFT policy,
    # or a value head on the policy's own body (value_init = 'shared': one forward gives log-probs and values).
    def value_model(m) -> dict:
        saved = out_dir / "checkpoint" / "value"
        if m.resume and (saved / "value_head.json").is_file() != (pc.value_init == "shared"):
            raise ConfigError(f"{saved} was written with {'a' if pc.value_init != 'shared' else 'no'} value head on "
                              f"the policy, and this run has ppo.value_init = {pc.value_init!r}; resume with the "
                              "value_init that wrote it, or start the stage afresh")
        if pc.value_init == "shared":
            torch.manual_seed(cfg.seed)  # the head is new
            return {"value": ValueHead.from_pretrained(saved, rt.device) if m.resume else ValueHead.on(m.policy)}
        value_rm = value_reward_model(cfg, rm_dir)  # the run's reward model, or the first 'reward_model' source
        if pc.value_init == "reward":  # a decoder reading the policy's tokens (not an encoder, not another vocabulary)
            check_value_init(value_rm, m.tokenizer)
        value_src = saved if m.resume else (value_rm if pc.value_init == "reward" else sft_dir)
        torch.manual_seed(cfg.seed)  # a value head initialised from the policy is new
        return {"value": load_scalar_model(value_src, rt.device, "value model")}

    loop = start_online(cfg, task, sft_dir, rm_dir, out_dir, rt, name="ppo", lr=pc.lr, total_steps=pc.total_steps,
                       extra_models=value_model)
    policy, value_model = loop.policy, loop.models["value"]
    kl_ctl = (AdaptiveKLController(pc.kl_coef, pc.target_kl, pc.kl_horizon) if pc.adaptive_kl
              else FixedKLController(pc.kl_coef))
    score_moments = RunningMoments()
    if loop.resume:
        kl_ctl.value = loop.state["kl_coef"]
        score_moments = RunningMoments(**loop.state["score_moments"])
    stopped_by_threshold = False
    # the first update's forward is the sampling policy's: the old log-probs and values come from it (docstring)
    reuse = REUSE_TRAINING_PASS and pc.minibatch_size == pc.rollout_batch_size and rt.accumulation == 1 \
        and loop.engine.world == 1

    while loop.step < pc.total_steps:
        # 1-3. Sample a rollout batch (shared KV-cache sampler), score the decoded text with the reward model,
        # and compute log-probs under the policy and the reference and the values, once, without grad
        # (rlhfkit.spine.rollout, shared by every online method); with `reuse`, the reference's alone.
        r = loop.rollouts(pc.rollout_batch_size, temperature=pc.temperature, value_model=None if reuse else value_model,
                          policy_logprobs=not reuse)
        queries, query_mask, responses, mask = r.queries, r.query_mask, r.responses, r.response_mask  # (B, Tq|Tr)

        # 4-5. Shaped rewards, GAE advantages and returns (ppo_targets, tested against a loop reference);
        # the missing-EOS penalty (2b) is applied there too. With `reuse`, once the first update's forward has given
        # the old log-probs and values.
        def targets() -> PPOTargets:
            return ppo_targets(r.scores, r.ended, r.logprobs, r.ref_logprobs, r.values, mask, pc, kl_ctl.value,
                               score_moments, total=loop.engine.sum if loop.engine.world > 1 else None,
                               gather=loop.engine.gather)

        t = None if reuse else targets()

        # 6. PPO epochs over shuffled minibatches: clipped policy loss + vf_coef * clipped value loss.
        def loss(idx: torch.Tensor):
            nonlocal t
            new_logprobs, new_values, entropy = forward_response(
                policy, value_model, queries[idx], query_mask[idx], responses[idx], mask[idx], pc.temperature, rt,
                with_entropy=t is None)
            if t is None:  # the first update, over the whole batch: the sampling policy's log-probs and values
                r.logprobs, r.values, r.entropy = (torch.empty_like(new_logprobs) for _ in range(3))
                r.logprobs[idx], r.values[idx], r.entropy[idx] = new_logprobs.detach(), new_values.detach(), entropy
                t = targets()
            pg_loss, pg_stats = ppo_policy_loss(new_logprobs, r.logprobs[idx], t.advantages[idx], mask[idx],
                                                pc.clip_range)
            vf_loss, vf_stats = ppo_value_loss(new_values, r.values[idx], t.returns[idx], mask[idx],
                                               pc.clip_range_value)
            return pg_loss + pc.vf_coef * vf_loss, {"loss/policy": pg_loss, "loss/value": vf_loss, **pg_stats, **vf_stats}

        policy.train()
        stats = loop.minibatch_epochs(pc.rollout_batch_size, pc.ppo_epochs, pc.minibatch_size, loss, pc.max_grad_norm,
                                      units=lambda idx: mask[idx].sum())  # both losses are means over tokens
        loop.advance()
        logprobs, ref_logprobs, values = r.logprobs, r.ref_logprobs, r.values

        # 7. Log, update the KL coefficient, checkpoint, stop at the threshold.
        mean_kl = t.kl.sum(1).mean().item()  # per response, with the configured estimator
        kl_k1 = (logprobs - ref_logprobs).sum(1).mean().item()  # unbiased: what the adaptive controller tracks
        record = {
            "step": loop.step,
            "objective/scores": t.penalised.mean().item(),
            "objective/kl": mean_kl,
            "objective/kl_k1": kl_k1,
            "objective/kl_coef": kl_ctl.value,
            "objective/rlhf_reward": (t.penalised - kl_ctl.value * t.kl.sum(1)).mean().item(),
            "value/mean": masked_mean(values, mask).item(),
            "value/returns": masked_mean(t.returns, mask).item(),
            **stats,
            # entropy, EOS, length, and the task's true objective on the same rollouts (proxy vs gold)
            **rollout_metrics(r, task),
        }
        loop.log_step(record)  # under several processes: the means over them, in place
        kl_ctl.update(record["objective/kl_k1"], pc.rollout_batch_size)
        stopped_by_threshold = record["objective/scores"] >= pc.reward_threshold
        loop.maybe_checkpoint(pc.checkpoint_every, force=stopped_by_threshold, kl_coef=kl_ctl.value,
                             score_moments=vars(score_moments))
        if stopped_by_threshold:
            break

    step, shared = loop.step, pc.value_init == "shared"
    return loop.finish(
        stopped_by_threshold=stopped_by_threshold,
        final_kl_coef=loop.last_logged()["objective/kl_coef"],
        # sequences through a model per iteration: sampled once; policy, value model, reference and reward
        # model without grad; policy and value model with grad in every PPO epoch (a value head on the policy
        # rides on the policy's passes; with `reuse` the first update's forward stands in for the rollout's policy
        # and value passes: the reference and the reward model remain)
        passes={"sampled": step * pc.rollout_batch_size,
                "forward": (2 if reuse else 4 - shared) * step * pc.rollout_batch_size,
                "backward": (2 - shared) * step * pc.rollout_batch_size * pc.ppo_epochs},
    )


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/algorithms/__init__.py): PPO from OUT's SFT policy against OUT's reward
    model."""
    return train_ppo(cfg, task, out / "sft" / "model", out / "reward" / "model", stage_dir, rt)
