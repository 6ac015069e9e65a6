"""The one sampler shared by every online method (PPO, best-of-N, ReST, RLOO/GRPO) and the feedback stage.

Batched autoregressive sampling with a KV cache: the prompt is run once, then each step feeds only the
newly sampled token (never the whole prefix). The cache and the attention mask are allocated once for the whole
sample and filled in place (preallocated_cache; transformers' DynamicCache concatenates at every step), with the
same numbers. Prompts are left-padded so every row continues at the same column; positions skip the padding. Rows
that emit EOS keep running as padding until all rows are done or `max_new_tokens` is reached.

The [sampling] settings (SamplingParams) shape each step's distribution beyond the temperature, in Hugging Face
generate's order: repetition penalty on the raw logits, then the temperature, then top-k, top-p and min-p
(rlhfkit/ops/sampling.py). With their defaults (all off, no stop strings) the sampler runs exactly the
operations it ran before they existed, so every earlier result is reproduced bit for bit. The token is then drawn
with torch.multinomial, or with `draw = "inverse_cdf"` by inverse transform sampling, 10-20x cheaper on CPU
(rlhfkit.ops.sampling.draw_tokens): the same distribution, other samples from the same seed.

Log-probs are NOT those of the filtered distribution: the online methods (PPO, RLOO, GRPO) and the KL figures
use the model's log-probs at the sampling temperature without the top-k/top-p/min-p cut or the repetition
penalty (rlhfkit.models.forward.response_logprobs), as TRL does (its trainers compute log-probs from the
temperature-scaled logits alone). The samples then come from the filtered distribution while the objective, the
ratios and the KL are those of the unfiltered one: a small off-policy bias that TRL accepts too; leave the
filters off for RL whose KL must be exact (docs/methods/ppo.md, "Deviations").

Stop strings end a response at the first occurrence of any of them in its decoded text, checked after each
step on the rows still running; the response keeps the tokens up to and including the one that completed the
stop string (they were sampled, and the log-probs cover them as they cover EOS), counts as ended like one that
emitted EOS, and its decoded text (decode_responses) stops before the stop string: the stop string, like EOS,
is how a reply ends, not part of it (vLLM's default, `include_stop_str_in_output=False`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.core.runio import progress
from rlhfkit.data.batching import encode_prompts, pad_id, stop_ids
from rlhfkit.models.forward import position_ids
from rlhfkit.models.load import load_policy, load_tokenizer
from rlhfkit.models.runtime import autocast, resolve_device
from rlhfkit.ops.sampling import (
    draw_tokens,
    min_p_filter,
    repetition_penalty,
    seen_tokens,
    top_k_filter,
    top_p_filter,
)


def _cache_name() -> str:
    """The name of the KV cache, as argument and output field: transformers 5.2x renamed `past_key_values` to
    `cache` (the old name still works there but warns on every call); older releases know only the old name."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


CACHE = _cache_name()


@functools.cache
def _preallocated_layer():
    """The cache layer class of preallocated_cache (transformers imported on first use)."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer whose keys and values live in (B, H, capacity, D) buffers made at the first update and
        written in place; `keys`/`values` are views of the filled columns, so attention still runs over the
        tokens so far only (the same numbers as DynamicLayer's concatenation)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.filled = capacity, 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                shape = (*key_states.shape[:-2], self.capacity, key_states.shape[-1])
                self.key_buffer, self.value_buffer = key_states.new_empty(shape), value_states.new_empty(shape)
            end = self.filled + key_states.shape[-2]
            if end > self.capacity:  # sample() sizes it; a caller feeding more is a bug, not a reason to grow
                raise RuntimeError(f"KV cache of {self.capacity} positions overflowed ({end})")
            self.key_buffer[..., self.filled : end, :] = key_states
            self.value_buffer[..., self.filled : end, :] = value_states
            self.filled = end
            self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
            return self.keys, self.values

    return PreallocatedLayer


def preallocated_cache(model, capacity: int):
    """A KV cache for `capacity` positions whose layers write each step's keys and values in place, or None where
    the model's layers are not all plain full attention (sliding windows, linear attention, a model without a
    transformers config): the model then makes its own.

    Why: transformers' DynamicCache concatenates every layer's keys and values at every step, a fresh and ever
    larger allocation each time; on CPU those copies (and the page faults of the fresh buffers) were over half of a
    decoding step of the 4 x 256 GPT-2 in benchmarks/vs_trl.py. The issue asks for no per-step allocation."""
    from transformers.cache_utils import DynamicCache

    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else None
    n_layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or getattr(text, "sliding_window", None) is not None or \
            any(t != "full_attention" for t in (getattr(text, "layer_types", None) or ())):
        return None
    cache = DynamicCache()
    cache.layers = [_preallocated_layer()(capacity) for _ in range(n_layers)]
    cache.layer_class_to_replicate = None  # exactly these layers
    return cache


def last_logits_only(model) -> dict:
    """{"logits_to_keep": 1} where `model`'s forward takes it (transformers' causal LMs; a peft model passes it to
    its base), else {}. The prompt's forward needs the logits at its last position only (every row's last column:
    prompts are left-padded); without it the forward computes (B, Tq, V) logits, e.g. 3.2 GB in bf16 for 64 prompts
    of 512 tokens at SmolLM2's 49,152-token vocabulary, to keep one column. The kept column is the same matmul's
    row, so it equals the full logits' last column (bit for bit on this CPU from 4 rows up; a batch of 1 row can
    differ in the last bit, where the BLAS library takes another kernel for one row)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(type(base), "forward", None)
    try:
        takes = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a forward without a signature to read: leave it as it is
        takes = False
    return {"logits_to_keep": 1} if takes else {}


