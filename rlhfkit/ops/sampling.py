"""Logit filters for sampling text (top-k, nucleus (top-p), min-p and the repetition penalty) and the draw of the
next token from the probabilities they leave (draw_tokens). Each filter is a pure
function of a (B, V) logits tensor (one row per sequence, the next token's logits), vectorised over the batch,
returning new logits with the removed tokens at -inf; the sampler (rlhfkit/models/sampling.py) applies them.

Definitions follow Hugging Face transformers' logits processors (generation/logits_process.py), which
tests/test_sampling_filters.py runs as the oracle, so a model's generation_config.json means here what it means
in `model.generate`:

- top_k: keep the tokens whose logit is at least the k-th largest (ties with the k-th are kept, so a row may
  keep more than k); k = 0 is off, k >= V keeps everything (Fan et al. 2018, "Hierarchical Neural Story
  Generation").
- top_p: keep the smallest set of most probable tokens whose probability adds up to at least p, the token
  that crosses p included (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"); p = 1 is off.
- min_p: keep the tokens whose probability is at least min_p times the most probable token's (Nguyen et al.
  2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent LLM Outputs"); 0 is off.
- repetition_penalty: for every token already in the sequence (the prompt and the response so far), a positive
  logit is divided by the penalty and a negative one multiplied by it (Keskar et al. 2019, "CTRL", Sec. 4.1,
  with HF's sign rule for negative logits); 1 is off.

Every filter keeps at least one token per row (the most probable), so a row never becomes all -inf.
The order the sampler applies them in is HF's: repetition penalty on the raw logits, then the temperature,
then top-k, top-p, min-p (each on the tempered distribution).

Layer: ops (imports torch only).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) logits with every token below the row's k-th largest logit at -inf; k <= 0 (off) or k >= V
    returns the logits unchanged."""
    V = logits.shape[-1]
    if k <= 0 or k >= V:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest logit of each row
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(B, V) logits restricted to each row's nucleus: the most probable tokens whose probabilities add up to
    at least p (the token that crosses p kept). p >= 1 returns the logits unchanged."""
    if p >= 1.0:
        return logits
    # Ascending order, as HF: a token goes when the mass of it and every less probable token is at most 1 - p,
    # i.e. when the tokens more probable than it already hold at least p. The one that crosses p stays.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # (B, V)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V) mass up to and including each token
    remove_sorted = cum <= 1.0 - p
    remove_sorted[..., -1] = False  # the most probable token always stays
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """(B, V) logits with every token less probable than min_p x (the row's top probability) at -inf; min_p <= 0
    returns the logits unchanged."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)  # (B, V)
    # min_p <= 1 (Config.validate), so the top token (and any tied with it) is never below its own threshold
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, NEG_INF)


def seen_tokens(ids: torch.Tensor, mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: token v occurs in row b of `ids` (B, T) at a position where mask (B, T) is 1 (padding does not
    count); mask None counts every position."""
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    # masked-out positions write to a spare column V, dropped below (no per-row loop, any padding id)
    idx = ids if mask is None else torch.where(mask.bool(), ids, torch.full_like(ids, vocab_size))
    seen.scatter_(1, idx.clamp(max=vocab_size), True)
    return seen[:, :vocab_size]


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B, V) logits with each seen token's (seen: (B, V) bool, seen_tokens) logit divided by `penalty` when
    positive and multiplied by it when negative (CTRL's penalty, HF's sign rule), so penalty > 1 makes every
    token already in the sequence less likely. penalty = 1 returns the logits unchanged."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


# How the next token is drawn from its probabilities ([sampling] draw): both draw exactly from them (up to float
# rounding), with different uses of the random stream, so the same seed gives other samples with each.
DRAWS = ("inverse_cdf", "multinomial")


def draw_tokens(probs: torch.Tensor, generator: torch.Generator | None, draw: str = "multinomial") -> torch.Tensor:
    """(B, V) probabilities (each row's sum > 0; zeros are never drawn) -> (B,) one token id per row.

    "inverse_cdf": one uniform u per row and the first token whose running sum of probabilities exceeds u x the
    row's total (inverse transform sampling): a running sum and a binary search, O(V) per row. "multinomial":
    torch.multinomial, which for one sample is an exponential race over the whole vocabulary (an exponential
    variate per token, then argmax p / E: a log per token), 10-20x the time on CPU (11 ms against 0.5 ms at
    32 x 16,384, one thread; 33 ms against 1.6 ms at SmolLM2's 49,152), a large share of a small model's decoding
    step. In fp32 the running sum's rounding moves a token's probability by at most ~1e-7 (absolute).

    "multinomial" stays the default: every documented result was sampled with it, and with inverse_cdf's other
    random stream the digits acceptance runs land elsewhere (GRPO's KL share at position 1 was 0.454 at seed 0,
    below its 0.5 target, measured 2026-12-07): switching means re-measuring them."""
    if draw == "multinomial":
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if draw != "inverse_cdf":
        raise ValueError(f"draw = {draw!r}: one of {', '.join(DRAWS)}")
    cdf = probs.cumsum(dim=-1)  # (B, V), non-decreasing; flat over zero-probability tokens
    total = cdf[:, -1:]  # (B, 1)
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)
    # u < 1, but u x total can round up to total, past the last token with any probability: keep it below
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)  # first index whose running sum is > target
