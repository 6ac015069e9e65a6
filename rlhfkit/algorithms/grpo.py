"""GRPO, group relative policy optimisation, in one file (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of
Mathematical Reasoning in Open Language Models", Sec. 4.1, outcome supervision). No critic: each response's
advantage is its score's z-score within the K responses to the same prompt. Each iteration:

    1. sample K responses for each of prompts_per_step prompts (shared KV-cache sampler; K consecutive rows)
    2. score them with the reward model (text in); subtract the missing-EOS penalty
    3. logprobs (the old policy) and ref_logprobs (no grad); with one update per batch (epochs = 1, one
       minibatch) the old log-probs are the training pass's own, detached, and the rollout skips the policy's pass
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
  update pass per batch by default (the paper's mu = 1), so the ratio is 1 at the first minibatch. With one
  minibatch too, the policy that sampled is the one the update differentiates: its old log-probs are the training
  pass's, detached (TRL 1.12's GRPOTrainer skips old_per_token_logps the same way), one forward fewer per step. The
  ratio is then exactly 1 where a separate pass gave 1 within float rounding (~1e-7 in the log-probs).
- The reward model reads decoded text, a truncated response is scored with an EOS appended and lowered by
  `missing_eos_penalty`, dropout is off, the learning rate is constant: as PPO (rlhfkit/algorithms/ppo.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.algorithms import Method
from rlhfkit.core.config import F
from rlhfkit.models.forward import forward_response
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.advantages import grpo_advantages, penalise_missing_eos, zero_std_share
from rlhfkit.ops.kl import kl_k1, kl_k3
from rlhfkit.ops.losses import grpo_policy_loss
from rlhfkit.spine.online import check_group_section, start_online
from rlhfkit.spine.rollout import rollout_metrics


@dataclass
class GRPOConfig:
    """[grpo] GRPO: K samples per prompt, group-normalised advantages, KL in the loss (rlhfkit/algorithms/grpo.py)."""

    total_steps: int = F(200, "Step budget: iterations, each one batch of prompts_per_step x k samples.")
    prompts_per_step: int = F(8, "Prompts sampled per iteration.")
    k: int = F(16, "Completions sampled per prompt (G in the paper); advantages are z-scores within the group (k >= 2). On digits 16 reached the preferred first digit more reliably than 4 or 8 at the same batch size.")
    minibatch_size: int = F(128, "Samples per gradient step; must divide prompts_per_step * k (equal: one step per batch).")
    epochs: int = F(1, "Passes over each batch (mu in the paper; 1 with one minibatch: the ratio is 1, no clipping).")
    lr: float = F(2.5e-4, "AdamW learning rate (constant); at 5e-4 the preferred-first rate oscillated more around its equilibrium on digits; with policy.path, 1e-6 (1e-5 with LoRA) unless set.")
    beta: float = F(0.2, "KL coefficient of the per-token k3 KL term in the loss. The paper's 0.04 let digits' later positions collapse (KL 4.3, entropy 4.8 -> 1.2); docs/methods/grpo.md.")
    clip_range: float = F(0.2, "epsilon of the clipped per-token ratio.")
    max_grad_norm: float = F(1.0, "Gradient-norm clip; 0 disables.")
    missing_eos_penalty: float = F(1.0, "Subtracted from the score of a response that hit max_new_tokens without EOS.")
    temperature: float = F(1.0, "Sampling temperature.")
    checkpoint_every: int = F(20, "Save a resumable checkpoint every this many steps.")

    # lr for a pretrained policy.path (full fine-tuning, LoRA): TRL 1.12's GRPOConfig.learning_rate, and x10 for LoRA
    # (TRL's 'LoRA Without Regret' guide). The 2.5e-4 above suits a tiny model trained from scratch.
    PRETRAINED_LR = (1e-6, 1e-5)

    def validate(self, cfg, checks) -> None:
        """[grpo]'s rules (shared with the other group method: rlhfkit.spine.online.check_group_section)."""
        check_group_section("grpo", self, checks)


METHOD = Method("grpo", GRPOConfig, ("sft", "reward"),
                (("reward-model score", ("objective/scores",)), ("gold metrics on the rollouts", ("gold/*",)),
                 ("KL(policy || reference), nats", ("objective/kl_k1",))),
                resumable=True)


# Take the old log-probs from the training pass when the policy has not moved since sampling (module docstring);
# False: always the rollout's own pass (the tests compare the two).
REUSE_TRAINING_LOGPROBS = True


