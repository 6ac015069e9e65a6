"""Our shared math against TRL's, run here on the same random inputs (the trusted reference of STYLE.md §7).

Every reference is from trl 1.12.0 (the `dev` extra pins it: the last release with the PPO trainer; 1.13 dropped
trl/experimental/ppo):
- trl/trainer/utils.py: selective_log_softmax (log-softmax + gather), entropy_from_logits;
- trl/experimental/ppo/ppo_trainer.py: masked_mean, masked_var, masked_whiten (module functions), and the
  policy/value losses, which sit inside PPOTrainer.train() (lines 821-857) and are copied in `trl_ppo_losses`.
Known, intended differences, not compared: TRL logs policy/approxkl as k2 = mean(lr^2) / 2 over all tokens and
val/ratio unmasked (ours: masked k3 and masked ratio, tested in test_ops.py); TRL's value mask covers one token
more than its policy mask (padding_mask_p1); TRL's masked_whiten leaves padding as is (ours zeroes it).
"""

import warnings

import pytest
import torch

from rlhfkit.data.batching import pad_left, pad_right
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.advantages import masked_mean, masked_var, masked_whiten
from rlhfkit.ops.logprobs import gather_logprobs
from rlhfkit.ops.losses import ppo_policy_loss, ppo_value_loss

trl_utils = pytest.importorskip("trl.trainer.utils", reason="TRL is the reference: pip install -e '.[dev]'")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning: TRL moved its PPO trainer to trl.experimental
    trl_ppo = pytest.importorskip("trl.experimental.ppo.ppo_trainer", reason="needs trl.experimental.ppo: trl==1.12.0")


def _ragged(seed, B=6, T=9, garbage=50.0):
    """Random (B, T) values, a ragged right-padded mask (lengths 1..T, one full row) and garbage under padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T) < lengths[:, None]  # (B, T) bool, TRL's ~padding_mask
    x = torch.randn(B, T, generator=g) * 2 + 0.5
    return torch.where(mask, x, torch.full_like(x, garbage)), mask, g


# ---------------------------------------------------------------- log-probs and entropy

def test_gather_logprobs_matches_trl_selective_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 50, generator=g) * 3
    labels = torch.randint(0, 50, (4, 7), generator=g)
    assert torch.allclose(gather_logprobs(logits, labels), trl_utils.selective_log_softmax(logits, labels), atol=1e-6)


def test_ppo_rollout_logprobs_and_entropy_match_trl(tokenizer):
    """rollout.forward_response (our padded batch, temperature 0.7) against TRL's recipe on each unpadded row:
    logits = output.logits[:, context_length - 1 : -1] / (T + 1e-7), then selective_log_softmax and
    entropy_from_logits (and the trainer's own logsumexp(l) - sum(softmax(l) * l))."""
    from rlhfkit.models.forward import forward_response

    model = build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tokenizer, seed=0).eval()
    with torch.no_grad():  # sharper distributions than the default init, so entropies differ between tokens
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10.0)
    queries = [[1, 5, 6, 7, 8, 4], [1, 9, 4], [1, 14, 13, 12, 11, 10, 9, 4]]
    responses = [[6, 7, 2], [13, 5, 10, 11, 2], [5]]
    q, qm = pad_left(queries, tokenizer.pad_token_id)
    r, rm = pad_right(responses, tokenizer.pad_token_id)
    temperature = 0.7
    with torch.no_grad():
        logprobs, _, entropy = forward_response(model, None, q, qm, r, rm, temperature,
                                                Runtime(torch.device("cpu"), None), with_entropy=True)
        for b, (query, response) in enumerate(zip(queries, responses)):
            n, context_length = len(response), len(query)
            output = model(input_ids=torch.tensor([query + response]))
            logits = output.logits[:, context_length - 1 : -1] / (temperature + 1e-7)  # (1, n, V)
            trl_entropy = trl_utils.entropy_from_logits(logits)[0]
            assert torch.allclose(entropy[b, :n], trl_entropy, atol=1e-5), f"row {b}"
            in_trainer = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
            assert torch.allclose(entropy[b, :n], in_trainer[0], atol=1e-5)
            trl_logprobs = trl_utils.selective_log_softmax(logits, torch.tensor([response]))[0]
            assert torch.allclose(logprobs[b, :n], trl_logprobs, atol=1e-5), f"row {b}"
    assert entropy[rm.bool()].std() > 0.1  # the comparison is not between near-constant vectors


# ---------------------------------------------------------------- masked statistics

@pytest.mark.parametrize("seed", [0, 1])
def test_masked_mean_var_whiten_match_trl(seed):
    x, mask, _ = _ragged(seed)
    assert torch.allclose(masked_mean(x, mask), trl_ppo.masked_mean(x, mask), rtol=1e-6)
    assert torch.allclose(masked_mean(x, mask, dim=1), trl_ppo.masked_mean(x, mask, axis=1), rtol=1e-6)
    for unbiased in (True, False):
        assert torch.allclose(masked_var(x, mask, unbiased), trl_ppo.masked_var(x, mask, unbiased), rtol=1e-5)
    for shift_mean in (True, False):
        ours = masked_whiten(x, mask, shift_mean=shift_mean)
        theirs = trl_ppo.masked_whiten(x, mask, shift_mean=shift_mean)
        assert torch.allclose(ours[mask], theirs[mask], atol=1e-5), f"shift_mean={shift_mean}"
        assert (ours[~mask] == 0).all()


# ---------------------------------------------------------------- PPO losses

def trl_ppo_losses(new_logprobs, mb_logprobs, mb_advantage, vpred, mb_values, mb_return, mask, cliprange,
                   cliprange_value):
    """Copied from trl 1.12.0, trl/experimental/ppo/ppo_trainer.py, PPOTrainer.train() lines 829-854, with
    ~padding_mask and ~padding_mask_p1 both replaced by `mask` (bool, True on response tokens)."""
    masked_mean = trl_ppo.masked_mean
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, mask)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
    return pg_loss, pg_clipfrac, vf_loss, vf_clipfrac


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_losses_match_trl(seed):
    """Random rollouts with a wide spread of ratios (a fair share of tokens clipped in each direction)."""
    old_logprobs, mask, g = _ragged(seed, B=256, T=32, garbage=-1.0)
    B, T = mask.shape
    new_logprobs = torch.where(mask, old_logprobs + 0.3 * torch.randn(B, T, generator=g), torch.tensor(9.0))
    advantages = torch.randn(B, T, generator=g)
    old_values = torch.randn(B, T, generator=g)
    values = old_values + 0.3 * torch.randn(B, T, generator=g)
    returns = torch.randn(B, T, generator=g)
    pg_loss, pg_stats = ppo_policy_loss(new_logprobs, old_logprobs, advantages, mask, 0.2)
    vf_loss, vf_stats = ppo_value_loss(values, old_values, returns, mask, 0.2)

    trl_pg, trl_pg_clipfrac, trl_vf, trl_vf_clipfrac = trl_ppo_losses(
        new_logprobs, old_logprobs, advantages, values, old_values, returns, mask, 0.2, 0.2)
    assert 0.1 < trl_pg_clipfrac < 0.5 and 0.1 < trl_vf_clipfrac < 0.5
    assert pg_loss.item() == pytest.approx(trl_pg.item(), rel=1e-6)
    assert vf_loss.item() == pytest.approx(trl_vf.item(), rel=1e-6)
    assert pg_stats["policy/clipfrac"].item() == trl_pg_clipfrac.item()
    assert vf_stats["value/clipfrac"].item() == trl_vf_clipfrac.item()
