"""Value tests for every preference loss table in rlhfkit.ops.losses, and TRL as the reference where it has the loss.

Each table entry has a value test on hand-computed inputs (listed in VALUE_TESTS; the meta-test fails when an
entry has none), a gradient-direction test, and where TRL 1.12.0 implements the same loss a comparison with it.
"""

import inspect
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhfkit.ops import losses
from rlhfkit.ops.losses import (
    DPO_LOSSES,
    KTO_LOSSES,
    REFERENCE_FREE_LOSSES,
    RANKING_LOSSES,
    bradley_terry_loss,
    dpo_conservative_loss,
    dpo_hinge_loss,
    dpo_ipo_loss,
    dpo_plackett_luce_loss,
    dpo_sigmoid_loss,
    kto_loss,
    kto_reference_point,
    plackett_luce_loss,
    ranked_pairs_bradley_terry_loss,
    ranks_from_tie_groups,
    orpo_loss,
    simpo_loss,
)

DPO_STAT_NAMES = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                  "logps/rejected"}


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def _pairs(h):
    """Policy/reference log-probs whose log-ratio difference is h: (pc, pr, rc, rr), pc - rc = h, the rest 0."""
    h = torch.as_tensor(h, dtype=torch.float64)
    return h.clone(), torch.zeros_like(h), torch.zeros_like(h), torch.zeros_like(h)


def _grads(fn, pc, pr, rc, rr, *args, **kwargs):
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    fn(pc, pr, rc, rr, *args, **kwargs)[0].backward()
    return pc.grad, pr.grad


# ---------------------------------------------------------------- DPO family: values at hand-computed points

