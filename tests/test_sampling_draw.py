"""The next token's draw (rlhfkit.ops.sampling.draw_tokens): inverse transform sampling draws each token with its
probability (a frequency test against the exact distribution, per row, with zeros and ties), never a token of
probability 0 (not even when u x total rounds up to the total), equals the search it stands for (a loop over a
running sum), and "multinomial" is torch.multinomial itself; the same generator state gives the same tokens."""

import pytest
import torch

import rlhfkit.ops.sampling as ops_sampling
from rlhfkit.ops.sampling import draw_tokens


def probs_rows() -> torch.Tensor:
    """(3, 6) distributions: spread, with zeros at both ends and in the middle (a filtered row), one-hot."""
    return torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.05, 0.2],
                         [0.0, 0.5, 0.0, 0.25, 0.25, 0.0],
                         [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])


@pytest.mark.parametrize("draw", ["inverse_cdf", "multinomial"])
def test_each_token_is_drawn_with_its_probability(draw):
    n = 60_000
    p = probs_rows()
    rows = p.repeat_interleave(n, dim=0)  # (3n, 6): n draws from each distribution
    tokens = draw_tokens(rows, torch.Generator().manual_seed(0), draw).view(3, n)
    for r in range(3):
        freq = torch.bincount(tokens[r], minlength=6).double() / n
        sigma = (p[r].double() * (1 - p[r].double()) / n).sqrt()
        assert ((freq - p[r].double()).abs() <= 5 * sigma + 1e-12).all(), (draw, r, freq.tolist())
        assert (freq[p[r] == 0] == 0).all()  # a token of probability 0 is never drawn


def test_inverse_cdf_is_the_first_token_whose_running_sum_exceeds_u_times_the_total(monkeypatch):
    """Against a loop, on unnormalised rows (what draw_tokens is given is any positive mass), with the uniform
    draws fixed: u = 0 takes the first token with mass (not the zero before it), u just below 1 the last; a target
    equal to a running sum goes past it (the sum must exceed it)."""
    p = probs_rows() * torch.tensor([[2.0], [0.5], [3.0]])
    u = torch.tensor([[0.3], [0.0], [0.9999]])
    monkeypatch.setattr(ops_sampling.torch, "rand", lambda *a, **k: u.clone())
    got = draw_tokens(p, None, "inverse_cdf").tolist()
    want = []
    for row, ur in zip(p.tolist(), u[:, 0].tolist()):
        total, running = sum(row), 0.0
        for j, x in enumerate(row):
            running += x
            if running > ur * total:
                want.append(j)
                break
    assert got == want == [2, 1, 3]


def test_a_uniform_that_rounds_up_to_the_total_never_takes_a_zero_tail(monkeypatch):
    """u x total == total (u = 1 here, as fp32 rounding can give for u just below 1): the draw stays on the last
    token with any probability, not the zero-probability tokens after it (searchsorted would return V, or the
    clamp a token that was filtered out)."""
    p = probs_rows()
    monkeypatch.setattr(ops_sampling.torch, "rand", lambda *a, **k: torch.ones(3, 1))
    assert draw_tokens(p, None, "inverse_cdf").tolist() == [5, 4, 3]


def test_multinomial_is_torch_multinomial_and_draws_are_reproducible():
    p = torch.softmax(torch.randn(8, 1000, generator=torch.Generator().manual_seed(1)) * 3, dim=-1)
    want = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    assert torch.equal(draw_tokens(p, torch.Generator().manual_seed(5)), want)  # the default: every earlier result
    a, b = (draw_tokens(p, torch.Generator().manual_seed(5), "inverse_cdf") for _ in range(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="draw = 'gumbel'"):
        draw_tokens(p, None, "gumbel")
