"""The one sampler shared by every online method (PPO, best-of-N, ReST, RLOO/GRPO) and the feedback stage.

Batched autoregressive sampling with a KV cache: the prompt is run once, then each step feeds only the
newly sampled token (never the whole prefix). The cache and the attention mask are allocated once for the whole
sample and filled in place (preallocated_cache; transformers' DynamicCache concatenates at every step), with the
same numbers. Prompts are left-padded so every row continues at the same column; positions skip the padding. Rows
that emit EOS keep running as padding until all rows are done or `max_new_tokens` is reached.

With `[sampling] compile = true` each decoding step after the prompt's runs through torch.compile over transformers'
StaticCache (compiled_step): on CUDA as one CUDA graph a step (a small model's eager step is hundreds of kernel
launches, each far longer than its arithmetic; issue 18 measured 7-9 ms a token for GPT-2 small on an H200 at
batch 64 and 256 alike), on CPU as inductor's kernels. The logits differ from the eager steps' in the last bits.

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
import sys
import weakref
from dataclasses import dataclass, field

import torch

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.core.runio import is_main_process, progress
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

    n_layers = _full_attention_layers(model)
    if n_layers is None:
        return None
    cache = DynamicCache()
    cache.layers = [_preallocated_layer()(capacity) for _ in range(n_layers)]
    cache.layer_class_to_replicate = None  # exactly these layers
    return cache


def _full_attention_layers(model) -> int | None:
    """How many layers `model` (a transformers causal LM) has, or None unless every one is plain full attention
    (a sliding window, linear attention, or no transformers config to read)."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else None
    n_layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or getattr(text, "sliding_window", None) is not None or \
            any(t != "full_attention" for t in (getattr(text, "layer_types", None) or ())):
        return None
    return n_layers


# sampling.compile: the static cache's length is rounded up to a multiple of this, so that prompts of nearby lengths
# (each batch is padded to its longest prompt) reuse one compiled graph instead of compiling one per length.
STATIC_CACHE_MULTIPLE = 64


# sampling.compile: each model's static cache, kept for its next sample (see static_cache)
_STATIC_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def static_cache(model, batch: int, capacity: int, device: torch.device):
    """transformers' StaticCache of `capacity` positions for `batch` rows (fixed-size buffers whose addresses never
    change, which torch.compile and CUDA graphs need) for a model whose layers are all full attention.

    One is kept per model and reset for its next sample while the batch size, capacity and precision stay the
    same: CUDA graphs replay on fixed addresses, and a fresh cache each sample would have every graph recorded
    anew (transformers' generate keeps its static cache for the same reason). It holds its memory until the model
    goes or samples another shape."""
    from transformers.cache_utils import StaticCache

    if _full_attention_layers(model) is None:
        raise RlhfkitError(
            f"sampling.compile needs a model whose layers are all full attention; {type(model).__name__} has "
            f"sliding-window or other layers (or no transformers config): set sampling.compile = false")
    autocast_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    key = (batch, capacity, str(device), autocast_dtype)
    kept = _STATIC_CACHES.get(model)
    if kept is not None and kept[0] == key:
        kept[1].reset()  # zero the buffers and the filled length, in place
        return kept[1]
    _STATIC_CACHES.pop(model, None)  # the old shape's buffers go before the new ones are made
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    if is_main_process():  # a compile is tens of seconds of silence otherwise
        print(f"[rlhfkit] sampling.compile: {batch} rows x {capacity} positions; the first step of each new batch "
              f"and cache size compiles (tens of seconds on a CPU)", file=sys.stderr, flush=True)
    _STATIC_CACHES[model] = (key, cache)
    return cache


def _decoding_step(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """One token a row through `model`: (B, 1) ids, the (B, capacity) mask of the whole sample, (B, 1) positions
    -> (B, V) logits. The cache holds every earlier token and takes this one's keys and values in place."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{CACHE: cache})
    return out.logits[:, -1, :]


@functools.cache
def compiled_step(device_type: str):
    """The decoding step (_decoding_step, the model an argument) under torch.compile, made once per device type:
    on CUDA mode "reduce-overhead", which replays each step as one CUDA graph; elsewhere inductor's default.
    Static shapes (`dynamic=False`): each model, batch size and cache size is its own graph (the cache's size is
    rounded: STATIC_CACHE_MULTIPLE); the prompt's forward stays eager (transformers: a prefill is not compiled).
    Nothing here holds a model, so a model copied (a reference) or freed takes no compiled state with it; past
    torch._dynamo's recompile limit (raised to 64) the step runs eagerly on the static cache, with the same
    numbers."""
    import torch._dynamo

    # Each model x batch size x cache size is a graph of this one function, and a pipeline samples from several
    # models (SFT, the policy, each evaluation) at several batch sizes: torch's limit of 8 would fall back to eager
    # steps partway through a run.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = "reduce-overhead" if device_type == "cuda" else "default"
    return torch.compile(_decoding_step, mode=mode, fullgraph=True, dynamic=False)


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
    compile: bool = False  # each decoding step through torch.compile over a static cache (compiled_step)

    @classmethod
    def of(cls, section) -> "SamplingParams":
        """The settings of a config's [sampling] section (any object with these fields)."""
        return cls(section.top_k, section.top_p, section.min_p, section.repetition_penalty, tuple(section.stop),
                   getattr(section, "draw", "multinomial"), getattr(section, "compile", False))


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
    capacity = queries.shape[1] + max_new_tokens
    if params.compile:  # a static cache: every step's shapes (and the buffers' addresses) are the same
        capacity = -(-capacity // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE
        cache, step = static_cache(model, B, capacity, device), functools.partial(compiled_step(device.type), model)
    else:
        cache, step = preallocated_cache(model, capacity), None
    # the attention mask of the whole sample, filled as it grows: each eager step's mask is a view of its first
    # columns; a compiled step takes all of it (the columns past the newest token are ones, which the causal mask
    # hides, as it hides the static cache's unfilled positions)
    full_mask = torch.ones(B, capacity, dtype=query_mask.dtype, device=device)
    full_mask[:, : queries.shape[1]] = query_mask
    mask = full_mask if step is not None else full_mask[:, : queries.shape[1]]
    out = model(input_ids=queries, attention_mask=mask, position_ids=position_ids(query_mask), use_cache=True,
                **({CACHE: cache} if cache is not None else {}), **last_logits_only(model))
    past, logits = getattr(out, CACHE), out.logits[:, -1, :]  # (B, V)
    next_pos = query_mask.sum(dim=1, keepdim=True)  # (B, 1) position of the first response token
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
        if step is not None:
            logits = _compiled_logits(step, nxt.unsqueeze(1), full_mask, next_pos + t, past)
            continue
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


def _compiled_logits(step, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """(B, V) logits of a compiled decoding step. Under CUDA graphs the output lives in the graph's memory, which
    the next replay overwrites: the step begins a new replay explicitly and the logits are copied out."""
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.compiler.cudagraph_mark_step_begin()
    try:
        logits = step(ids, mask, positions, cache)
    except Exception as e:  # inductor's compile failing (no C++ compiler, an unsupported model) ends deep in torch
        if "torch._dynamo" in type(e).__module__ or "torch._inductor" in type(e).__module__:
            raise RlhfkitError(f"sampling.compile: torch.compile could not compile the decoding step "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               f"set sampling.compile = false to sample eagerly") from e
        raise
    return logits.clone() if cuda else logits


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
