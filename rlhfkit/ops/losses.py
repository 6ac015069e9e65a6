"""Every loss, as a small pure tensor function with its equation and source.

Each returns a scalar loss (mean over the batch / masked tokens) and, where useful, a dict of detached
statistics named in the metric vocabulary (docs/metrics.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.ops.advantages import masked_mean


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None):
    """Reward-model loss -log sigma(r(x, y_c) - r(x, y_r) - m) (Bradley & Terry 1952; InstructGPT eq. 1;
    margin m from Llama 2, Touvron et al. 2023, eq. 2). Inputs (B,); margin 0 where unknown."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    return loss, {"accuracy": (chosen_scores > rejected_scores).float().mean().detach()}


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token:
        L = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)),  rho = exp(logprobs - old_logprobs)
    All (B, T); mean over masked tokens."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        # k3 estimate of KL(old || new) from tokens sampled under old: (rho - 1) - log rho (kl.py), a
        # stable "how far did this epoch move" signal (TRL logs k2 = lr^2 / 2, unmasked, instead)
        "policy/approxkl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).detach(),
        "policy/ratio": masked_mean(ratio, mask).detach(),
    }
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip_range_value: float):
    """Clipped value loss (lm-human-preferences; Schulman et al. 2017's PPO baselines):
        L = 1/2 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2). All (B, T); mean over masked tokens.

    clamp(V, lo, hi) returns V itself inside the range, so the two branches tie exactly there and
    value/clipfrac counts only tokens where clipping is active (V_old + clamp(V - V_old, -eps, eps) rounds,
    which counted ~0.1% of in-range tokens as clipped). TRL's PPO trainer clamps the same way."""
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"value/clipfrac": masked_mean((clipped > unclipped).float(), mask).detach()}


def sft_loss(logprobs: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per completion token (prompt tokens carry no loss). (B, T) -> scalar."""
    return -masked_mean(logprobs, completion_mask)
