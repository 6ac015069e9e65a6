"""RLOO and GRPO group baselines (rlhfkit.ops.advantages) against plain loops and against TRL 1.12.0."""

import math
import statistics

import pytest
import torch

from rlhfkit.ops.advantages import grpo_advantages, rloo_advantages


def rloo_loop(groups):
    return [[r - sum(g[:i] + g[i + 1:]) / (len(g) - 1) for i, r in enumerate(g)] for g in groups]


def grpo_loop(groups, eps=1e-4):
    return [[(r - statistics.fmean(g)) / (statistics.stdev(g) + eps) for r in g] for g in groups]  # stdev: n - 1


def _scores(seed, N=7, K=4):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(N, K, generator=g, dtype=torch.float64) + 1


@pytest.mark.parametrize("K", [2, 3, 8])
def test_rloo_matches_loop(K):
    scores = _scores(K, K=K)
    expected = torch.tensor(rloo_loop(scores.tolist()), dtype=torch.float64)
    assert torch.allclose(rloo_advantages(scores), expected, rtol=1e-12, atol=1e-12)
    # flat (N * K,) with each prompt's K completions consecutive: same numbers, flat shape
    flat = rloo_advantages(scores.flatten(), group_size=K)
    assert flat.shape == (scores.numel(),) and torch.allclose(flat, expected.flatten(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [2, 3, 8])
def test_grpo_matches_loop(K):
    scores = _scores(K, K=K)
    expected = torch.tensor(grpo_loop(scores.tolist()), dtype=torch.float64)
    assert torch.allclose(grpo_advantages(scores), expected, rtol=1e-12, atol=1e-12)
    flat = grpo_advantages(scores.flatten(), group_size=K)
    assert flat.shape == (scores.numel(),) and torch.allclose(flat, expected.flatten(), rtol=1e-12, atol=1e-12)


def test_k2_by_hand():
    """K = 2: RLOO gives +-d, d = r_1 - r_2; GRPO +-(d / 2) / (|d| / sqrt(2) + eps), the unbiased std of two
    being |d| / sqrt(2): +-1 / sqrt(2) for eps = 0 (the biased std would give +-1)."""
    scores = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    assert rloo_advantages(scores).tolist() == [[2.0, -2.0], [-3.0, 3.0]]
    expected = [[1 / (2 / math.sqrt(2) + 1e-4), -1 / (2 / math.sqrt(2) + 1e-4)],
                [-1.5 / (3 / math.sqrt(2) + 1e-4), 1.5 / (3 / math.sqrt(2) + 1e-4)]]
    assert torch.allclose(grpo_advantages(scores), torch.tensor(expected, dtype=torch.float64), rtol=1e-14)
    assert grpo_advantages(scores, eps=0.0).abs().sub(1 / math.sqrt(2)).abs().max() < 1e-15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [2, 3, 5, 7])
def test_all_equal_groups_give_exactly_zero(K, dtype):
    """An all-equal group has no signal: advantages exactly 0 and no NaN, at any magnitude. (A plain
    mean(x, ..., x) misses x by an ulp for some x and K; TRL's GRPO then divides that by std + 1e-4 = 1e-4.)"""
    g = torch.Generator().manual_seed(K)
    values = (torch.rand(200, generator=g, dtype=torch.float64) * 2000 - 1000).to(dtype)
    scores = values[:, None].expand(-1, K).contiguous()  # (200, K)
    for fn in (rloo_advantages, grpo_advantages):
        adv = fn(scores)
        assert torch.isfinite(adv).all() and (adv == 0).all(), fn.__name__


def test_mixed_groups_are_independent():
    """One group's scores never move another's advantages (grouping is by rows of K consecutive scores)."""
    scores = _scores(0, N=3, K=4)
    changed = scores.clone()
    changed[1] += torch.tensor([5.0, -2.0, 0.0, 9.0], dtype=torch.float64)
    for fn in (rloo_advantages, grpo_advantages):
        a, b = fn(scores), fn(changed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and not torch.allclose(a[1], b[1])


def test_bad_shapes_rejected():
    for fn in (rloo_advantages, grpo_advantages):
        with pytest.raises(ValueError, match="K >= 2"):
            fn(torch.zeros(4, 1))
        with pytest.raises(ValueError, match="group_size"):
            fn(torch.zeros(6))
        with pytest.raises(ValueError, match="group_size"):
            fn(torch.zeros(7), group_size=2)
        with pytest.raises(ValueError, match="not 3"):
            fn(torch.zeros(2, 4), group_size=3)


# ---------------------------------------------------------------- TRL 1.12.0 as the reference

def _trl_nanstd():
    trl_utils = pytest.importorskip("trl.trainer.utils", reason="TRL is the reference: pip install -e '.[dev]'")
    return trl_utils.nanstd


def trl_rloo_advantages(rewards, num_generations):
    """Copied from trl 1.12.0, trl/trainer/rloo_trainer.py, RLOOTrainer._generate_and_score_completions, lines
    1582-1597 (normalize_advantages=False, the default; every completion scorable)."""
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)  # (num_prompts, 1)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)  # (num_prompts, 1)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)  # (num_prompts, num_generations)
    baselines = baselines.view(-1)  # Flatten back to match rewards shape
    return rewards - baselines


def trl_grpo_advantages(rewards, num_generations):
    """Copied from trl 1.12.0, trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions, lines
    2787-2809 (multi_objective_aggregation="sum_then_normalize" and scale_rewards="group", the defaults), with
    TRL's own nanstd (trl/trainer/utils.py: Bessel-corrected)."""
    nanstd = _trl_nanstd()
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    return advantages / (std_rewards + 1e-4)


@pytest.mark.parametrize("K", [2, 4, 16])
def test_rloo_and_grpo_match_trl(K):
    _trl_nanstd()
    rewards = _scores(K, N=32, K=K).float().flatten()  # (N * K,) float32, as TRL's rewards
    assert torch.allclose(rloo_advantages(rewards, group_size=K), trl_rloo_advantages(rewards, K), atol=1e-5)
    assert torch.allclose(grpo_advantages(rewards, group_size=K), trl_grpo_advantages(rewards, K), atol=1e-5)


def test_all_equal_groups_where_trl_rounds():
    """The one intended difference: on all-equal float32 groups TRL 1.12.0's GRPO returns ulp-sized residues divided
    by std + 1e-4 = 1e-4 (here up to ~0.5 at scores near 1000); ours are exactly 0 (test above)."""
    _trl_nanstd()
    K = 7
    values = torch.rand(200, generator=torch.Generator().manual_seed(7)) * 2000 - 1000
    rewards = values[:, None].expand(-1, K).contiguous().flatten()  # (200 * K,) float32
    assert trl_grpo_advantages(rewards, K).abs().max() > 0.1
    assert (grpo_advantages(rewards, group_size=K) == 0).all()


def test_trl_nanstd_is_the_unbiased_std():
    """Our GRPO std is torch.std's unbiased default; TRL's nanstd is the same on NaN-free groups (to ~1e-8: it
    forms Bessel's factor count / (count - 1) from integer counts, in float32). The biased std is sqrt(5/6) of it."""
    nanstd = _trl_nanstd()
    x = _scores(3, N=5, K=6)
    assert torch.allclose(nanstd(x, dim=1), x.std(dim=1), rtol=1e-6)
    assert not torch.allclose(nanstd(x, dim=1), x.std(dim=1, unbiased=False), rtol=1e-2)