def test_dpo_sigmoid_value():
    # policy = reference: h = 0, loss = -log sigma(0) = ln 2 exactly, in float32 and float64
    for dtype in (torch.float32, torch.float64):
        logps = torch.tensor([-3.0, -7.5, -1.25], dtype=dtype)
        loss, _ = dpo_sigmoid_loss(logps, logps - 2, logps, logps - 2, beta=0.1)
        assert loss.item() == torch.tensor(math.log(2), dtype=dtype).item()
    # h = (-1 - -2) - (-4 - -3) = 2 and h = -1, beta = 0.5
    loss, _ = dpo_sigmoid_loss(_t(-1.0, -2.0), _t(-4.0, -3.0), _t(-2.0, -2.0), _t(-3.0, -4.0), beta=0.5)
    expected = (math.log1p(math.exp(-0.5 * 2)) + math.log1p(math.exp(-0.5 * -1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_dpo_conservative_value():
    pc, pr, rc, rr = _t(-1.0, -2.0, -5.0), _t(-4.0, -3.0, -1.0), _t(-2.0, -2.0, -3.0), _t(-3.0, -4.0, -2.0)
    # eps = 0 is DPO, in value and gradient
    assert dpo_conservative_loss(pc, pr, rc, rr, 0.3, 0.0)[0].item() == dpo_sigmoid_loss(pc, pr, rc, rr, 0.3)[0].item()
    conservative_grads = _grads(dpo_conservative_loss, pc, pr, rc, rr, 0.3, 0.0)
    for a, b in zip(conservative_grads, _grads(dpo_sigmoid_loss, pc, pr, rc, rr, 0.3)):
        assert torch.equal(a, b)
    # h = 2, -1, -3 at beta = 0.3, eps = 0.1: (1 - eps) softplus(-beta h) + eps softplus(beta h)
    eps, beta = 0.1, 0.3
    expected = sum((1 - eps) * math.log1p(math.exp(-beta * h)) + eps * math.log1p(math.exp(beta * h))
                   for h in (2.0, -1.0, -3.0)) / 3
    assert dpo_conservative_loss(pc, pr, rc, rr, beta, eps)[0].item() == pytest.approx(expected, rel=1e-12)
    # at h = 0 the loss is ln 2 whatever eps
    assert dpo_conservative_loss(*_pairs([0.0, 0.0]), 0.3, 0.2)[0].item() == pytest.approx(math.log(2), rel=1e-15)
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
            dpo_conservative_loss(pc, pr, rc, rr, beta, bad)


def test_dpo_ipo_value():
    # beta = 0.25: target margin 1 / (2 beta) = 2. h = 0 -> 4; h = 2 -> 0; h = 3 -> 1; h = -1 -> 9
    for h, expected in ((0.0, 4.0), (2.0, 0.0), (3.0, 1.0), (-1.0, 9.0)):
        assert dpo_ipo_loss(*_pairs([h]), beta=0.25)[0].item() == expected
    # a batch is the mean; h read from all four log-probs: (-1 - -2) - (-4 - -3) = 2, (-2 - -2) - (-3 - -4) = -1
    loss, _ = dpo_ipo_loss(_t(-1.0, -2.0), _t(-4.0, -3.0), _t(-2.0, -2.0), _t(-3.0, -4.0), beta=0.5)
    assert loss.item() == pytest.approx(((2 - 1) ** 2 + (-1 - 1) ** 2) / 2, rel=1e-12)


def test_dpo_hinge_value():
    # beta = 0.5: relu(1 - h / 2). h = 1 -> 0.5; h = 2 -> 0 (margin met); h = 3 -> 0; h = -2 -> 2
    for h, expected in ((1.0, 0.5), (2.0, 0.0), (3.0, 0.0), (-2.0, 2.0)):
        assert dpo_hinge_loss(*_pairs([h]), beta=0.5)[0].item() == expected
    loss, _ = dpo_hinge_loss(_t(-1.0, -2.0), _t(-4.0, -3.0), _t(-2.0, -2.0), _t(-3.0, -4.0), beta=0.25)
    assert loss.item() == pytest.approx(((1 - 0.25 * 2) + (1 - 0.25 * -1)) / 2, rel=1e-12)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_reject_label_smoothing_they_ignore(name):
    with pytest.raises(ValueError, match="conservative"):
        DPO_LOSSES[name](*_pairs([0.0]), 0.1, 0.1)


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_dpo_stats_by_hand(name):
    """Implicit rewards beta * (logps - ref_logps), margins, accuracies and raw log-probs: batch means, detached."""
    pc, pr = _t(-1.0, -2.0, -6.0).requires_grad_(), _t(-4.0, -3.0, -5.0).requires_grad_()
    rc, rr = _t(-2.0, -2.0, -3.0), _t(-3.0, -4.0, -2.0)
    _, stats = DPO_LOSSES[name](pc, pr, rc, rr, 0.5)
    assert set(stats) == DPO_STAT_NAMES
    chosen, rejected = [0.5, 0.0, -1.5], [-0.5, 0.5, -1.5]  # beta * (pc - rc), beta * (pr - rr)
    expected = {
        "rewards/chosen": sum(chosen) / 3,
        "rewards/rejected": sum(rejected) / 3,
        "rewards/margins": sum(c - r for c, r in zip(chosen, rejected)) / 3,
        "rewards/accuracies": 1 / 3,  # only the first pair has r_c > r_r strictly (the third ties)
        "logps/chosen": -3.0,
        "logps/rejected": -4.0,
    }
    for key, value in expected.items():
        assert stats[key].item() == pytest.approx(value, rel=1e-12), key
        assert not stats[key].requires_grad and stats[key].dim() == 0


def test_dpo_sigmoid_gradient_at_reference():
    """At policy = reference, d/d pc of mean -log sigma(beta h) = -beta sigma(0) / B = -beta / (2B) < 0: descending
    raises the chosen log-prob and lowers the rejected one."""
    pc_grad, pr_grad = _grads(dpo_sigmoid_loss, *_pairs([0.0, 0.0, 0.0, 0.0]), beta=0.2)
    assert torch.allclose(pc_grad, torch.full((4,), -0.2 / 8, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(pr_grad, -pc_grad, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_dpo_gradients_raise_chosen_lower_rejected(name):
    """Below every loss's margin (h <= 0), d/d pc < 0 and d/d pr > 0 on every pair, reference untouched."""
    g = torch.Generator().manual_seed(0)
    rc, rr = -5 * torch.rand(8, generator=g, dtype=torch.float64), -5 * torch.rand(8, generator=g, dtype=torch.float64)
    h = -torch.rand(8, generator=g, dtype=torch.float64)  # in (-1, 0]
    pc = rc + 0.3 * torch.randn(8, generator=g, dtype=torch.float64)
    pr = rr + (pc - rc) - h  # (pc - rc) - (pr - rr) = h
    kwargs = {"label_smoothing": 0.2} if name == "conservative" else {}
    pc_grad, pr_grad = _grads(DPO_LOSSES[name], pc, pr, rc, rr, 0.4, **kwargs)
    assert (pc_grad < 0).all() and (pr_grad > 0).all()
    assert torch.allclose(pc_grad, -pr_grad)


def test_ipo_and_hinge_past_their_margin():
    """IPO regresses h onto 1 / (2 beta): past it the gradient pushes back; hinge is flat once beta h >= 1."""
    pc_grad, pr_grad = _grads(dpo_ipo_loss, *_pairs([3.0]), beta=0.25)  # d/dh (h - 2)^2 = 2 at h = 3
    assert pc_grad.item() == 2.0 and pr_grad.item() == -2.0
    pc_grad, _ = _grads(dpo_hinge_loss, *_pairs([2.5]), beta=0.5)
    assert pc_grad.item() == 0.0
    pc_grad, _ = _grads(dpo_hinge_loss, *_pairs([1.0]), beta=0.5)  # d/dh relu(1 - beta h) = -beta
    assert pc_grad.item() == -0.5


# ---------------------------------------------------------------- rankings: representation, PL, pairs

def test_ranks_from_tie_groups():
    ranks = ranks_from_tie_groups([[[1], [0, 3], [2]], [[0], [1]], [[2, 0, 1]]])
    assert ranks.tolist() == [[1, 0, 2, 1], [0, 1, -1, -1], [0, 0, 0, -1]]
    assert ranks.dtype == torch.long
    assert ranks_from_tie_groups([[[0], [1]]], k=3).tolist() == [[0, 1, -1]]


def _lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def pl_loop(scores, ranks):
    """Plain-Python oracle of the tie rule: each present completion i is a choice from {i} and all j ranked
    strictly below it; NLL summed per ranking, mean over rankings."""
    total = 0.0
    for s, r in zip(scores, ranks):
        for i in range(len(s)):
            if r[i] < 0:
                continue
            choice_set = [s[i]] + [s[j] for j in range(len(s)) if r[j] >= 0 and r[j] > r[i]]
            total -= s[i] - _lse(choice_set)
    return total / len(scores)


def pairs_loop(scores, ranks):
    """Plain-Python oracle: mean over each ranking's strict pairs of -log sigma(s_i - s_j), mean over rankings."""
    total = 0.0
    for s, r in zip(scores, ranks):
        pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if 0 <= r[i] < r[j]]
        if pairs:
            total += sum(math.log1p(math.exp(-(s[i] - s[j]))) for i, j in pairs) / len(pairs)
    return total / len(scores)


def _random_rankings(seed, N=16, K=5):
    """Random scores and ranks with ties (ranks drawn from 0..2) and padding (-1), NaN under padding."""
    g = torch.Generator().manual_seed(seed)
    scores = 2 * torch.randn(N, K, generator=g, dtype=torch.float64)
    ranks = torch.randint(0, 3, (N, K), generator=g)
    ranks[torch.rand(N, K, generator=g) < 0.2] = -1
    ranks[0] = torch.arange(K)  # one strict ranking
    ranks[1] = 0  # one all-tied ranking
    return scores.masked_fill(ranks < 0, float("nan")), ranks


def test_plackett_luce_value():
    s = [1.0, 0.0, 2.0]
    # strict: 0 best, then 1, then 2
    loss, stats = plackett_luce_loss(_t(*s)[None], torch.tensor([[0, 1, 2]]))
    assert loss.item() == pytest.approx(-(1 - _lse(s)) - (0 - _lse([0.0, 2.0])), rel=1e-12)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)  # of (0,1), (0,2), (1,2) only (0,1) is scored right
    # a tie on top: 0 and 1 tied above 2, each chosen over itself and 2 (not over each other)
    loss, _ = plackett_luce_loss(_t(*s)[None], torch.tensor([[0, 0, 1]]))
    assert loss.item() == pytest.approx(-(1 - _lse([1.0, 2.0])) - (0 - _lse([0.0, 2.0])), rel=1e-12)
    # a tie at the bottom is the exact marginal likelihood: only the first choice remains
    loss, _ = plackett_luce_loss(_t(*s)[None], torch.tensor([[1, 0, 1]]))
    assert loss.item() == pytest.approx(-(0 - _lse(s)), rel=1e-12)
    # padding: completion 1 absent, NaN score; the rest is Bradley-Terry of 2 over 0
    loss, _ = plackett_luce_loss(_t(1.0, float("nan"), 2.0)[None], torch.tensor([[1, -1, 0]]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-(2.0 - 1.0))), rel=1e-12)
    # all tied: no information, loss 0
    assert plackett_luce_loss(_t(*s)[None], torch.tensor([[0, 0, 0]]))[0].item() == 0.0
    # accuracy: a pair scored equal counts as wrong (r_chosen > r_rejected strictly, as DPO's rewards/accuracies)
    assert plackett_luce_loss(_t(1.0, 1.0, 0.0)[None], torch.tensor([[0, 1, 2]]))[1]["accuracy"].item() == 2 / 3


def test_ranked_pairs_bradley_terry_value():
    s = [1.0, 0.0, 2.0]
    sp = lambda d: math.log1p(math.exp(-d))  # -log sigma(d)
    loss, stats = ranked_pairs_bradley_terry_loss(_t(*s)[None], torch.tensor([[0, 1, 2]]))
    assert loss.item() == pytest.approx((sp(1 - 0) + sp(1 - 2) + sp(0 - 2)) / 3, rel=1e-12)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)
    # ties give no pair: 0 and 1 tied above 2 -> pairs (0, 2), (1, 2); mean over rankings, all-tied counts 0
    loss, _ = ranked_pairs_bradley_terry_loss(_t(*s, *s).view(2, 3), torch.tensor([[0, 0, 1], [0, 0, 0]]))
    assert loss.item() == pytest.approx((sp(1 - 2) + sp(0 - 2)) / 2 / 2, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(RANKING_LOSSES))
def test_ranking_losses_match_loops(name, seed):
    scores, ranks = _random_rankings(seed)
    oracle = {"plackett_luce": pl_loop, "bradley_terry": pairs_loop}[name]
    loss, stats = RANKING_LOSSES[name](scores, ranks)
    assert loss.item() == pytest.approx(oracle(scores.tolist(), ranks.tolist()), rel=1e-12)
    pairs = [(n, i, j) for n, r in enumerate(ranks.tolist()) for i in range(5) for j in range(5) if 0 <= r[i] < r[j]]
    correct = sum(scores[n, i] > scores[n, j] for n, i, j in pairs)
    assert stats["accuracy"].item() == pytest.approx(correct.item() / len(pairs))


@pytest.mark.parametrize("name", sorted(RANKING_LOSSES))
def test_ranking_losses_at_k2_equal_bradley_terry(name):
    """K = 2 strict rankings are Bradley-Terry pairs, exactly, in loss, gradient and accuracy; a tied pair and a
    pair with one side padded carry no loss and no gradient (ranking_to_pairs gives them no comparison)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 2, generator=g, dtype=torch.float64, requires_grad=True)
    swap = torch.rand(12, generator=g) < 0.5
    ranks = torch.stack([swap.long(), (~swap).long()], dim=1)  # chosen = the rank-0 column
    loss, stats = RANKING_LOSSES[name](scores, ranks)
    chosen, rejected = torch.where(swap, scores[:, 1], scores[:, 0]), torch.where(swap, scores[:, 0], scores[:, 1])
    bt_loss, bt_stats = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(bt_loss.item(), rel=1e-14)
    assert stats["accuracy"].item() == pytest.approx(bt_stats["accuracy"].item())
    (ours,) = torch.autograd.grad(loss, scores)
    (theirs,) = torch.autograd.grad(bt_loss, scores)
    assert torch.allclose(ours, theirs, rtol=1e-13)
    tied = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    for r in ([[0, 0]], [[0, -1]]):
        loss, _ = RANKING_LOSSES[name](tied * torch.tensor([[1.0, 3.0]], dtype=torch.float64), torch.tensor(r))
        assert loss.item() == 0.0
        assert torch.autograd.grad(loss, tied)[0].abs().sum() == 0


def test_bradley_terry_margin_zero_equals_no_margin():
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(9, generator=g), torch.randn(9, generator=g)
    assert torch.equal(bradley_terry_loss(c, r, torch.zeros(9))[0], bradley_terry_loss(c, r)[0])
    # and a margin m is a shift of the difference: -log sigma(c - r - m)
    m = torch.rand(9, generator=g)
    assert torch.allclose(bradley_terry_loss(c, r, m)[0], bradley_terry_loss(c - m, r)[0])


def test_plackett_luce_gradient_by_hand():
    """Equal scores, strict order 0 > 1 > 2: d/ds = (-1 + 1/3, 1/3 - 1 + 1/2, 1/3 + 1/2): better ranked rises more."""
    s = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    plackett_luce_loss(s, torch.tensor([[0, 1, 2]]))[0].backward()
    assert torch.allclose(s.grad, _t(-2 / 3, -1 / 6, 5 / 6)[None], rtol=1e-12)


@pytest.mark.parametrize("name", sorted(RANKING_LOSSES))
def test_ranking_gradients_raise_better_ranked(name):
    """At equal scores, descending raises every completion more than any completion ranked below it, ties
    equally; padding gets exactly zero gradient even under NaN scores."""
    ranks = torch.tensor([[2, 0, 1, 0, -1, 3]])
    s = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    scores = torch.where(ranks < 0, float("nan"), s)
    RANKING_LOSSES[name](scores, ranks)[0].backward()
    grad = s.grad[0]
    assert torch.isfinite(grad).all() and grad[4] == 0
    assert grad[1] == grad[3] and grad[1] < grad[2] < grad[0] < grad[5]
    assert grad[1] < 0 < grad[5]
    assert grad.sum().abs() < 1e-12  # adding a constant to every score changes nothing


# ---------------------------------------------------------------- DPO over K-way rankings

def test_dpo_plackett_luce_value():
    # policy = reference: implicit rewards 0; a strict K = 3 ranking costs log 3 + log 2 = log 3!
    logps = _t(-3.0, -1.0, -7.0)[None]
    loss, _ = dpo_plackett_luce_loss(logps, logps, torch.tensor([[2, 0, 1]]), beta=0.1)
    assert loss.item() == pytest.approx(math.log(6), rel=1e-14)
    # two tied on top of two tied: each top member chosen from itself and the two below, log 3 twice
    logps = _t(-3.0, -1.0, -7.0, -2.0)[None]
    loss, _ = dpo_plackett_luce_loss(logps, logps, torch.tensor([[0, 1, 1, 0]]), beta=0.1)
    assert loss.item() == pytest.approx(2 * math.log(3), rel=1e-14)
    # off the reference: r = beta * (logp - ref) = 0.5 * (2, 0, -2) for ranks (0, 1, 2)
    loss, stats = dpo_plackett_luce_loss(_t(-1.0, -3.0, -6.0)[None], _t(-3.0, -3.0, -4.0)[None],
                                         torch.tensor([[0, 1, 2]]), beta=0.5)
    assert loss.item() == pytest.approx(-(1 - _lse([1.0, 0.0, -1.0])) - (0 - _lse([0.0, -1.0])), rel=1e-12)
    assert stats["rewards/chosen"].item() == 1.0 and stats["rewards/rejected"].item() == -1.0
    assert stats["rewards/margins"].item() == 2.0 and stats["rewards/accuracies"].item() == 1.0
    assert stats["logps/chosen"].item() == -1.0 and stats["logps/rejected"].item() == -6.0


def test_dpo_plackett_luce_stats_with_ties_and_padding():
    """chosen = best tie group, rejected = worst, each averaged within the group then over rankings."""
    policy = _t(-1.0, -2.0, float("nan"), -4.0, -5.0, -6.0, -7.0, -8.0).view(2, 4)
    ref = _t(-1.0, -1.0, float("nan"), -2.0, -5.0, -5.0, -5.0, -5.0).view(2, 4)
    ranks = torch.tensor([[0, 0, -1, 1], [2, 0, 1, 1]])
    _, stats = dpo_plackett_luce_loss(policy, ref, ranks, beta=1.0)
    # rewards: row 0 (0, -1, pad, -2): top {0, 1} -> -0.5, bottom {3} -> -2; row 1 (0, -1, -2, -3): top {1} -> -1,
    # bottom {0} -> 0
    assert stats["rewards/chosen"].item() == pytest.approx((-0.5 + -1) / 2)
    assert stats["rewards/rejected"].item() == pytest.approx((-2 + 0) / 2)
    assert stats["rewards/margins"].item() == pytest.approx((1.5 + -1) / 2)
    assert stats["logps/chosen"].item() == pytest.approx((-1.5 + -6) / 2)
    assert stats["logps/rejected"].item() == pytest.approx((-4 + -5) / 2)
    # pairs: row 0 (0,3) (1,3) both right; row 1 (1,2) (1,3) right, (1,0) (2,0) (3,0) wrong -> 4 of 7
    assert stats["rewards/accuracies"].item() == pytest.approx(4 / 7)


def test_dpo_plackett_luce_at_k2_equals_dpo_sigmoid():
    g = torch.Generator().manual_seed(0)
    pc, pr, noise_c, noise_r = torch.randn(4, 10, generator=g, dtype=torch.float64)
    pc, pr = pc - 3, pr - 3
    rc, rr = pc + 0.5 * noise_c, pr + 0.5 * noise_r
    loss, stats = dpo_sigmoid_loss(pc, pr, rc, rr, 0.3)
    policy = torch.stack([pr, pc], dim=1)  # chosen in column 1
    lw_loss, lw_stats = dpo_plackett_luce_loss(policy, torch.stack([rr, rc], dim=1), torch.tensor([[1, 0]] * 10), 0.3)
    assert lw_loss.item() == pytest.approx(loss.item(), rel=1e-14)
    assert set(lw_stats) == DPO_STAT_NAMES
    for key in DPO_STAT_NAMES:
        assert lw_stats[key].item() == pytest.approx(stats[key].item(), rel=1e-14, abs=1e-15), key


def test_dpo_plackett_luce_gradient_raises_better_ranked():
    ranks = torch.tensor([[1, 0, 2, -1]])
    policy = _t(-2.0, -2.5, -1.0, float("nan"))[None].requires_grad_()
    ref = _t(-2.0, -2.5, -1.0, 0.0)[None]
    dpo_plackett_luce_loss(policy, ref, ranks, beta=0.5)[0].backward()
    grad = policy.grad[0]
    assert grad[1] < grad[0] < grad[2] and grad[1] < 0 < grad[2] and grad[3] == 0


# ---------------------------------------------------------------- reference-free: SimPO, ORPO

def test_simpo_value():
    # mean log-probs: chosen -6/3 = -2 and -2/2 = -1, rejected -4/1 = -4 and -1.5/3 = -0.5; beta 0.5, gamma 0.25:
    # z1 = 0.5 * (-2 - -4) - 0.25 = 0.75, z2 = 0.5 * (-1 - -0.5) - 0.25 = -0.5
    loss, stats = simpo_loss(_t(-6.0, -2.0), _t(-4.0, -1.5), _t(3, 2), _t(1, 3), beta=0.5, gamma=0.25)
    expected = (-math.log(1 / (1 + math.exp(-0.75))) - math.log(1 / (1 + math.exp(0.5)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["rewards/chosen"].item() == pytest.approx(0.5 * (-2 + -1) / 2)
    assert stats["rewards/rejected"].item() == pytest.approx(0.5 * (-4 + -0.5) / 2)
    assert stats["rewards/accuracies"].item() == 0.5  # rewards -1 > -2 right, -0.5 < -0.25 wrong
    assert stats["logps/chosen"].item() == pytest.approx(-4.0)  # summed log-probs, as every method logs them
    # length normalisation is not optional: the same summed log-probs at other lengths give another loss
    assert simpo_loss(_t(-6.0), _t(-4.0), _t(1), _t(1), 0.5, 0.25)[0].item() != pytest.approx(
        simpo_loss(_t(-6.0), _t(-4.0), _t(3), _t(1), 0.5, 0.25)[0].item())
    # gamma = 0 and equal lengths of 1: DPO's sigmoid loss with a zero reference
    pc, pr = _t(-1.0, -3.0, -0.5), _t(-2.0, -1.0, -0.7)
    ones = torch.ones(3, dtype=torch.float64)
    assert simpo_loss(pc, pr, ones, ones, 0.4)[0].item() == pytest.approx(
        dpo_sigmoid_loss(pc, pr, 0 * pc, 0 * pr, 0.4)[0].item(), rel=1e-12)


def test_orpo_value():
    # mean log-probs m_c = -2/2 = -1, m_r = -6/3 = -2; log odds(m) = m - log(1 - e^m)
    loss, stats = orpo_loss(_t(-2.0), _t(-6.0), _t(2), _t(3), beta=0.25)
    log_odds = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731
    ratio = log_odds(-1.0) - log_odds(-2.0)
    odds_term = -math.log(1 / (1 + math.exp(-ratio)))
    assert stats["log_odds_ratio"].item() == pytest.approx(ratio, rel=1e-12)
    assert stats["loss/nll"].item() == pytest.approx(1.0)  # the chosen reply's NLL per token
    assert stats["loss/odds_ratio"].item() == pytest.approx(odds_term, rel=1e-12)
    assert loss.item() == pytest.approx(1.0 + 0.25 * odds_term, rel=1e-12)
    # log(1 - e^m) stays finite and accurate near m = 0 (a near-certain reply) and far below
    tiny = orpo_loss(_t(-1e-9), _t(-80.0), _t(1), _t(1), beta=1.0)[1]["log_odds_ratio"].item()
    assert tiny == pytest.approx((-1e-9 - math.log(1e-9)) - (-80.0), rel=1e-6)
    # in float32 too, where 1 - exp(-1e-6) cancels to 0 or worse unless log(-expm1(m)) is used near 0
    f32 = lambda *xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    near = orpo_loss(f32(-1e-6), f32(-3.0), f32(1), f32(1), beta=1.0)[1]["log_odds_ratio"].item()
    assert near == pytest.approx((-1e-6 - math.log(1e-6)) - (-3.0 - math.log(1 - math.exp(-3.0))), rel=1e-4)
    with pytest.raises(ValueError, match="ORPO has no target margin"):
        orpo_loss(_t(-2.0), _t(-6.0), _t(2), _t(3), beta=0.25, gamma=0.5)


@pytest.mark.parametrize("name", list(REFERENCE_FREE_LOSSES))
def test_reference_free_gradients_raise_chosen_lower_rejected(name):
    pc, pr = _t(-3.0, -5.0).requires_grad_(), _t(-4.0, -2.0).requires_grad_()
    lengths = _t(2, 4)
    REFERENCE_FREE_LOSSES[name](pc, pr, lengths, lengths, 0.5)[0].backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # the gradient of a sequence's summed log-prob is divided by its length (the normalisation's chain rule)
    pc2, pr2 = _t(-3.0, -5.0).requires_grad_(), _t(-4.0, -2.0).requires_grad_()
    REFERENCE_FREE_LOSSES[name](pc2 * 2, pr2 * 2, lengths * 2, lengths * 2, 0.5)[0].backward()
    assert torch.allclose(pc2.grad, pc.grad) and torch.allclose(pr2.grad, pr.grad)


# ---------------------------------------------------------------- meta-test: every table entry has a value test

VALUE_TESTS = {
    "DPO_LOSSES": {
        "sigmoid": test_dpo_sigmoid_value,
        "conservative": test_dpo_conservative_value,
        "ipo": test_dpo_ipo_value,
        "hinge": test_dpo_hinge_value,
    },
    "RANKING_LOSSES": {
        "plackett_luce": test_plackett_luce_value,
        "bradley_terry": test_ranked_pairs_bradley_terry_value,
    },
    "LISTWISE_DPO_LOSSES": {
        "plackett_luce": test_dpo_plackett_luce_value,
    },
    "REFERENCE_FREE_LOSSES": {
        "simpo": test_simpo_value,
        "orpo": test_orpo_value,
    },
}


def test_every_loss_in_every_table_has_a_value_test_and_the_table_signature():
    tables = {name: table for name, table in vars(losses).items()
              if name.endswith("_LOSSES") and isinstance(table, dict)}
    assert set(tables) == set(VALUE_TESTS), "a loss table without VALUE_TESTS here (or a stale entry)"
    for name, table in tables.items():
        assert set(table) == set(VALUE_TESTS[name]), f"{name}: every loss needs a value test in VALUE_TESTS"
        signatures = {key: list(inspect.signature(fn).parameters.values()) for key, fn in table.items()}
        first = next(iter(signatures.values()))
        for key, params in signatures.items():
            assert [(p.name, p.default) for p in params] == [(p.name, p.default) for p in first], f"{name}[{key!r}]"
    for tests in VALUE_TESTS.values():
        for fn in tests.values():
            assert fn.__name__.startswith("test_") and globals()[fn.__name__] is fn  # collected by pytest


# ---------------------------------------------------------------- TRL 1.12.0 as the reference

def _trl_dpo_trainer():
    pytest.importorskip("trl", reason="TRL is the reference: pip install -e '.[dev]'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.trainer.dpo_trainer import DPOTrainer
    return DPOTrainer


def _trl_compute_loss(loss_type, beta, label_smoothing, logits, input_ids, completion_mask, ref_logps):
    """TRL's own DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py, 1.12.0), called on a minimal object: a
    "model" that returns fixed logits, reference log-probs passed as precomputed (precompute_ref_log_probs), one
    process. Returns the loss and the metrics it logged. The batch is [chosen rows; rejected rows]."""
    DPOTrainer = _trl_dpo_trainer()
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, args=None)
    B = len(ref_logps) // 2
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_logps[:B], "ref_rejected_logps": ref_logps[B:]}
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: SimpleNamespace(logits=logits), inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def _dpo_batch(seed, B=6, T=9, V=13):
    """Random logits and tokens for 2B sequences (chosen rows, then rejected) with ragged completions, and our
    sequence log-probs from them: summed and per-token means over completion tokens, (2B,) each."""
    from rlhfkit.ops.logprobs import gather_logprobs

    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(2 * B, T, V, generator=g)
    input_ids = torch.randint(0, V, (2 * B, T), generator=g)
    lengths = torch.randint(1, T - 2, (2 * B,), generator=g)
    start = 2  # two prompt tokens, then the completion, then padding
    positions = torch.arange(T)
    completion_mask = ((positions >= start) & (positions < start + lengths[:, None])).long()
    token_logps = gather_logprobs(logits[:, :-1], input_ids[:, 1:]) * completion_mask[:, 1:]  # (2B, T - 1)
    logps = token_logps.sum(1)
    ref_logps = logps + 3 * torch.randn(2 * B, generator=g)  # wide spread: some pairs ordered each way
    return logits, input_ids, completion_mask, logps, ref_logps, lengths.float()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_match_trl(name, seed):
    """sigmoid and hinge on summed log-probs; IPO against TRL's per-token averaging, by passing our IPO the
    per-token mean log-probs (log-ratio / length = mean logp - mean ref logp)."""
    logits, input_ids, completion_mask, logps, ref_logps, lengths = _dpo_batch(seed)
    beta = 0.1
    trl_loss, trl_metrics = _trl_compute_loss(name, beta, 0.0, logits, input_ids, completion_mask, ref_logps)
    B = len(logps) // 2
    policy, ref = (logps / lengths, ref_logps / lengths) if name == "ipo" else (logps, ref_logps)
    loss, stats = DPO_LOSSES[name](policy[:B], policy[B:], ref[:B], ref[B:], beta)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert 0 < trl_metrics["rewards/accuracies"] < 1
    if name != "ipo":  # TRL logs summed-log-prob rewards whatever the loss
        for key in DPO_STAT_NAMES:
            assert stats[key].item() == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_conservative_matches_trl(eps):
    """TRL 1.12.0 has no cDPO type (its "sigmoid" ignores label_smoothing; "robust" is rDPO). Its "aot" branch
    (dpo_trainer.py, `elif loss_type == "aot"`) applies exactly the cDPO formula to the sorted log-ratio
    differences; sorting a batch of one is the identity, so one call per pair is cDPO."""
    logits, input_ids, completion_mask, logps, ref_logps, _ = _dpo_batch(0)
    B = len(logps) // 2
    trl_losses = []
    for b in range(B):
        rows = torch.tensor([b, B + b])
        trl_loss, _ = _trl_compute_loss("aot", 0.2, eps, logits[rows], input_ids[rows], completion_mask[rows],
                                        ref_logps[rows])
        trl_losses.append(trl_loss.item())
    loss, _ = dpo_conservative_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], 0.2, eps)
    assert loss.item() == pytest.approx(sum(trl_losses) / B, rel=1e-5)


# ---------------------------------------------------------------- KTO: thumbs up/down (KTO_LOSSES)



def _sig(x):
    return 1 / (1 + math.exp(-x))


def _kto_inputs():
    """Three thumbs (up, down, up) with log-ratios r = 1, -0.5, 0 and two mismatched pairs whose log-ratios are
    0.5 and 0.1 (z0 = 0.3)."""
    return (_t(-1.0, -3.0, -2.0), _t(-2.0, -2.5, -2.0), torch.tensor([True, False, True]), _t(-1.0, -2.0),
            _t(-1.5, -2.1))


def test_kto_value():
    policy, ref, labels, kl_policy, kl_ref = _kto_inputs()
    loss, stats = kto_loss(policy, ref, labels, kl_policy, kl_ref, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    z0 = 0.3
    by_hand = ((1 - _sig(0.5 * (1 - z0))) + 2 * (1 - _sig(0.5 * (z0 - -0.5))) + (1 - _sig(0.5 * (0 - z0)))) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    assert stats["kto/kl"].item() == pytest.approx(z0, rel=1e-12)
    assert stats["rewards/chosen"].item() == pytest.approx(0.5 * (1 + 0) / 2)
    assert stats["rewards/rejected"].item() == pytest.approx(0.5 * -0.5)
    assert stats["rewards/margins"].item() == pytest.approx(0.25 + 0.25)
    assert stats["logps/chosen"].item() == pytest.approx(-1.5) and stats["logps/rejected"].item() == pytest.approx(-3.0)


def test_kto_at_the_reference_is_half_the_weights():
    logps = _t(-3.0, -1.0, -7.0, -2.0)
    labels = torch.tensor([True, False, False, True])
    loss, stats = kto_loss(logps, logps, labels, logps, logps, beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    assert loss.item() == pytest.approx((0.5 + 0.75 + 0.75 + 0.5) / 4)
    assert stats["kto/kl"].item() == 0 and stats["rewards/chosen"].item() == 0


def test_kto_gradients_raise_desirable_and_lower_undesirable():
    """The sign of each term: descending the loss raises an up-thumbed completion's log-prob and lowers a
    down-thumbed one's (a flipped undesirable term would raise it)."""
    policy, ref, labels, kl_policy, kl_ref = _kto_inputs()
    policy = policy.clone().requires_grad_()
    kto_loss(policy, ref, labels, kl_policy, kl_ref, beta=0.5)[0].backward()
    assert (policy.grad[labels] < 0).all() and (policy.grad[~labels] > 0).all()


def test_kto_weights_are_not_swapped():
    """lambda_D weighs only the thumbs up, lambda_U only the thumbs down."""
    policy, ref, labels, kl_policy, kl_ref = _kto_inputs()
    up = labels.clone().fill_(True)
    down = ~up
    for lab, expect_factor in ((up, 3.0), (down, 5.0)):
        base, _ = kto_loss(policy, ref, lab, kl_policy, kl_ref, beta=0.5)
        weighted, _ = kto_loss(policy, ref, lab, kl_policy, kl_ref, beta=0.5, desirable_weight=3.0, undesirable_weight=5.0)
        assert weighted.item() == pytest.approx(expect_factor * base.item(), rel=1e-12)


def test_kto_reference_point_is_detached():
    """No gradient flows through z0 (the paper, Sec. 4.1): the mismatched pairs' log-probs get none."""
    policy, ref, labels, kl_policy, kl_ref = _kto_inputs()
    kl_policy = kl_policy.clone().requires_grad_()
    loss, _ = kto_loss(policy.clone().requires_grad_(), ref, labels, kl_policy, kl_ref, beta=0.5)
    loss.backward()
    assert kl_policy.grad is None or (kl_policy.grad == 0).all()
    assert not kto_reference_point(kl_policy, kl_ref).requires_grad


def test_kto_reference_point_is_clamped_at_zero():
    """A negative KL estimate counts as 0: the loss equals the loss with z0 = 0."""
    policy, ref, labels, _, _ = _kto_inputs()
    negative = kto_loss(policy, ref, labels, _t(-3.0, -4.0), _t(-2.0, -2.0), beta=0.5)
    zero = kto_loss(policy, ref, labels, _t(-2.0), _t(-2.0), beta=0.5)
    assert negative[1]["kto/kl"].item() == 0.0
    assert negative[0].item() == pytest.approx(zero[0].item(), rel=1e-12)
    assert kto_reference_point(_t(-1.0, -1.0), _t(-1.5, -0.7)).item() == pytest.approx(0.1)  # the mean, not the sum


def test_kto_batch_of_one_kind_omits_the_other_stats():
    policy, ref, _, kl_policy, kl_ref = _kto_inputs()
    _, stats = kto_loss(policy, ref, torch.tensor([True, True, True]), kl_policy, kl_ref, beta=0.5)
    assert "rewards/rejected" not in stats and "rewards/margins" not in stats and "rewards/chosen" in stats


VALUE_TESTS["KTO_LOSSES"] = {"kto": test_kto_value}


def _trl_kto_compute_loss(beta, desirable_weight, undesirable_weight, batch, model):
    """TRL's own KTOTrainer._compute_loss (trl/trainer/kto_trainer.py, 1.12.0, loss_type "kto") on a minimal
    object, reference log-probs passed as precomputed (precompute_ref_log_probs), one process."""
    pytest.importorskip("trl", reason="TRL is the reference: pip install -e '.[dev]'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.trainer.kto_trainer import KTOTrainer
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, calculate_KL=True,
        precompute_ref_logps=True, use_liger_kernel=False, loss_type="kto", beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, args=None)
    trainer._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trainer, m, b)
    loss = KTOTrainer._compute_loss(trainer, model, batch, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kto_matches_trl(seed):
    """Random token rows through a "model" whose logits are a fixed function of each token; the KL rows are each
    prompt with the previous row's completion (TRL's pairing); TRL's loss and metrics against ours."""
    from rlhfkit.ops.logprobs import gather_logprobs

    B, T, V = 7, 9, 11
    g = torch.Generator().manual_seed(seed)
    table = 2 * torch.randn(V, V, generator=g)
    model = lambda input_ids, **kwargs: SimpleNamespace(logits=table[input_ids])  # noqa: E731  (B, T, V)
    positions = torch.arange(T)

    def rows():
        ids = torch.randint(0, V, (B, T), generator=g)
        lengths = torch.randint(1, T - 2, (B,), generator=g)
        mask = ((positions >= 2) & (positions < 2 + lengths[:, None])).long()  # two prompt tokens, then the completion
        return ids, mask

    ids, mask = rows()
    kl_ids, kl_mask = rows()
    labels = torch.tensor([True, False, True, True, False, False, True])

    def logps(i, m):
        return (gather_logprobs(table[i][:, :-1], i[:, 1:]) * m[:, 1:]).sum(1)  # (B,)

    ref, ref_kl = logps(ids, mask) + 2 * torch.randn(B, generator=g), logps(kl_ids, kl_mask) - 0.5 + torch.randn(B, generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask, "label": labels,
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_mask,
             "ref_logps": ref, "ref_KL_logps": ref_kl}
    trl_loss, trl_metrics = _trl_kto_compute_loss(0.3, 1.0, 1.33, batch, model)
    loss, stats = kto_loss(logps(ids, mask), ref, labels, logps(kl_ids, kl_mask), ref_kl, 0.3, 1.0, 1.33)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert stats["kto/kl"].item() == pytest.approx(trl_metrics["kl"], rel=1e-5, abs=1e-7)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert stats[key].item() == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


def _trl_experimental(module: str, name: str):
    pytest.importorskip("trl", reason="TRL is the reference: pip install -e '.[dev]'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import importlib

        return getattr(importlib.import_module(f"trl.experimental.{module}"), name)


@pytest.mark.parametrize("seed", [0, 1])
def test_simpo_matches_trl_cpo(seed):
    """TRL 1.12's CPOTrainer.cpo_loss with loss_type = "simpo" (trl/experimental/cpo), on the per-token mean
    log-probs it computes (average_log_prob = True): the same per-pair losses and implicit rewards."""
    CPOTrainer = _trl_experimental("cpo.cpo_trainer", "CPOTrainer")
    _, _, _, logps, _, lengths = _dpo_batch(seed)
    B, beta, gamma = len(logps) // 2, 2.0, 1.2
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
    means = logps / lengths
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trainer, means[:B], means[B:])
    loss, stats = simpo_loss(logps[:B], logps[B:], lengths[:B], lengths[B:], beta, gamma)
    assert loss.item() == pytest.approx(trl_losses.mean().item(), rel=1e-5)
    assert stats["rewards/chosen"].item() == pytest.approx(trl_chosen.mean().item(), rel=1e-5)
    assert stats["rewards/rejected"].item() == pytest.approx(trl_rejected.mean().item(), rel=1e-5)
    assert 0 < stats["rewards/accuracies"].item() < 1


@pytest.mark.parametrize("seed", [0, 1])
def test_orpo_odds_ratio_matches_trl(seed):
    """TRL 1.12's ORPOTrainer.odds_ratio_loss (trl/experimental/orpo) on the per-token mean log-probs: its losses
    are beta * log sigma(log odds ratio), which its trainer subtracts from the NLL; its NLL covers the prompt too
    (a deviation, orpo.py), so the NLL is checked by hand (test_orpo_value)."""
    ORPOTrainer = _trl_experimental("orpo.orpo_trainer", "ORPOTrainer")
    _, _, _, logps, _, lengths = _dpo_batch(seed)
    B, beta = len(logps) // 2, 0.2
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    means = logps / lengths
    trl_losses, trl_chosen, _, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(trainer, means[:B], means[B:])
    loss, stats = orpo_loss(logps[:B], logps[B:], lengths[:B], lengths[B:], beta)
    assert beta * stats["loss/odds_ratio"].item() == pytest.approx(-trl_losses.mean().item(), rel=1e-5)
    assert stats["log_odds_ratio"].item() == pytest.approx(trl_log_odds.item(), rel=1e-5)
    assert stats["rewards/chosen"].item() == pytest.approx(trl_chosen.mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(-means[:B].mean().item() - trl_losses.mean().item(), rel=1e-5)
