"""Oracle tests for the shared math in rlhfkit.ops."""

import math

import pytest
import torch

from rlhfkit.ops.advantages import RunningMoments, gae, kl_penalized_rewards, masked_mean, masked_whiten
from rlhfkit.ops.kl import KL_ESTIMATORS, AdaptiveKLController, categorical_kl
from rlhfkit.ops.logprobs import gather_logprobs
from rlhfkit.ops.losses import LOSSES, bradley_terry_loss, ppo_policy_loss, ppo_value_loss, sft_loss


# ---------------------------------------------------------------- KL estimators vs exact categorical KL

def _dists(seed, V=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g), torch.randn(V, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_k3_unbiased_k3_nonnegative(seed):
    logits_p, logits_q = _dists(seed)
    exact = categorical_kl(logits_p, logits_q).item()
    logp, logq = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    p = logp.exp()
    # Expectation under p computed exactly (sum over the vocabulary), not by sampling.
    for name in ("k1", "k3"):
        expected = (p * KL_ESTIMATORS[name](logp, logq)).sum().item()
        assert expected == pytest.approx(exact, rel=1e-5, abs=1e-6), name
    assert (KL_ESTIMATORS["k3"](logp, logq) >= 0).all()
    assert (KL_ESTIMATORS["k2"](logp, logq) >= 0).all()
    # Monte Carlo agrees too (sampled tokens, as in RL).
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(seed))
    for name in ("k1", "k3"):
        mc = KL_ESTIMATORS[name](logp[samples], logq[samples]).mean().item()
        assert mc == pytest.approx(exact, abs=0.02), name


def test_k2_close_for_nearby_distributions():
    logits_p = torch.tensor([0.1, 0.0, -0.1, 0.05])
    logits_q = logits_p + torch.tensor([0.02, -0.01, 0.0, 0.01])
    logp, logq = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    exact = categorical_kl(logits_p, logits_q).item()
    k2 = (logp.exp() * KL_ESTIMATORS["k2"](logp, logq)).sum().item()
    assert k2 == pytest.approx(exact, rel=0.05)


def test_policy_equals_reference_gives_zero_kl():
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    lp = gather_logprobs(logits, labels)
    for name, fn in KL_ESTIMATORS.items():
        assert torch.equal(fn(lp, lp), torch.zeros_like(lp)), name
    assert torch.allclose(categorical_kl(logits, logits), torch.zeros(3, 5), atol=1e-7)


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(value=0.1, target=1.0, horizon=100)
    ctl.update(current_kl=3.0, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl2 = AdaptiveKLController(value=0.1, target=1.0, horizon=100)
    ctl2.update(current_kl=0.9, n_steps=10)
    assert ctl2.value == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))


# ---------------------------------------------------------------- log-probs

def test_gather_logprobs_matches_log_softmax():
    logits = torch.randn(2, 4, 7)
    labels = torch.randint(0, 7, (2, 4))
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(gather_logprobs(logits, labels), ref, atol=1e-6)


# ---------------------------------------------------------------- GAE and whitening

def _gae_loop(rewards, values, lengths, gamma, lam):
    """Plain per-row, per-step loop: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}."""
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        running = 0.0
        for t in reversed(range(lengths[b])):
            next_v = values[b, t + 1].item() if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_loop_and_closed_form(gamma, lam):
    torch.manual_seed(0)
    B, T = 5, 7
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    lengths = [7, 3, 1, 5, 6]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    expected = _gae_loop(rewards, values, lengths, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-5)
    # lam = 1: advantages are discounted reward-to-go minus the value (Monte Carlo returns).
    if lam == 1.0:
        for b, n in enumerate(lengths):
            for t in range(n):
                mc = sum(gamma ** (s - t) * rewards[b, s].item() for s in range(t, n))
                assert adv[b, t].item() == pytest.approx(mc - values[b, t].item(), abs=1e-5)


def test_kl_penalized_rewards_score_at_last_token():
    kl = torch.tensor([[0.5, 0.2, 0.1, 0.3], [0.1, 0.1, 0.1, 0.1]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])  # row 0 ended (EOS at 1); row 1 hit the budget
    scores = torch.tensor([2.0, -1.0])
    r = kl_penalized_rewards(scores, kl, mask, kl_coef=0.5)
    assert torch.allclose(r[0], torch.tensor([-0.25, -0.1 + 2.0, 0.0, 0.0]))
    assert torch.allclose(r[1], torch.tensor([-0.05, -0.05, -0.05, -0.05 - 1.0]))
    assert torch.allclose(r.sum(1), scores - 0.5 * (kl * mask).sum(1))
    # beta = 0: the reward is the score alone
    assert torch.allclose(kl_penalized_rewards(scores, kl, mask, 0.0).sum(1), scores)


