"""Masked statistics, whitening, generalised advantage estimation, running reward moments, and the group
baselines of RLOO and GRPO (K completions per prompt)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries; unbiased=True applies Bessel's correction n / (n - 1).

    The default follows TRL's masked_var (unbiased=True; trl 1.12.0 trl/experimental/ppo/ppo_trainer.py, earlier
    trl/core.py), so masked_whiten matches TRL's. lm-human-preferences' whiten (lm_human_preferences/utils/core.py)
    uses tf.nn.moments, the biased variance (unbiased=False here), over all entries without a mask. For the
    thousands of tokens of a PPO batch the factor n / (n - 1) is negligible. Unlike TRL (which divides by zero),
    one masked entry gives the biased variance, 0.
    """
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  total=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is added back
    (used for rewards, whose sign matters; lm-human-preferences `whiten(..., shift_mean=False)`).
    total: a function summing a tensor over every part of a batch split across processes (Engine.sum), so that
    the moments are the whole batch's (masked_var's, Bessel's correction included); None = this batch alone."""
    if total is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        m = mask.to(x.dtype)
        n = total(m.sum())
        mean = total((x * m).sum()) / n.clamp(min=1)
        var = total((((x - mean) ** 2) * m).sum()) / n.clamp(min=1)
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def penalise_missing_eos(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores (B,) minus `penalty` for each response that hit the token budget without EOS (ended (B,) bool
    False): TRL's `missing_eos_penalty`, shared by PPO, RLOO and GRPO."""
    return scores - penalty * (~ended).to(scores.dtype)


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards of RLHF (Ziegler et al. 2019, eq. 2; InstructGPT eq. 2):

        r_t = -beta * KL_t  on every response token,  + score  on the last response token

    scores (B,), kl and mask (B, T) with mask = 1 on a prefix of each row (EOS included when emitted).
    Summed over a row: score - beta * sum_t KL_t, the KL-regularised objective.
    """
    rewards = -kl_coef * kl * mask
    last = mask.long().sum(dim=1) - 1  # (B,) EOS, or the last token of a response cut at max_new_tokens
    rewards[torch.arange(len(last), device=rewards.device), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), vectorised over the batch.

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = sum_l (gamma * lam)^l * delta_{t+l}

    rewards, values, mask: (B, T) with mask = 1 on response tokens (a prefix of each row). The value after
    the last response token is 0 (the episode ends). Returns (advantages, returns), both (B, T), zero
    where mask = 0; returns = advantages + values are the critic's targets.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    returns = (advantages + values) * mask
    return advantages, returns


@dataclass
class RunningMoments:
    """Running mean and std of scalar scores (Chan et al. parallel update), for reward normalisation."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-4

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n, batch_mean = x.numel(), x.mean().item()
        batch_var = x.var(unbiased=False).item() if n > 1 else 0.0
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))


# ---------------------------------------------------------------- group baselines (K completions per prompt)

def _grouped(scores: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(N, K) view of scores given as (N, K), or as (N * K,) with each prompt's K completions consecutive
    (prompts repeated with repeat_interleave, TRL's layout); K >= 2."""
    if scores.dim() == 2:
        if group_size is not None and group_size != scores.shape[1]:
            raise ValueError(f"scores {tuple(scores.shape)} are (N, K) with K = {scores.shape[1]}, not {group_size}")
        grouped = scores
    elif scores.dim() == 1:
        if group_size is None or group_size < 1 or scores.numel() % group_size:
            raise ValueError(f"flat scores ({scores.numel()},) need group_size = K dividing their length")
        grouped = scores.view(-1, group_size)
    else:
        raise ValueError(f"scores must be (N, K) or (N * K,), got {tuple(scores.shape)}")
    if grouped.shape[1] < 2:
        raise ValueError("a group baseline needs K >= 2 completions per prompt")
    # Both baselines are shift-invariant; measuring from each group's first score makes an all-equal group
    # exactly 0 (mean(x, ..., x) can miss x by an ulp, which GRPO's 1 / (std + eps) then multiplies by 1e4).
    return grouped - grouped[:, :1]


def rloo_advantages(scores: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!";
    Ahmadian et al. 2024, "Back to Basics", RLOO):  A_i = r_i - 1/(K-1) sum_{j != i} r_j  within each
    prompt's group. scores (N, K) or (N * K,) with group_size = K; returns advantages of the same shape."""
    grouped = _grouped(scores, group_size)  # (N, K)
    K = grouped.shape[1]
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (K - 1)  # (N, K): mean of the other K - 1
    return (grouped - baseline).reshape(scores.shape)


def grpo_advantages(scores: torch.Tensor, group_size: int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantage of GRPO (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2, outcome supervision):
        A_i = (r_i - mean(r)) / (std(r) + eps)  within each prompt's group of K.
    std is the unbiased (Bessel, n - 1) standard deviation: the paper does not say which, and TRL
    (trainer/grpo_trainer.py, nanstd of trainer/utils.py), OpenRLHF and verl use torch.std's unbiased default;
    eps = 1e-4 as TRL. For K = 2 the advantages are +-1/sqrt(2). An all-equal group gives exactly 0.
    scores (N, K) or (N * K,) with group_size = K; returns advantages of the same shape."""
    grouped = _grouped(scores, group_size)  # (N, K)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # (N, 1), unbiased
    return (centered / (std + eps)).reshape(scores.shape)


def zero_std_share(scores: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Share of groups whose K scores are all equal: a group baseline gives them advantage 0, so they teach
    nothing (TRL's frac_reward_zero_std). scores (N, K) or (N * K,) with group_size = K."""
    return (_grouped(scores, group_size) == 0).all(dim=1).float().mean()
