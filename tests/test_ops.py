"""Oracle tests for the shared math in rlhfkit.ops."""

import math

import pytest
import torch

from rlhfkit.ops.advantages import RunningMoments, gae, kl_penalized_rewards, masked_mean, masked_var, masked_whiten
from rlhfkit.ops.kl import KL_ESTIMATORS, AdaptiveKLController, categorical_kl
from rlhfkit.ops.logprobs import gather_logprobs
from rlhfkit.ops.losses import bradley_terry_loss, ppo_policy_loss, ppo_value_loss, sft_loss

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


# (KL, clipped error e = clip(KL / target - 1, -0.2, 0.2)) for target 6, written out by hand: far below the
# target (KL = 0 and KL = 3, where the lower clip matters), inside the band both ways, exactly on it, far above.
KL_AND_ERROR = [(0.0, -0.2), (3.0, -0.2), (5.7, -0.05), (6.0, 0.0), (6.6, 0.1), (7.5, 0.2), (60.0, 0.2), (0.0, -0.2)]


@pytest.mark.parametrize("n_steps,horizon", [(10, 100), (64, 10_000), (512, 1000), (256, 256)])
def test_adaptive_kl_controller_closed_form(n_steps, horizon):
    """Ziegler et al. (2019) Sec. 2.2 over successive updates: beta <- beta * (1 + e * n_steps / horizon)."""
    ctl = AdaptiveKLController(value=0.15, target=6.0, horizon=horizon)
    beta = 0.15
    for kl, error in KL_AND_ERROR:
        ctl.update(current_kl=kl, n_steps=n_steps)
        beta *= 1 + error * n_steps / horizon
        assert ctl.value == pytest.approx(beta, rel=1e-12), f"KL {kl}"


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