@dataclass
class GRPOTargets:
    """What phases 2 and 4 make of one batch. Shapes: B = prompts x K responses (K consecutive rows per prompt)."""

    penalised: torch.Tensor  # (B,) reward-model scores minus the missing-EOS penalty (objective/scores)
    advantages: torch.Tensor  # (B,) z-score of penalised within the prompt's group of K


def grpo_targets(raw_scores: torch.Tensor, ended: torch.Tensor, k: int, missing_eos_penalty: float) -> GRPOTargets:
    """Phases 2b and 4 as one pure function of a batch, so a fixed-batch test can check it against a loop."""
    penalised = penalise_missing_eos(raw_scores, ended, missing_eos_penalty)  # (B,)
    return GRPOTargets(penalised, grpo_advantages(penalised, group_size=k))


def train_grpo(cfg, task, sft_dir: Path, rm_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """Run GRPO into out_dir, resuming from out_dir/checkpoint when one exists."""
    gc = cfg.grpo
    batch = gc.prompts_per_step * gc.k  # B, responses per iteration

    # Setup (rlhfkit.spine.online, shared by the online methods): policy (trained), reference (frozen SFT policy),
    # reward (frozen). No value model.
    loop = start_online(cfg, task, sft_dir, rm_dir, out_dir, rt, name="grpo", lr=gc.lr, total_steps=gc.total_steps)
    # one optimiser step per batch: the old log-probs come from the training pass (module docstring)
    reuse = REUSE_TRAINING_LOGPROBS and gc.epochs == 1 and gc.minibatch_size == batch

    while loop.step < gc.total_steps:
        # 1-3. Sample K responses per prompt, score the decoded text, log-probs of policy and reference, once
        # and without grad (rlhfkit.spine.rollout, shared by every online method); with `reuse`, the reference's.
        r = loop.rollouts(gc.prompts_per_step, k=gc.k, temperature=gc.temperature, policy_logprobs=not reuse)
        mask = r.response_mask  # (B, Tr)
        if reuse:  # filled in phase 5, each row by the pass that trains on it
            r.logprobs, r.entropy = torch.zeros_like(r.ref_logprobs), torch.zeros_like(r.ref_logprobs)

        # 2b, 4. Missing-EOS penalty, group-normalised advantages (no KL in the reward).
        t = grpo_targets(r.scores, r.ended, gc.k, gc.missing_eos_penalty)

        # 5. Epochs over shuffled minibatches of the clipped per-token loss + beta * k3 KL (grpo_policy_loss).
        def loss(idx: torch.Tensor):
            new_logprobs, _, entropy = forward_response(loop.policy, None, r.queries[idx], r.query_mask[idx],
                                                        r.responses[idx], mask[idx], gc.temperature, rt,
                                                        with_entropy=reuse)  # (b, Tr)
            if reuse:  # the policy is still the one that sampled these rows: its log-probs are the old ones
                r.logprobs[idx], r.entropy[idx] = new_logprobs.detach() * mask[idx], entropy
            return grpo_policy_loss(new_logprobs, r.logprobs[idx], r.ref_logprobs[idx], t.advantages[idx], mask[idx],
                                    gc.clip_range, gc.beta)

        stats = loop.minibatch_epochs(batch, gc.epochs, gc.minibatch_size, loss, gc.max_grad_norm)
        loop.advance()

        # 6. Log and checkpoint.
        m = mask.to(r.logprobs.dtype)
        record = {
            "step": loop.step,
            "objective/scores": t.penalised.mean().item(),
            # the estimate in the loss (k3), summed over each response like PPO's, and the k1 sum
            "objective/kl": (kl_k3(r.logprobs, r.ref_logprobs) * m).sum(1).mean().item(),
            "objective/kl_k1": (kl_k1(r.logprobs, r.ref_logprobs) * m).sum(1).mean().item(),
            "objective/kl_coef": gc.beta,
            "objective/zero_std_groups": zero_std_share(t.penalised, gc.k).item(),
            **stats,
            **rollout_metrics(r, task),
        }
        loop.log_step(record)  # under several processes: the means over them, in place
        loop.maybe_checkpoint(gc.checkpoint_every)

    # sequences through a model per iteration: sampled once; reward model, policy and reference without
    # grad; the policy with grad in every epoch
    step = loop.step
    forward = (2 if reuse else 3) * step * batch
    return loop.finish(passes={"sampled": step * batch, "forward": forward, "backward": step * batch * gc.epochs})


def run(cfg, task, out: Path, stage_dir: Path, rt: Runtime) -> dict:
    """The pipeline's entry point (rlhfkit/algorithms/__init__.py): GRPO from OUT's SFT policy against OUT's
    reward model."""
    return train_grpo(cfg, task, out / "sft" / "model", out / "reward" / "model", stage_dir, rt)
