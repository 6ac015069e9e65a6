"""Per-token log-probabilities from logits, or from hidden states and a linear head one chunk of positions at a time:
pure tensor math (a model's forward passes are rlhfkit/models/forward.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels]: (B, T, V), (B, T) -> (B, T), computed in fp32.

    logsumexp avoids materialising the (B, T, V) log-softmax tensor a second time.
    """
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _head_logprobs(hidden, weight, bias, labels, temperature: float, entropy: list | None = None) -> torch.Tensor:
    """One chunk: (c, H) -> (c,). The same ops, in the same dtypes, as the full path (the model's own head in the
    autocast dtype, then / temperature, then gather_logprobs in fp32), so each value is the full path's. With an
    empty list `entropy`, also appends the chunk's (c,) entropy of softmax(logits / temperature), without grad (a
    metric)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # cast here, not by autocast's cache of the weight: then each chunk's
        dtype = torch.get_autocast_dtype(device)  # weight gradient is cast back to fp32 and summed there, not in bf16
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    logits = F.linear(hidden, weight, bias)  # (c, V), in the autocast dtype like the model's lm_head
    if temperature != 1.0:  # x / 1.0 == x exactly: skipping it changes no bit
        logits = logits / temperature
    logprobs = gather_logprobs(logits, labels)  # (c,), fp32
    if entropy is not None and not entropy:  # an empty list asks for it; the backward's recompute finds it filled
        entropy.append(_entropy(logits))
    return logprobs


@torch.no_grad()
def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """(c, V) -> (c,) entropy -sum p log p of softmax(logits), in fp32; no grad, so checkpoint saves nothing for it."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def chunked_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                          temperature: float = 1.0, chunk: int = 512, with_entropy: bool = False):
    """log softmax((hidden @ weight.T + bias) / temperature)[labels]: (N, H), (V, H), (V,) or None, (N,) -> (N,) fp32.

    Equals gather_logprobs(F.linear(hidden, weight, bias) / temperature, labels), but the (N, V) logits exist only
    `chunk` rows at a time: with grad, each chunk runs under torch.utils.checkpoint, so autograd keeps its inputs
    (a view of `hidden`, the shared weight) and the backward recomputes that chunk's logits, one chunk at a time.
    Peak: one chunk's (chunk, V) logits, their fp32 copy and softmax, instead of (N, V) of each; the price is one
    more head matmul over the N rows in the backward. fp32 only inside a chunk.

    with_entropy: return (logprobs, entropy), entropy (N,) fp32 without grad, each chunk's from the logits already
    there (the online methods' objective/entropy metric, so it needs no full-logits pass). The backward's recompute
    of a chunk skips it (its list is already filled).
    """
    if chunk < 1:
        raise ValueError(f"chunk = {chunk}: give a positive number of rows per chunk")
    with_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    # ceil(N / chunk) chunks of near-equal size (<= chunk each; N = 0: one empty chunk, still in the graph): no
    # remainder of a row or two, which costs a call of its own and, at one row, takes the BLAS matrix-vector
    # kernel, whose last bits differ from the full path's matrix-matrix product
    n_chunks = max(-(-hidden.shape[0] // chunk), 1)
    pieces, entropy = [], []
    for h, y in zip(hidden.tensor_split(n_chunks), labels.tensor_split(n_chunks)):  # (c, H), (c,)
        sink = [] if with_entropy else None  # filled by the forward; the backward's recompute finds it full, skips it
        if with_grad:  # no dropout or sampling inside: no RNG state to preserve
            pieces.append(checkpoint(_head_logprobs, h, weight, bias, y, temperature, sink, use_reentrant=False,
                                     preserve_rng_state=False))
        else:
            pieces.append(_head_logprobs(h, weight, bias, y, temperature, sink))
        if with_entropy:
            entropy.append(sink[0])
    logprobs = torch.cat(pieces)  # (N,)
    return (logprobs, torch.cat(entropy)) if with_entropy else logprobs
