"""The one sampler shared by every online method (PPO, best-of-N, ReST, RLOO/GRPO) and the feedback stage.

Batched autoregressive sampling with a KV cache: the prompt is run once, then each step feeds only the
newly sampled token (never the whole prefix). Prompts are left-padded so every row continues at the same
column; positions skip the padding. Rows that emit EOS keep running as padding until all rows are done
or `max_new_tokens` is reached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.core.runio import progress
from rlhfkit.data.batching import encode_prompts, pad_id, stop_ids
from rlhfkit.models.forward import position_ids
from rlhfkit.models.load import load_policy, load_tokenizer
from rlhfkit.models.runtime import autocast, resolve_device


@dataclass
class Samples:
    """Sampled responses. Shapes: B = batch, Tq = query length, Tr = response length."""

    queries: torch.Tensor  # (B, Tq) left-padded prompt ids
    query_mask: torch.Tensor  # (B, Tq)
    responses: torch.Tensor  # (B, Tr) sampled ids; pad after EOS
    response_mask: torch.Tensor  # (B, Tr) 1 up to and including EOS
    ended: torch.Tensor  # (B,) bool: the response emitted EOS within max_new_tokens


@torch.no_grad()
def sample(
    model,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sample up to `max_new_tokens` tokens per row from `model` (a causal LM), batched, with a KV cache.
    `eos_token_id`: the id, or the ids (EOS and a chat template's end-of-turn token: data.batching.stop_ids),
    that end a response."""
    B = queries.shape[0]
    device = queries.device
    stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and queries.shape[1] + max_new_tokens > limit:
        raise RlhfkitError(
            f"prompt length {queries.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"{limit} positions; use shorter prompts, fewer new tokens, or a model with a longer context"
        )
    mask = query_mask.clone()
    out = model(input_ids=queries, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1, :]  # (B, V)
    next_pos = mask.sum(dim=1, keepdim=True)  # (B, 1) position of the first response token
    tokens, alive = [], torch.ones(B, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_token_id))
        tokens.append(nxt)
        stopped = torch.isin(nxt, stops)
        ended |= alive & stopped
        alive &= ~stopped
        if not alive.any() or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=next_pos + t, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1, :]
    responses = torch.stack(tokens, dim=1)  # (B, Tr)
    # A token belongs to the response if no stop token (EOS) came strictly before it.
    is_eos = torch.isin(responses, stops).long()
    before = is_eos.cumsum(dim=1) - is_eos
    response_mask = (before == 0).long()
    responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, pad_token_id))
    return Samples(queries, query_mask, responses, response_mask, ended)


def decode_responses(tokenizer, samples: Samples) -> list[str]:
    """Response texts: every sampled token before EOS (what a labeler or a reward model with its own tokenizer
    sees). Special tokens the policy sampled mid-response stay in the text (`skip_special_tokens=False`), so
    a reward model or gold labeler judges what was really produced; only the final EOS and padding go."""
    texts = []
    for row, m, ended in zip(samples.responses, samples.response_mask, samples.ended):
        ids = row[m.bool()].tolist()
        if ended:
            ids = ids[:-1]  # the EOS that ended the response
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts


@torch.no_grad()
def sample_texts(
    model,
    tokenizer,
    prompts: list[str],
    k: int,
    *,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    dtype: torch.dtype | None = None,
    batch_size: int = 256,
    desc: str | None = None,
) -> list[list[str]]:
    """K sampled completion texts per prompt, in batches (with a progress bar when `desc` is given)."""
    device = next(model.parameters()).device
    flat = [p for p in prompts for _ in range(k)]
    texts: list[str] = []
    bar = None
    if desc is not None:
        bar = progress(len(flat), desc, unit="completion")
    for start in range(0, len(flat), batch_size):
        q, qm = encode_prompts(tokenizer, flat[start : start + batch_size])
        with autocast(device, dtype):
            s = sample(model, q.to(device), qm.to(device), max_new_tokens=max_new_tokens,
                       eos_token_id=stop_ids(tokenizer), pad_token_id=pad_id(tokenizer),
                       temperature=temperature, generator=generator)
        texts.extend(decode_responses(tokenizer, s))
        if bar is not None:
            bar.update(len(q))
    if bar is not None:
        bar.close()
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def sample_completions(
    policy_dir,
    prompts: list[str],
    k: int,
    *,
    seed: int = 0,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    device: str = "auto",
    batch_size: int = 256,
) -> list[list[str]]:
    """K sampled completions (texts) for each prompt from a local policy directory."""
    dev = resolve_device(device)
    tokenizer = load_tokenizer(policy_dir, "policy")
    model = load_policy(policy_dir, dev).eval()
    generator = torch.Generator(device=dev).manual_seed(seed)
    return sample_texts(model, tokenizer, prompts, k, max_new_tokens=max_new_tokens, generator=generator,
                        temperature=temperature, batch_size=batch_size)