def test_masked_whiten_statistics():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = masked_whiten(x, mask)
    vals = w[mask.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-5)


def test_running_moments_match_numpy():
    torch.manual_seed(0)
    chunks = [torch.randn(n) * 3 + 2 for n in (5, 17, 40)]
    rm = RunningMoments()
    for c in chunks:
        rm.update(c)
    allx = torch.cat(chunks).double()
    assert rm.mean == pytest.approx(allx.mean().item(), abs=1e-3)
    assert rm.std == pytest.approx(allx.std(unbiased=False).item(), rel=1e-3)


# ---------------------------------------------------------------- losses

def test_bradley_terry_closed_form_and_margin():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    loss, stats = bradley_terry_loss(c, r)
    expected = sum(math.log(1 + math.exp(-(a - b))) for a, b in zip(c.tolist(), r.tolist())) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)
    # Equal scores: loss = ln 2. A margin m shifts the difference: -log sigma(d - m).
    assert bradley_terry_loss(torch.zeros(4), torch.zeros(4))[0].item() == pytest.approx(math.log(2))
    lm, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert lm.item() == pytest.approx(math.log(2))


def test_bradley_terry_gradient_raises_chosen_lowers_rejected():
    c = torch.zeros(3, requires_grad=True)
    r = torch.zeros(3, requires_grad=True)
    bradley_terry_loss(c, r)[0].backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()


def test_ppo_clip_boundaries_and_gradient_signs():
    mask = torch.ones(1, 1)
    old = torch.zeros(1, 1)
    eps = 0.2
    for adv, log_ratio, expect_grad in [
        (1.0, math.log(1.1), True),    # inside the clip range: gradient flows
        (1.0, math.log(1.3), False),   # positive advantage, ratio above 1 + eps: clipped, no gradient
        (1.0, math.log(0.7), True),    # positive advantage, ratio below 1 - eps: unclipped branch is the max
        (-1.0, math.log(0.7), False),  # negative advantage, ratio below 1 - eps: clipped
        (-1.0, math.log(1.3), True),   # negative advantage, ratio above 1 + eps: still pushed down
    ]:
        lp = torch.full((1, 1), log_ratio, requires_grad=True)
        loss, stats = ppo_policy_loss(lp, old, torch.full((1, 1), adv), mask, eps)
        ratio = math.exp(log_ratio)
        assert loss.item() == pytest.approx(max(-adv * ratio, -adv * min(max(ratio, 1 - eps), 1 + eps)), rel=1e-6)
        loss.backward()
        if expect_grad:
            # descending the loss raises the log-prob of positive-advantage tokens and lowers negative ones
            assert lp.grad.item() != 0 and math.copysign(1, -lp.grad.item()) == math.copysign(1, adv)
        else:
            assert lp.grad.item() == 0
        assert stats["policy/clipfrac"].item() == (0.0 if expect_grad else 1.0)


def test_ppo_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv = torch.randn(4, 6)
    mask = torch.ones(4, 6)
    mask[0, 3:] = 0
    lp = torch.randn(4, 6)
    loss, stats = ppo_policy_loss(lp, lp, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-masked_mean(adv, mask).item(), rel=1e-5)
    assert stats["policy/approxkl"].item() == pytest.approx(0.0, abs=1e-7)


def test_value_loss_clipping():
    mask = torch.ones(1, 1)
    old, ret = torch.zeros(1, 1), torch.ones(1, 1)
    v = torch.full((1, 1), 0.5, requires_grad=True)  # within clip 0.2? no: moves 0.5 > 0.2
    loss, stats = ppo_value_loss(v, old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * max((0.5 - 1) ** 2, (0.2 - 1) ** 2))
    assert stats["value/clipfrac"].item() == 1.0
    loss.backward()
    assert v.grad.item() == 0  # the clipped branch is the max and does not depend on v
    v2 = torch.full((1, 1), 0.1, requires_grad=True)
    loss2, _ = ppo_value_loss(v2, old, ret, mask, 0.2)
    assert loss2.item() == pytest.approx(0.5 * 0.81)
    loss2.backward()
    assert v2.grad.item() < 0  # moves towards the return


def test_sft_loss_ignores_prompt_tokens():
    lp = torch.tensor([[-5.0, -1.0, -2.0]])
    mask = torch.tensor([[0, 1, 1]])
    assert sft_loss(lp, mask).item() == pytest.approx(1.5)


def test_loss_table_names():
    assert set(LOSSES) >= {"sft", "bradley_terry", "ppo_policy", "ppo_value"}
