"""Which sampled responses a self-training method fine-tunes on: pure functions of scores, no model.

Rows follow the rollout layout (rlhfkit.spine.rollout.Rollouts): `scores` (B,) are raw reward-model scores, `ended`
(B,) says whether the response emitted EOS, `group` (B,) is the index of the row's prompt.

The missing-EOS rule, shared by every function here: a response without EOS is never kept. The reward model
only learned to read its score at an EOS (it scores such a response with one appended, which is why PPO
lowers its score by ppo.missing_eos_penalty), and fine-tuning on it would append an EOS the policy never
sampled, teaching it to stop wherever the token budget happened to cut.
"""

from __future__ import annotations

import math

import torch


def best_in_group(scores: torch.Tensor, ended: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the row is the highest-scoring ended row of its group; ties go to the first such row. A
    group where nothing ended has no best row."""
    B = len(scores)
    n_groups = int(group.max()) + 1 if B else 0
    masked = torch.where(ended, scores.float(), torch.full_like(scores, -math.inf, dtype=torch.float32))  # (B,)
    group_max = torch.full((n_groups,), -math.inf, device=scores.device).scatter_reduce(
        0, group, masked, reduce="amax")  # (G,)
    is_max = ended & (masked == group_max[group])  # (B,) every row that reaches its group's best
    rows = torch.arange(B, device=scores.device)
    first = torch.full((n_groups,), B, device=scores.device).scatter_reduce(
        0, group, torch.where(is_max, rows, B), reduce="amin")  # (G,) first such row, B if none
    return is_max & (rows == first[group])


def rejection_sampling_keep(scores: torch.Tensor, ended: torch.Tensor, group: torch.Tensor,
                            threshold: float) -> torch.Tensor:
    """(B,) bool: Llama 2's rejection sampling (Touvron et al. 2023, Sec. 3.2.3) keeps the best of the K
    samples of each prompt; rlhfkit keeps it only when its score clears `threshold` (score >= threshold;
    -inf keeps every prompt's best, as Llama 2). At most one row per group."""
    return best_in_group(scores, ended, group) & (scores >= threshold)


def rest_thresholds(scores: torch.Tensor, ended: torch.Tensor, quantiles: list[float]) -> list[float]:
    """ReST's rising Improve thresholds tau_1 <= tau_2 <= ... for one Grow set (Gulcehre et al. 2023, Alg. 1:
    tau_1 > V = E_Dg[R], tau_{i+1} > tau_i). A Bradley-Terry reward is only defined up to an added constant,
    so tau_i is not a fixed number but the quantiles[i] quantile of the ended rows' scores, raised to their
    mean where it falls below (the paper's tau_1 > V, as >=). No ended row: every tau is +inf (nothing kept)."""
    eligible = scores[ended].float()
    if len(eligible) == 0:
        return [math.inf] * len(quantiles)
    mean = eligible.mean().item()
    q = torch.quantile(eligible, torch.tensor(quantiles, dtype=torch.float32, device=eligible.device))
    return [max(v, mean) for v in q.tolist()]


def rest_keep(scores: torch.Tensor, ended: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B,) bool: ReST's filter F(x, y; tau) = 1[R(x, y) >= tau] over the whole Grow set (not per prompt),
    for ended rows only."""
    return ended & (scores >= threshold)


def best_worst_pairs(scores: torch.Tensor, ended: torch.Tensor, group: torch.Tensor,
                     min_gap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Online DPO's preference pairs from K scored samples per prompt (Dong et al. 2024, "RLHF workflow": the best
    and the worst of several samples by the reward model): for each group, its best ended row (chosen) and its
    worst ended row (rejected), each tie going to the first such row (best_in_group). A group gives a pair only when
    best - worst > min_gap (min_gap >= 0): a tie, or a group with fewer than two ended rows, gives none.
    Returns (P,) chosen rows and (P,) rejected rows, in the order of the groups."""
    n_groups = int(group.max()) + 1 if len(scores) else 0
    best, worst = best_in_group(scores, ended, group), best_in_group(-scores, ended, group)  # (B,) one row a group
    rows = torch.arange(len(scores), device=scores.device)
    chosen = torch.full((n_groups,), -1, device=scores.device).scatter(0, group[best], rows[best])  # (G,) -1: none
    rejected = torch.full((n_groups,), -1, device=scores.device).scatter(0, group[worst], rows[worst])
    has = chosen >= 0  # every group with an ended row has both
    gap = torch.where(has, scores[chosen.clamp(min=0)] - scores[rejected.clamp(min=0)], -math.inf)  # (G,)
    usable = has & (gap > min_gap)
    return chosen[usable], rejected[usable]
