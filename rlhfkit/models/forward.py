"""Forward passes of a model shared by every algorithm: logits, per-token and sequence log-probs of responses, values
and reward-model scores, and the switches RL needs (dropout off, frozen). The math on their outputs (log-softmax
gathers, KL, losses) is rlhfkit/ops/, pure tensor functions.

Layer: models (imports ops, core).
"""

from __future__ import annotations

import torch

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.models.runtime import Runtime, autocast
from rlhfkit.ops.logprobs import gather_logprobs


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or name.endswith("pdrop")


def disable_dropout(model):
    """Set every dropout probability to 0 (RL needs the sampling and training passes to agree).

    Dropout modules are not the only kind: Llama-style attention applies `config.attention_dropout`
    functionally (a float attribute read in forward), so float attributes named like dropout are zeroed on
    every module and on the config too (TRL and OpenRLHF disable dropout for the same reason).
    """
    configs = [getattr(model, "config", None)]
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        configs.append(getattr(module, "config", None))
        for name, value in vars(module).items():
            if _is_dropout_name(name) and isinstance(value, float):
                setattr(module, name, 0.0)
    for config in {id(c): c for c in configs if c is not None}.values():
        for name, value in list(vars(config).items()):
            if _is_dropout_name(name) and isinstance(value, float):
                setattr(config, name, 0.0)
    return model


def freeze(model):
    """Eval mode, no grads: for the reference policy and the reward model during RL."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------
# Forward passes shared by every algorithm


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so left- and right-padded rows see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, V) next-token logits of a causal LM."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits


def scalar_head(model):
    """The linear scalar head of a sequence-classification model (`score` for decoders)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise RlhfkitError(f"{type(model).__name__} has no 'score' or 'classifier' head; use a decoder-style reward model")


def token_scalars(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) head output at every token: values for the critic; the reward is read at the last token."""
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    ).last_hidden_state  # (B, T, H)
    return scalar_head(model)(hidden).squeeze(-1).float()  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real (mask = 1) token in each row, for any padding side."""
    T = attention_mask.shape[1]
    ar = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), ar, torch.full_like(ar, -1)).max(dim=1).values


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) reward-model score at the last real token of each sequence."""
    values = token_scalars(model, input_ids, attention_mask)  # (B, T)
    idx = last_token_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


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


def forward_response(policy, value_model, queries, query_mask, responses, response_mask, temperature, rt: Runtime,
                     with_entropy: bool = False):
    """Log-probs (B, Tr) of the responses, values (B, Tr) predicted before each token (None without a value
    model) and, when asked, the policy's entropy (B, Tr); only the rollout pass needs that, so training
    passes skip the extra (B, Tr, V) softmax."""
    with autocast(rt.device, rt.dtype):
        logits = response_logits(policy, queries, query_mask, responses, response_mask, temperature)  # (B, Tr, V)
        values = None
        if value_model is not None:
            ids = torch.cat([queries, responses], dim=1)
            mask = torch.cat([query_mask, response_mask], dim=1)
            values = token_scalars(value_model, ids, mask)[:, queries.shape[1] - 1 : -1]  # (B, Tr)
    logprobs = gather_logprobs(logits, responses)
    entropy = None
    if with_entropy:
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, values, entropy


def row_logprobs(model, seqs, rows: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """(len(rows),) sequence log-probs of rows `rows` of seqs = (ids, mask, completion_mask) in encode_pairs'
    right-padded layout, in ONE forward (columns past the longest of these rows hold only padding: cut)."""
    ids, mask, completion_mask = seqs
    T = int(mask[rows].sum(dim=1).max())
    with autocast(rt.device, rt.dtype):
        return sequence_logprobs(model, ids[rows, :T], mask[rows, :T], completion_mask[rows, :T])