@dataclass(frozen=True)
class SamplingParams:
    """How each token is drawn beyond the temperature: the [sampling] section (rlhfkit.pipeline.config). The
    temperature stays a separate argument of every sampler: it is set per stage, and the log-probs are taken
    at it. The defaults switch everything off (the sampler then runs as it did before these settings)."""

    top_k: int = 0  # keep the k most probable tokens; 0 = off
    top_p: float = 1.0  # keep the nucleus holding at least this probability; 1 = off
    min_p: float = 0.0  # keep tokens at least min_p x the top token's probability; 0 = off
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the sequence (prompt included) less likely
    stop: tuple[str, ...] = ()  # a response ends at the first of these in its decoded text
    draw: str = "multinomial"  # how the token is drawn from the probabilities (rlhfkit.ops.sampling.draw_tokens)

    @classmethod
    def of(cls, section) -> "SamplingParams":
        """The settings of a config's [sampling] section (any object with these fields)."""
        return cls(section.top_k, section.top_p, section.min_p, section.repetition_penalty, tuple(section.stop),
                   getattr(section, "draw", "multinomial"))


def next_token_logits(logits: torch.Tensor, temperature: float, params: SamplingParams,
                      seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) float logits the next token is drawn from (softmax of them): the repetition penalty on the raw
    logits (`seen`: (B, V) bool, the tokens in each sequence so far), the temperature, then top-k, top-p and
    min-p on the tempered distribution (Hugging Face generate's order). Each step that is off is skipped, so
    the defaults compute exactly `logits.float() / temperature`."""
    x = logits.float()
    if params.repetition_penalty != 1.0:
        x = repetition_penalty(x, seen, params.repetition_penalty)
    x = x / temperature
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    return min_p_filter(x, params.min_p)


def stop_window(stop: tuple[str, ...]) -> int:
    """How many trailing tokens to decode to see any stop string completed by the newest token: each character
    takes at most 4 byte-level tokens (UTF-8), plus a margin so the window's first tokens (where a tokenizer
    may decode a leading space or a partial character differently) never hold the match."""
    return 4 * max(len(s) for s in stop) + 8


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to the first occurrence of any stop string (the whole text when none occurs)."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


@dataclass
class Samples:
    """Sampled responses. Shapes: B = batch, Tq = query length, Tr = response length."""

    queries: torch.Tensor  # (B, Tq) left-padded prompt ids
    query_mask: torch.Tensor  # (B, Tq)
    responses: torch.Tensor  # (B, Tr) sampled ids; pad after EOS
    response_mask: torch.Tensor  # (B, Tr) 1 up to and including EOS (or the token that completed a stop string)
    ended: torch.Tensor  # (B,) bool: the response emitted EOS or completed a stop string within max_new_tokens
    stop: tuple[str, ...] = ()  # the stop strings it was sampled with (decode_responses cuts the text at them)
    by_stop_string: torch.Tensor | None = field(default=None, repr=False)  # (B,) bool: ended at a stop string, not EOS


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
    sampling: SamplingParams | None = None,
    tokenizer=None,
) -> Samples:
    """Sample up to `max_new_tokens` tokens per row from `model` (a causal LM), batched, with a KV cache.
    `eos_token_id`: the id, or the ids (EOS and a chat template's end-of-turn token: data.batching.stop_ids),
    that end a response. `sampling`: the filters and stop strings (default: none); stop strings need the
    `tokenizer` to decode with."""
    params = sampling if sampling is not None else SamplingParams()
    if params.stop and tokenizer is None:
        raise RlhfkitError("sampling with stop strings needs the tokenizer to decode the responses with")
    B = queries.shape[0]
    device = queries.device
    stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and queries.shape[1] + max_new_tokens > limit:
        raise RlhfkitError(
            f"prompt length {queries.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"{limit} positions; use shorter prompts, fewer new tokens, or a model with a longer context"
        )
    # the attention mask of the whole sample, filled as it grows: each step's mask is a view of its first columns
    full_mask = torch.ones(B, queries.shape[1] + max_new_tokens, dtype=query_mask.dtype, device=device)
    full_mask[:, : queries.shape[1]] = query_mask
    mask = full_mask[:, : queries.shape[1]]
    cache = preallocated_cache(model, full_mask.shape[1])
    out = model(input_ids=queries, attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
                **({CACHE: cache} if cache is not None else {}), **last_logits_only(model))
    past, logits = getattr(out, CACHE), out.logits[:, -1, :]  # (B, V)
    next_pos = mask.sum(dim=1, keepdim=True)  # (B, 1) position of the first response token
    tokens, alive = [], torch.ones(B, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    # the tokens each sequence holds so far, for the repetition penalty: the prompt's (not its padding), then each
    # sampled one
    seen = seen_tokens(queries, query_mask, logits.shape[-1]) if params.repetition_penalty != 1.0 else None
    by_string = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) ended at a stop string
    last = torch.full((B,), max_new_tokens, device=device)  # (B,) index of the token that completed a stop string
    for t in range(max_new_tokens):
        probs = torch.softmax(next_token_logits(logits, temperature, params, seen), dim=-1)
        nxt = draw_tokens(probs, generator, params.draw)  # (B,)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_token_id))
        tokens.append(nxt)
        if seen is not None:
            seen.scatter_(1, nxt.unsqueeze(1), True)  # a finished row's padding is never sampled from again
        stopped = torch.isin(nxt, stops)
        ended |= alive & stopped
        alive &= ~stopped
        if params.stop and alive.any():
            hit = _stop_string_rows(tokenizer, tokens, alive, params.stop)  # (B,) bool
            by_string |= hit
            ended |= hit
            last = torch.where(hit, torch.full_like(last, t), last)
            alive &= ~hit
        if not alive.any() or t == max_new_tokens - 1:
            break
        mask = full_mask[:, : mask.shape[1] + 1]
        out = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=next_pos + t, use_cache=True,
                    **{CACHE: past})
        past, logits = getattr(out, CACHE), out.logits[:, -1, :]
    responses = torch.stack(tokens, dim=1)  # (B, Tr)
    # A token belongs to the response if no stop token (EOS) came strictly before it.
    is_eos = torch.isin(responses, stops).long()
    before = is_eos.cumsum(dim=1) - is_eos
    response_mask = (before == 0).long()
    if params.stop:  # ... and, for a row cut at a stop string, no token after the one that completed it
        positions = torch.arange(responses.shape[1], device=device)
        response_mask = response_mask * (positions.unsqueeze(0) <= last.unsqueeze(1)).long()
    responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, pad_token_id))
    return Samples(queries, query_mask, responses, response_mask, ended, params.stop, by_string)


def _stop_string_rows(tokenizer, tokens: list[torch.Tensor], alive: torch.Tensor,
                      stop: tuple[str, ...]) -> torch.Tensor:
    """(B,) bool: the rows still running whose decoded response now holds a stop string. Only the last
    stop_window tokens are decoded (a stop string the newest token completes lies within them; an earlier one
    would have ended the row at an earlier step), one batch_decode over the running rows per step."""
    rows = alive.nonzero().squeeze(1)  # (R,)
    window = torch.stack(tokens[-stop_window(stop):], dim=1)[rows]  # (R, W)
    texts = tokenizer.batch_decode(window.tolist(), skip_special_tokens=False)
    hit = torch.zeros_like(alive)
    found = [i for i, text in enumerate(texts) if any(s in text for s in stop)]
    if found:
        hit[rows[found]] = True
    return hit


def decode_responses(tokenizer, samples: Samples) -> list[str]:
    """Response texts: every sampled token before EOS (what a labeler or a reward model with its own tokenizer
    sees). Special tokens the policy sampled mid-response stay in the text (`skip_special_tokens=False`), so
    a reward model or gold labeler judges what was really produced; only the final EOS and padding go. With
    stop strings, the text ends before the first of them (the module docstring says why)."""
    by_string = samples.by_stop_string if samples.by_stop_string is not None else torch.zeros_like(samples.ended)
    texts = []
    for row, m, ended, at_string in zip(samples.responses, samples.response_mask, samples.ended, by_string):
        ids = row[m.bool()].tolist()
        if ended and not at_string:
            ids = ids[:-1]  # the EOS that ended the response
        text = tokenizer.decode(ids, skip_special_tokens=False)
        texts.append(cut_at_stop(text, samples.stop) if samples.stop else text)
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
    sampling: SamplingParams | None = None,
) -> list[list[str]]:
    """K sampled completion texts per prompt, in batches (with a progress bar when `desc` is given); `sampling`:
    the [sampling] filters and stop strings (default: none)."""
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
                       temperature=temperature, generator=generator, sampling=sampling, tokenizer=tokenizer)
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
    sampling: SamplingParams | None = None,
) -> list[list[str]]:
    """K sampled completions (texts) for each prompt from a local policy directory."""
    dev = resolve_device(device)
    tokenizer = load_tokenizer(policy_dir, "policy")
    model = load_policy(policy_dir, dev).eval()
    generator = torch.Generator(device=dev).manual_seed(seed)
    return sample_texts(model, tokenizer, prompts, k, max_new_tokens=max_new_tokens, generator=generator,
                        temperature=temperature, batch_size=batch_size, sampling=sampling)
