"""The logit filters (rlhfkit/ops/sampling.py) against Hugging Face transformers' logits processors, run here as the
oracle on fixed random batches (the same tokens removed, the same values kept), and closed-form cases for the
boundaries a one-character bug moves: the token that crosses p, ties at the k-th logit, k >= V, p = 1, the
token that must always stay, the sign rule of the repetition penalty, padding that must not count as seen."""

import math

import pytest
import torch

from rlhfkit.ops.sampling import min_p_filter, repetition_penalty, seen_tokens, top_k_filter, top_p_filter

transformers_generation = pytest.importorskip("transformers.generation.logits_process")
TopKLogitsWarper = transformers_generation.TopKLogitsWarper
TopPLogitsWarper = transformers_generation.TopPLogitsWarper
MinPLogitsWarper = transformers_generation.MinPLogitsWarper
RepetitionPenaltyLogitsProcessor = transformers_generation.RepetitionPenaltyLogitsProcessor

INF = float("inf")


def batch(seed: int, B: int = 16, V: int = 50, scale: float = 3.0) -> torch.Tensor:
    """(B, V) logits with a spread like a real model's (std `scale`), some rows sharper than others."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale * torch.linspace(0.3, 2.0, B).unsqueeze(1)


def same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """The same tokens at -inf, and the same values elsewhere (bit for bit: both only mask)."""
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "a different set of tokens was removed"
    kept = ~torch.isinf(theirs)
    assert torch.equal(ours[kept], theirs[kept])


def probs_logits(*rows: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly the given probabilities (float64 for exact boundaries)."""
    return torch.tensor(rows, dtype=torch.float64).log()


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(~torch.isinf(row)).squeeze(1).tolist() for row in logits]


# ---------------------------------------------------------------- against transformers, on random batches


