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

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.algorithms import Method
from rlhfkit.core.config import F
from rlhfkit.models.forward import forward_response
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.advantages import penalise_missing_eos, rloo_advantages, zero_std_share
from rlhfkit.ops.kl import kl_k1
from rlhfkit.ops.losses import rloo_policy_loss
from rlhfkit.spine.online import check_group_section, start_online
from rlhfkit.spine.rollout import rollout_metrics


@dataclass
class RLOOConfig:
    """[rloo] RLOO: K samples per prompt, KL in the reward, leave-one-out baseline (rlhfkit/algorithms/rloo.py)."""

    total_steps: int = F(100, "Step budget: iterations, each one batch of prompts_per_step x k samples.")
    prompts_per_step: int = F(32, "Prompts sampled per iteration.")
    k: int = F(4, "Completions sampled per prompt; each one's baseline is the mean reward of the other k - 1 (k >= 2).")
    minibatch_size: int = F(128, "Samples per gradient step; must divide prompts_per_step * k (equal: one step per batch).")
    epochs: int = F(1, "Passes over each batch (1 with one minibatch: plain REINFORCE, the clip is never active).")
    lr: float = F(5e-4, "AdamW learning rate (constant); with policy.path, 1e-6 (1e-5 with LoRA) unless set.")
    beta: float = F(0.6, "KL coefficient: reward = score - beta * sum_t (log pi - log pi_ref) over the response.")
    clip_range: float = F(0.2, "epsilon of the clipped sequence ratio (matters only after the first gradient step on a batch).")
    max_grad_norm: float = F(1.0, "Gradient-norm clip; 0 disables.")
    missing_eos_penalty: float = F(1.0, "Subtracted from the score of a response that hit max_new_tokens without EOS.")
    temperature: float = F(1.0, "Sampling temperature.")
    checkpoint_every: int = F(20, "Save a resumable checkpoint every this many steps.")

    # lr for a pretrained policy.path (full fine-tuning, LoRA): TRL 1.12's RLOOConfig.learning_rate, and x10 for LoRA.
    # The 5e-4 above suits a tiny model trained from scratch.
    PRETRAINED_LR = (1e-6, 1e-5)

    def validate(self, cfg, checks) -> None:
        """[rloo]'s rules (shared with the other group method: rlhfkit.spine.online.check_group_section)."""
        check_group_section("rloo", self, checks)


METHOD = Method("rloo", RLOOConfig, ("sft", "reward"),
                (("reward-model score", ("objective/scores",)), ("gold metrics on the rollouts", ("gold/*",)),
                 ("KL(policy || reference), nats", ("objective/kl_k1",))),
                resumable=True)


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


def train_rloo(cfg, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """Run RLOO into out_dir, resuming from out_dir/checkpoint when one exists."""
    rc = cfg.rloo
    batch = rc.prompts_per_step * rc.k  # B, responses per iteration

    # Setup (rlhfkit.spine.online, shared by the online methods): policy (trained), reference (frozen SFT policy),
    # reward (frozen). No value model.
    loop = start_online(cfg, task, sft_dir, rm_dir, out_dir, rt, name="rloo", lr=rc.lr, total_steps=rc.total_steps)

    while loop.step < rc.total_steps:
        # 1-3. Sample K responses per prompt, score the decoded text, log-probs of policy and reference, once
        # and without grad (rlhfkit.spine.rollout, shared by every online method).
        r = loop.rollouts(rc.prompts_per_step, k=rc.k, temperature=rc.temperature)
        mask = r.response_mask  # (B, Tr)

        # 2b, 4-5. Missing-EOS penalty, KL-regularised sequence rewards, leave-one-out advantages.
        t = rloo_targets(r.scores, r.ended, r.logprobs, r.ref_logprobs, mask, rc.k, rc.beta, rc.missing_eos_penalty)

        # 6. Epochs over shuffled minibatches of the (clipped) sequence-level REINFORCE loss.
        def loss(idx: torch.Tensor):
            new_logprobs, _, _ = forward_response(loop.policy, None, r.queries[idx], r.query_mask[idx], r.responses[idx],
                                                  mask[idx], rc.temperature, rt)  # (b, Tr)
            loss, loss_stats = rloo_policy_loss(new_logprobs, r.logprobs[idx], t.advantages[idx], mask[idx], rc.clip_range)
            return loss, {"loss/policy": loss, **loss_stats}

        stats = loop.minibatch_epochs(batch, rc.epochs, rc.minibatch_size, loss, rc.max_grad_norm)
        loop.advance()

        # 7. Log and checkpoint.
        record = {
            "step": loop.step,
            "objective/scores": t.penalised.mean().item(),
            "objective/kl": t.kl.mean().item(),  # the estimate in the reward: k1, so equal to objective/kl_k1
            "objective/kl_k1": t.kl.mean().item(),
            "objective/kl_coef": rc.beta,
            "objective/rlhf_reward": t.rewards.mean().item(),
            "objective/zero_std_groups": zero_std_share(t.penalised, rc.k).item(),
            **stats,
            **rollout_metrics(r, task),
        }
        loop.log_step(record)  # under several processes: the means over them, in place
        loop.maybe_checkpoint(rc.checkpoint_every)

    # sequences through a model per iteration: sampled once; reward model, policy and reference without
    # grad; the policy with grad in every epoch
    step = loop.step
    return loop.finish(passes={"sampled": step * batch, "forward": 3 * step * batch, "backward": step * batch * rc.epochs})


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/algorithms/__init__.py): RLOO from OUT's SFT policy against OUT's
    reward model."""
    return train_rloo(cfg, task, out / "sft" / "model", out / "reward" / "model", stage_dir, rt)
