"""Per-token log-probabilities."""

from __future__ import annotations

import torch

from rlhfkit.models import causal_logits


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels]: (B, T, V), (B, T) -> (B, T), computed in fp32.

    logsumexp avoids materialising the (B, T, V) log-softmax tensor a second time.
    """
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_logits(model, queries, query_mask, responses, response_mask, temperature: float = 1.0) -> torch.Tensor:
    """(B, Tr, V) logits that predicted each response token (one forward over query + response).

    Logits are divided by the sampling temperature so log-probs match the distribution sampled from.
    """
    input_ids = torch.cat([queries, responses], dim=1)  # (B, Tq + Tr)
    mask = torch.cat([query_mask, response_mask], dim=1)
    Tq = queries.shape[1]
    logits = causal_logits(model, input_ids, mask)[:, Tq - 1 : -1, :]  # position t predicts token t + 1
    return logits / temperature


def response_logprobs(model, queries, query_mask, responses, response_mask, temperature: float = 1.0) -> torch.Tensor:
    """(B, Tr) log pi(response_t | query, response_<t); zero where response_mask = 0."""
    logits = response_logits(model, queries, query_mask, responses, response_mask, temperature)
    return gather_logprobs(logits, responses) * response_mask


def sequence_logprobs(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """(B,) sum over completion tokens of log pi(token | prefix): the sequence log-prob DPO compares.

    For the right-padded prompt + completion + EOS layout of `batching.encode_pairs` (completion_mask = 1 on
    completion tokens, EOS included). One forward; position t predicts token t + 1, so token t's log-prob
    sits at position t - 1 and the masks shift by one. Token 0 has no prefix to be predicted from: a
    completion must not start there (a prompt of at least one token, e.g. BOS).
    """
    if completion_mask[:, 0].any():
        raise ValueError("completion_mask marks token 0, which no prefix predicts; give each completion a prompt "
                         "of at least one token (e.g. the tokenizer's BOS)")
    logits = causal_logits(model, input_ids, attention_mask)[:, :-1]  # (B, T-1, V): position t predicts t + 1
    logprobs = gather_logprobs(logits, input_ids[:, 1:])  # (B, T-1), fp32
    return (logprobs * completion_mask[:, 1:]).sum(dim=-1)  # (B,)