@pytest.mark.parametrize("k", [1, 2, 5, 17, 49, 50, 80])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_matches_transformers(k, seed):
    logits = batch(seed)
    same(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_p_matches_transformers(p, seed):
    logits = batch(seed)
    ours = top_p_filter(logits, p)
    same(ours, TopPLogitsWarper(p)(None, logits.clone()))
    assert 1 <= min(len(r) for r in kept(ours)) and min(len(r) for r in kept(ours)) < logits.shape[1]  # power


@pytest.mark.parametrize("min_p", [0.01, 0.05, 0.1, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_min_p_matches_transformers(min_p, seed):
    logits = batch(seed)
    same(min_p_filter(logits, min_p), MinPLogitsWarper(min_p)(None, logits.clone()))


@pytest.mark.parametrize("penalty", [0.5, 1.2, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_repetition_penalty_matches_transformers(penalty, seed):
    logits = batch(seed)  # positive and negative logits both occur
    g = torch.Generator().manual_seed(seed + 10)
    ids = torch.randint(0, logits.shape[1], (logits.shape[0], 12), generator=g)  # (B, T) with repeats
    ours = repetition_penalty(logits, seen_tokens(ids, None, logits.shape[1]), penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, logits)  # power: something changed


def test_repetition_penalty_ignores_padding_like_transformers_generate():
    """Left padding is not part of the sequence: transformers' generate passes each row's padding length as
    prompt_ignore_length; ours masks it, whatever the pad id is (here a real token, 7)."""
    logits = batch(3, B=4, V=20)
    ids = torch.tensor([[7, 7, 3, 4], [7, 5, 5, 6], [1, 2, 3, 7], [7, 7, 7, 7]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    ours = repetition_penalty(logits, seen_tokens(ids, mask, 20), 1.5)
    theirs = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=(1 - mask).sum(1))(ids, logits.clone())
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[3], logits[3])  # an all-padding row has seen nothing
    assert ours[0, 7] == logits[0, 7] and ours[2, 7] != logits[2, 7]  # pad id 7 counts only where it is real


# ---------------------------------------------------------------- closed forms: the boundaries


def test_top_p_keeps_the_token_that_crosses_p():
    """probs 0.6, 0.3, 0.1: p = 0.7 needs 0.6 and the crossing 0.3 (dropping the crossing token keeps one, an
    inclusive/exclusive cumsum slip keeps all three); p = 0.6 is reached by 0.6 alone; p = 0.95 needs all."""
    logits = probs_logits([0.1, 0.6, 0.3])
    assert kept(top_p_filter(logits, 0.7)) == [[1, 2]]
    assert kept(top_p_filter(logits, 0.55)) == [[1]]
    assert kept(top_p_filter(logits, 0.65)) == [[1, 2]]
    assert kept(top_p_filter(logits, 0.95)) == [[0, 1, 2]]
    assert kept(top_p_filter(logits, 0.89)) == [[1, 2]]


def test_top_p_removes_a_tail_of_exactly_one_minus_p():
    """Four tokens of 0.25 each (exact in floating point) at p = 0.75: the three most probable already hold 0.75,
    so the fourth goes (a strict < in place of HF's <= keeps it)."""
    logits = torch.zeros(1, 4)
    assert len(kept(top_p_filter(logits, 0.75))[0]) == 3
    same(top_p_filter(logits, 0.75), TopPLogitsWarper(0.75)(None, logits.clone()))
    assert len(kept(top_p_filter(logits, 0.76))[0]) == 4


def test_top_p_one_is_a_no_op_and_tiny_p_is_greedy():
    logits = batch(4)
    assert top_p_filter(logits, 1.0) is logits
    assert kept(top_p_filter(logits, 1e-9)) == [[i] for i in logits.argmax(1).tolist()]  # at least one token stays


def test_top_k_boundaries():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert kept(top_k_filter(logits, 1)) == [[1, 3], [0, 1, 2, 3, 4]]  # ties with the k-th largest all stay
    assert kept(top_k_filter(logits, 3)) == [[1, 2, 3], [0, 1, 2, 3, 4]]  # the 3rd largest is 2.0: 1.0 goes
    assert kept(top_k_filter(torch.tensor([[0.5, 2.0, 1.0, -3.0]]), 2)) == [[1, 2]]
    assert top_k_filter(logits, 5) is logits and top_k_filter(logits, 99) is logits  # k >= V
    assert top_k_filter(logits, 0) is logits  # off
    out = top_k_filter(logits, 2)
    assert torch.equal(out[~torch.isinf(out)], logits[~torch.isinf(out)])  # kept values untouched


def test_min_p_closed_form():
    """Threshold min_p x top probability: 0.5, 0.3, 0.15, 0.05 at min_p = 0.3 -> threshold 0.15 (kept: >=)."""
    logits = probs_logits([0.05, 0.5, 0.15, 0.3])
    assert kept(min_p_filter(logits, 0.3)) == [[1, 2, 3]]
    assert kept(min_p_filter(logits, 0.31)) == [[1, 3]]
    assert kept(min_p_filter(logits, 1.0)) == [[1]]  # at least the top token
    assert len(kept(min_p_filter(torch.zeros(1, 4), 1.0))[0]) == 4  # exactly at the threshold: kept (ties with the top)
    assert min_p_filter(logits, 0.0) is logits


def test_repetition_penalty_sign_rule_and_one_is_a_no_op():
    logits = torch.tensor([[2.0, -2.0, 0.0, 4.0]])
    seen = torch.tensor([[True, True, True, False]])
    assert repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 0.0, 4.0]]  # both signs less likely
    assert repetition_penalty(logits, seen, 0.5).tolist() == [[4.0, -1.0, 0.0, 4.0]]  # < 1 rewards repeats
    assert repetition_penalty(logits, seen, 1.0) is logits


def test_seen_tokens_counts_each_token_once_and_skips_masked_positions():
    ids = torch.tensor([[3, 3, 0, 1], [2, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 1]])
    seen = seen_tokens(ids, mask, 5)
    assert seen.tolist() == [[False, True, False, True, False], [False, False, True, False, False]]
    assert seen_tokens(ids, None, 5)[0].tolist() == [True, True, False, True, False]


def test_filters_keep_at_least_one_token_and_compose():
    """Each filter and their composition in the sampler's order leave every row a finite logit, and keep only
    tokens each filter alone would keep."""
    logits = batch(5, B=64, V=30, scale=6.0)
    out = min_p_filter(top_p_filter(top_k_filter(logits, 3), 0.5), 0.2)
    assert torch.isfinite(out).any(dim=1).all()
    for f in (top_k_filter(logits, 3), top_p_filter(logits, 0.5), min_p_filter(logits, 0.2)):
        assert not (torch.isfinite(out) & torch.isinf(f)).any()
    assert math.isclose(out.softmax(1).sum(1).mean().item(), 1.0, rel_tol=1e-6)