def test_masked_mean_and_var_use_only_masked_entries():
    """Oracle: torch.mean / torch.var of the masked entries gathered into a flat tensor (garbage elsewhere)."""
    x = torch.tensor([[1.0, 2.0, 4.0, 1e3], [-3.0, 1e3, 1e3, 1e3], [0.5, 0.25, 8.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    flat = x[mask.bool()]
    assert masked_mean(x, mask).item() == pytest.approx(flat.mean().item(), rel=1e-6)
    rows = torch.tensor([x[b, mask[b].bool()].mean().item() for b in range(3)])
    assert torch.allclose(masked_mean(x, mask, dim=1), rows)
    assert masked_var(x, mask).item() == pytest.approx(flat.var(unbiased=True).item(), rel=1e-6)  # TRL's default
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(flat.var(unbiased=False).item(), rel=1e-6)
    assert masked_var(x, torch.tensor([[0, 1, 0, 0]] + [[0] * 4] * 2)).item() == 0.0  # one entry: no 0/0


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
    """d/dc_i of mean_i -log sigma(c_i - r_i) = -sigma(r_i - c_i) / B, and the opposite for r_i."""
    c = torch.tensor([1.0, 0.0, -2.0], requires_grad=True)
    r = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    bradley_terry_loss(c, r)[0].backward()
    expected = torch.tensor([-1 / (1 + math.exp(a - b)) / 3 for a, b in zip(c.tolist(), r.tolist())])
    assert torch.allclose(c.grad, expected, atol=1e-7)
    assert torch.allclose(r.grad, -expected, atol=1e-7)


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
        # unclipped branch: d(-A * rho)/d logprob = -A * rho, so descending the loss raises the log-prob of
        # positive-advantage tokens and lowers negative ones; the clipped branch is constant in the log-prob
        assert lp.grad.item() == pytest.approx(-adv * ratio if expect_grad else 0.0, rel=1e-6)
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
    assert v2.grad.item() == pytest.approx(0.1 - 1.0)  # d/dV 1/2 (V - R)^2 = V - R: descent moves V to R


def test_sft_loss_ignores_prompt_tokens():
    lp = torch.tensor([[-5.0, -1.0, -2.0]])
    mask = torch.tensor([[0, 1, 1]])
    assert sft_loss(lp, mask).item() == pytest.approx(1.5)


# Ragged masks (lengths 5, 2, 1, 3) with garbage in the masked-out positions: a dropped mask changes every value.
LENGTHS = [5, 2, 1, 3]
RAGGED_MASK = torch.tensor([[1] * n + [0] * (5 - n) for n in LENGTHS])


def _with_garbage(valid_rows, garbage):
    """(4, 5) tensor: valid_rows[b] on the first LENGTHS[b] entries of row b, `garbage` elsewhere."""
    x = torch.full((4, 5), float(garbage))
    for b, row in enumerate(valid_rows):
        x[b, : len(row)] = torch.tensor(row)
    return x


def test_ppo_policy_loss_and_stats_on_ragged_mask():
    """Loop oracle over the masked tokens only: rho = e^(new - old), L = max(-A rho, -A clip(rho)),
    clipfrac = #(clipped branch strictly larger) / n, approxkl = mean (rho - 1) - log rho (k3 of KL(old || new)),
    ratio = mean rho."""
    eps = 0.2
    # log-ratios: inside the range, above 1 + eps, below 1 - eps, and exactly 0; advantages of both signs
    log_ratio = _with_garbage([[0.1, 0.5, -0.5, 0.0, -0.1], [0.5, -0.5], [0.3], [-0.4, 0.05, 0.25]], 2.5)
    adv = _with_garbage([[1.0, 1.0, 1.0, -2.0, -1.0], [-1.5, -0.5], [2.0], [-0.7, -0.3, -1.2]], 40.0)
    old = torch.linspace(-3.0, -0.5, 20).reshape(4, 5)
    new = old + log_ratio
    loss, stats = ppo_policy_loss(new, old, adv, RAGGED_MASK, eps)

    terms, clipped, k3, ratios = [], [], [], []
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            rho, a = math.exp((new[b, t] - old[b, t]).item()), adv[b, t].item()
            unclipped, clip_branch = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps)
            terms.append(max(unclipped, clip_branch))
            clipped.append(clip_branch > unclipped)
            k3.append(rho - 1 - math.log(rho))
            ratios.append(rho)
    n = len(terms)
    # clipped branch larger: (A > 0, rho > 1 + eps) and (A < 0, rho < 1 - eps), twice each; outside the range
    # but the unclipped branch larger: 3 tokens; inside the range (a tie, counts 0): 4 tokens
    assert sum(clipped) == 4
    assert loss.item() == pytest.approx(sum(terms) / n, rel=1e-6)
    assert stats["policy/clipfrac"].item() == pytest.approx(sum(clipped) / n, abs=1e-7)
    assert stats["policy/approxkl"].item() == pytest.approx(sum(k3) / n, rel=1e-5)
    assert stats["policy/ratio"].item() == pytest.approx(sum(ratios) / n, rel=1e-6)


def test_ppo_value_loss_and_clipfrac_on_ragged_mask():
    """Exact (dyadic) numbers, eps = 0.5. value/clipfrac counts tokens where the clipped branch is strictly
    larger; inside the clip range (and on its edge) clip(V) = V, the branches tie and count 0."""
    eps = 0.5
    values = _with_garbage([[0.25, -1.0, 2.0, 2.0, 1.0], [-1.0, -1.0], [0.5], [0.75, 3.0, -2.0]], 100.0)
    old = _with_garbage([[0.5, -0.75, 0.5, 0.5, 0.5], [0.0, 0.0], [0.5], [0.25, 0.0, -1.0]], -100.0)
    returns = _with_garbage([[1.0, 2.0, 0.0, 3.0, 4.0], [-0.25, -2.0], [-3.0], [1.5, 1.0, -4.0]], 7.0)
    loss, stats = ppo_value_loss(values, old, returns, RAGGED_MASK, eps)

    terms, clipped = [], []
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            v, v_old, ret = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            v_clip = min(max(v, v_old - eps), v_old + eps)
            terms.append(0.5 * max((v - ret) ** 2, (v_clip - ret) ** 2))
            clipped.append((v_clip - ret) ** 2 > (v - ret) ** 2)
    n = len(terms)
    # ties (inside the range, on its edge, V = V_old): 5 tokens; clipped branch larger: 3; smaller: 3
    assert sum(clipped) == 3
    assert loss.item() == pytest.approx(sum(terms) / n, rel=1e-7)
    assert stats["value/clipfrac"].item() == pytest.approx(3 / n, abs=1e-7)


def test_ppo_value_clipfrac_counts_no_ties_on_random_floats():
    """Random floats, mostly inside the clip range: clipfrac counts exactly the tokens with |V - V_old| > eps
    whose clipped branch is larger (oracle in float64 with an explicit case split). V_old + clamp(V - V_old)
    rounds and would count some in-range ties (~0.1% of tokens)."""
    g = torch.Generator().manual_seed(0)
    B, T, eps = 256, 48, 0.2
    values = torch.randn(B, T, generator=g)
    old = values + 0.1 * torch.randn(B, T, generator=g)
    returns = torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    loss, stats = ppo_value_loss(values, old, returns, mask, eps)

    v, v_old, ret, m = values.double(), old.double(), returns.double(), mask.bool()
    d = v - v_old
    v_clip = torch.where(d.abs() <= eps, v, v_old + eps * d.sign())
    active = (d.abs() > eps) & ((v_clip - ret) ** 2 > (v - ret) ** 2)
    assert 0 < active[m].sum() < 0.1 * m.sum()
    assert stats["value/clipfrac"].item() == pytest.approx(active[m].double().mean().item(), abs=1e-9)
    expected = 0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)[m].mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
