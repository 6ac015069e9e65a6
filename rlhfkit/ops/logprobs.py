"""Per-token log-probabilities from logits: pure tensor math (a model's forward passes are rlhfkit/models/forward.py)."""

from __future__ import annotations

import torch


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels]: (B, T, V), (B, T) -> (B, T), computed in fp32.

    logsumexp avoids materialising the (B, T, V) log-softmax tensor a second time.
    """
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
