"""Forward passes of a model shared by every algorithm: logits, per-token and sequence log-probs of responses, values
and reward-model scores, and the switches RL needs (dropout off, frozen). The math on their outputs (log-softmax
gathers, KL, losses) is rlhfkit/ops/, pure tensor functions.

Log-probs of the training passes (sequence_logprobs for DPO and its relatives, response_logprobs and forward_response
for PPO, RLOO, GRPO and the reference) take the chunked path where the model allows: the transformer body once, then
the head only at the positions that predict a scored token, LOGPROB_CHUNK positions at a time
(rlhfkit.ops.logprobs.chunked_head_logprobs), instead of (B, T, V) logits at every position and their fp32 copy.
Same values (on CPU to the last bit), same gradients up to the order of a float sum (docs/methods/dpo.md, "Memory");
a model whose logits are not a plain linear head keeps the full-logits path (plain_head).

Layer: models (imports ops, core).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

from rlhfkit.core.errors import ConfigError, RlhfkitError
from rlhfkit.data.batching import Packing, packing, pad_right, shared_prefix_packing, used_columns
from rlhfkit.models.lora import AdapterDisabled
from rlhfkit.models.runtime import Runtime, autocast
from rlhfkit.models.value_head import ValueHead
from rlhfkit.ops.logprobs import chunked_head_logprobs, gather_logprobs

# Positions per chunk of the chunked log-prob path: its (chunk, V) logits are 100 MB in fp32 at SmolLM2's
# V = 49,152, a few of them alive in the backward. 0 = the full-logits path everywhere (the path before chunking).
LOGPROB_CHUNK = 512


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


def packed_causal_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(R, T, V) logits of rows packed padding-free (rlhfkit.data.batching.packed_rows): no attention mask, so that
    transformers (5.x, masking_utils.find_packed_sequence_indices) reads each sequence's bounds from the position
    ids and keeps attention within it; it does so only without a cache, hence use_cache=False. A model that does
    not is caught before training (check_packing)."""
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def _attention_implementation(model) -> str | None:
    model = model.peft_model if isinstance(model, AdapterDisabled) else model
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def packed_inputs(model, p: Packing, ids: torch.Tensor) -> dict:
    """The keyword arguments of a forward over the rows of `p` (ids: the padded batch's): the packed ids and position
    ids, no cache, and for shared_prefix_packing's trees the attention mask that keeps each sequence to its own
    tokens, in the form the model's attention reads a custom 4D mask (transformers 5.x passes a 4D mask through as
    given: masking_utils._preprocess_mask_arguments): bool for SDPA, additive float for eager. Without it (whole
    sequences back to back) no mask: packed_causal_logits says why."""
    inputs = {"input_ids": packed_ids(p, ids), "position_ids": p.positions, "use_cache": False}
    if p.attend is None:
        return inputs
    allowed = p.attend[:, None]  # (R, 1, W, W)
    if tree_attention(model) == "sdpa":
        inputs["attention_mask"] = allowed
    else:
        inputs["attention_mask"] = torch.zeros(allowed.shape, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min)
    return inputs


def tree_attention(model) -> str:
    """The model's attention implementation where it takes a mask per token pair (train.shared_prefix); a
    ConfigError otherwise (flash attention's kernels take sequence bounds, not a mask)."""
    impl = _attention_implementation(model)
    if impl not in ("sdpa", "eager"):
        raise ConfigError(f"train.shared_prefix needs the model's attention to take a mask per token pair ('sdpa' or "
                          f"'eager'); {type(model).__name__} uses {impl!r}: set train.shared_prefix = false, or load "
                          f"the model with attn_implementation='sdpa'")
    return impl


@torch.no_grad()
def check_packing(model, ids: torch.Tensor, mask: torch.Tensor, shared: bool = False) -> float:
    """The largest difference between the outputs of two sequences (rows 0 and 1, any padding side) forwarded alone
    and packed into one row, in fp32 with dropout off: log-probs for a causal LM, for a scalar model (a reward or
    value model) its head's output at every token relative to their largest magnitude. Rounding (1e-7 to 1e-4)
    where the model keeps packed sequences apart, far more (attention across the boundary: 0.1 and up) where it
    does not. shared: the second sequence is the first's first half followed by row 1's tokens, packed with the
    half shared (shared_prefix_packing), so that its tokens must not see the first sequence's second half."""
    modes = {m: m.training for m in model.modules()}  # each its own (a LoRA reference shares the policy's modules)
    model.eval()
    # fp32 whatever the caller's autocast: bf16's rounding alone moves a 30-layer model's log-probs by 0.4 (SmolLM2)
    try:
        with torch.autocast(ids.device.type, enabled=False):
            a, b = (ids[i][mask[i].bool()] for i in range(2))
            if shared:
                b = torch.cat([a[: max(1, len(a) // 2)], b])
            pair_ids, pair_mask = pad_right([a.tolist(), b.tolist()], int(a[0]))
            pair_ids, pair_mask = pair_ids.to(ids.device), pair_mask.to(ids.device)
            # one row holding both (twice the longest: room for both, whatever they share)
            p = shared_prefix_packing(pair_ids, pair_mask, 2 * max(len(a), len(b))) if shared else \
                packing(pair_mask, len(a) + len(b))
            assert p.packed_shape[0] == 1
            if is_scalar_model(model):
                alone = [token_scalars(model, s[None], torch.ones_like(s)[None])[0] for s in (a, b)]
                hidden = model.base_model(**packed_inputs(model, p, pair_ids)).last_hidden_state
                packed = p.unpack(scalar_head(model)(hidden).squeeze(-1).float())
                scale = max(v.abs().max().item() for v in alone) or 1.0
            else:
                alone = [torch.log_softmax(causal_logits(model, s[None], torch.ones_like(s)[None])[0].float(), -1)
                         for s in (a, b)]
                packed = p.unpack(torch.log_softmax(model(**packed_inputs(model, p, pair_ids)).logits.float(), -1))
                scale = 1.0
            return max((packed[i, : len(s)] - alone[i]).abs().max().item() for i, s in enumerate((a, b))) / scale
    finally:
        for m, training in modes.items():
            m.training = training


# check_packing's gap, fp32. Measured on log-probs: rounding 5e-7 on the tiny test models, 5e-5 on SmolLM2-135M (30
# layers); attention across the boundary 0.18 and 0.41 on tiny random-init GPT-2 and Llama, 24 on SmolLM2. On a
# scalar head's outputs, relative to their largest: rounding 1e-7 to 8e-7, across the boundary 0.06 (GPT-2) and 0.28
# (Llama) at the default init, 0.42 and 1.7 with sharp weights (tiny random-init sequence classifiers).
PACKING_TOLERANCE = 1e-2
_packing_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the kinds checked


def ensure_packing(model, ids: torch.Tensor, mask: torch.Tensor, rt: Runtime, shared: bool = False) -> None:
    """Refuse train.padding_free (shared: train.shared_prefix) for a model that would attend across packed
    sequences (check_packing on the first two of these rows, wherever they are held, once per model object)."""
    done = _packing_checked.setdefault(model, set())
    if shared in done or len(ids) < 2:
        return
    option = "train.shared_prefix" if shared else "train.padding_free"
    gap = check_packing(model, rt.put(ids[:2]), rt.put(mask[:2]), shared)
    if gap > PACKING_TOLERANCE:
        raise ConfigError(f"{option}: {type(model).__name__} attends across packed sequences (outputs moved by "
                          f"{gap:.2g}); set {option} = false for this model")
    done.add(shared)


def batch_packing(model, ids: torch.Tensor, mask: torch.Tensor, rt: Runtime) -> Packing:
    """The Packing of a batch under rt: common beginnings shared (train.shared_prefix) or whole sequences back to
    back (train.padding_free), the model checked first (ensure_packing)."""
    if rt.shared_prefix:
        tree_attention(model)  # before any forward: an attention that takes no mask is refused by name
    ensure_packing(model, ids, mask, rt, rt.shared_prefix)
    return shared_prefix_packing(ids, mask) if rt.shared_prefix else packing(mask)


def packed_ids(p: Packing, ids: torch.Tensor) -> torch.Tensor:
    """(R, W) ids packed by p, the tails holding the batch's first real token, not padding (transformers warns of
    padding in a batch without an attention mask; no real token sees a tail)."""
    return p.pack(ids, fill=int(ids[p.src][0]))


def scalar_head(model):
    """The linear scalar head of a sequence-classification model (`score` for decoders)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise RlhfkitError(f"{type(model).__name__} has no 'score' or 'classifier' head; use a decoder-style reward model")


def is_scalar_model(model) -> bool:
    """A model with a scalar head (a reward or value model: `score` or `classifier`), not a causal LM."""
    return any(isinstance(getattr(model, name, None), torch.nn.Module) for name in ("score", "classifier"))


def token_scalars(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rt: Runtime | None = None
                  ) -> torch.Tensor:
    """(B, T) head output at every token: values for the critic; the reward is read at the last token. With
    rt.padding_free or rt.shared_prefix, from one forward of the rows packed (the same values to rounding; 0 on
    padding)."""
    if rt is not None and (rt.padding_free or rt.shared_prefix):
        p = batch_packing(model, input_ids, attention_mask, rt)
        hidden = model.base_model(**packed_inputs(model, p, input_ids)).last_hidden_state  # (R, W, H)
        return p.unpack(scalar_head(model)(hidden).squeeze(-1).float())
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    ).last_hidden_state  # (B, T, H)
    return scalar_head(model)(hidden).squeeze(-1).float()  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real (mask = 1) token in each row, for any padding side."""
    T = attention_mask.shape[1]
    ar = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), ar, torch.full_like(ar, -1)).max(dim=1).values


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rt: Runtime | None = None
                    ) -> torch.Tensor:
    """(B,) reward-model score at the last real token of each sequence (rt.padding_free: token_scalars packed)."""
    values = token_scalars(model, input_ids, attention_mask, rt)  # (B, T)
    idx = last_token_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


# ----------------------------------------------------------------------------------------------------
# The chunked log-prob path: hidden states once, the head over chunks of the scored positions only

# transformers causal LMs whose forward is exactly `logits = lm_head(body(...).last_hidden_state)`: nothing between
# the final hidden states and the logits (read in transformers' modeling_*.py). Others, e.g. Gemma 2's
# final_logit_softcapping, Cohere's logit_scale or Granite's logits_scaling, keep the full-logits path.
PLAIN_HEAD_MODELS = frozenset({"GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                               "Qwen3ForCausalLM", "SmolLM3ForCausalLM"})
# Config fields that would put a transform on the logits; any of them set sends a model to the full path even when
# its class is listed above (a belt to the braces: a listed class ignores them today).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


def plain_head(model):
    """(body, head, context) when `model`'s logits are exactly head(body(...).last_hidden_state) with head a plain
    torch.nn.Linear, so log-probs can be computed from the hidden states one chunk at a time; None otherwise (the
    caller takes the full-logits path). `model` is a transformers causal LM, a peft LoRA model around one, or the
    adapter-disabled reference of a LoRA run; `context` is the context manager to run the body in (the adapter
    switched off for the reference). Detected from the classes, never guessed: anything unknown returns None."""
    context = contextlib.nullcontext
    if isinstance(model, AdapterDisabled):
        context = model.peft_model.disable_adapter
        model = model.peft_model
    if hasattr(model, "get_base_model"):  # a peft model: LoRA only (prompt learning prepends virtual tokens;
        config = model.active_peft_config  # aLoRA changes the forward with hooks)
        if config.peft_type != "LORA" or config.is_prompt_learning \
                or getattr(config, "alora_invocation_tokens", None) is not None:
            return None
        model = model.get_base_model()  # the transformers model, its linear layers replaced by LoRA layers
    cls = type(model)
    if cls.__name__ not in PLAIN_HEAD_MODELS or not cls.__module__.startswith("transformers.models."):
        return None
    if any(getattr(model.config, name, None) is not None for name in LOGIT_TRANSFORMS):
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # LoRA on lm_head, or modules_to_save: not the plain weight
        return None
    return model.base_model, head, context


def scored_token_logprobs(model, input_ids, attention_mask, scored, temperature: float = 1.0,
                          chunk: int | None = None, with_entropy: bool = False, positions=None, value_head=None):
    """(B, T - 1) log softmax(logits / temperature)[token t + 1] at position t where scored[:, t + 1] = 1, else 0.

    The chunked path: one pass of the transformer body to the final hidden states (B, T, H), kept only at the
    positions that predict a scored token (N of them: no prompt or padding position), then the head's log-probs
    over chunks of `chunk` positions (LOGPROB_CHUNK by default). The model must pass plain_head; call it under
    the run's autocast, as the model itself would be. with_entropy: (log-probs, entropy), the (B, T - 1) entropy of
    softmax(logits / temperature) at the same positions (no grad), else 0. `positions`: rows packed padding-free
    (packed_causal_logits: no attention mask, the position ids given). value_head (rlhfkit.models.value_head): also
    its values from the same hidden states at the same positions, last in the tuple returned."""
    body, head, context = plain_head(model)
    chunk = LOGPROB_CHUNK if chunk is None else chunk
    with context():
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      position_ids=position_ids(attention_mask) if positions is None else positions
                      ).last_hidden_state  # (B, T, H)
    keep = scored[:, 1:].bool()  # (B, T - 1): position t predicts token t + 1
    scored_hidden = hidden[:, :-1][keep]  # (N, H)
    out = chunked_head_logprobs(scored_hidden, head.weight, head.bias, input_ids[:, 1:][keep],
                                temperature, chunk, with_entropy)  # (N,) fp32, or (N,), (N,)
    out = out if with_entropy else (out,)
    if value_head is not None:
        out += (value_head(scored_hidden),)  # (N,): the value before each scored token

    def scatter(values):  # (N,) -> (B, T - 1), 0 at the positions not scored
        return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)

    return tuple(scatter(v) for v in out) if len(out) > 1 else scatter(out[0])


def use_chunked(model, chunk: int | None) -> bool:
    """Whether the log-probs take the chunked path: a chunk size > 0 (LOGPROB_CHUNK by default) and a model whose
    logits are a plain linear head (plain_head)."""
    return (LOGPROB_CHUNK if chunk is None else chunk) > 0 and plain_head(model) is not None


def packed_scored_logprobs(model, input_ids, attention_mask, scored, rt: Runtime, temperature: float = 1.0,
                           chunk: int | None = None, with_entropy: bool = False, value_head=None):
    """scored_token_logprobs (its (B, T - 1) layout, 0 where not scored; entropy and a value head's values as it
    gives them) from one forward of the rows packed padding-free (train.padding_free;
    rlhfkit.data.batching.Packing) or with their common beginnings once (train.shared_prefix), on the chunked head
    or the full-logits path: the padded forward's values to float rounding. Any padding side (a rollout's
    left-padded query and right-padded response). A model that would attend across packed sequences is refused
    (ensure_packing)."""
    p = batch_packing(model, input_ids, attention_mask, rt)
    if p.attend is not None:
        return _tree_scored_logprobs(model, p, input_ids, scored, temperature, chunk, with_entropy, value_head)
    ids, p_scored = packed_ids(p, input_ids), p.pack(scored)
    if use_chunked(model, chunk):
        out = scored_token_logprobs(model, ids, None, p_scored, temperature, chunk, with_entropy, positions=p.positions,
                                    value_head=value_head)
        out = out if isinstance(out, tuple) else (out,)
    else:
        out = model(input_ids=ids, position_ids=p.positions, use_cache=False,  # packed_causal_logits says why
                    output_hidden_states=value_head is not None)
        out = _full_path_outputs(out, ids, p_scored, 0, temperature, with_entropy, value_head)
    # position t predicts token t + 1: each value moves with its token, then back to the (B, T - 1) layout
    out = tuple(p.unpack(F.pad(v, (1, 0)))[:, 1:] for v in out)
    return out if len(out) > 1 else out[0]


def _tree_scored_logprobs(model, p: Packing, input_ids, scored, temperature, chunk, with_entropy, value_head):
    """packed_scored_logprobs on shared_prefix_packing's rows, where the token after a column need not be the next
    column (a shared prompt's last token predicts each sequence's first own token): each scored token's predictor
    is found through the padded layout, as the packed place of the token before it."""
    keep = scored[:, 1:].bool()  # (B, T - 1): position t predicts token t + 1
    at = p.flat_index()[:, :-1][keep]  # (N,) the packed place of each scored token's predictor
    targets = input_ids[:, 1:][keep]  # (N,)
    inputs = packed_inputs(model, p, input_ids)
    if use_chunked(model, chunk):
        body, head, context = plain_head(model)
        with context():
            hidden = body(**inputs).last_hidden_state.flatten(0, 1)[at]  # (N, H)
        out = chunked_head_logprobs(hidden, head.weight, head.bias, targets, temperature,
                                    LOGPROB_CHUNK if chunk is None else chunk, with_entropy)
        out = out if with_entropy else (out,)
    else:
        full = model(**inputs, output_hidden_states=value_head is not None)
        logits = full.logits.flatten(0, 1)[at] / temperature  # (N, V)
        out = (gather_logprobs(logits, targets),)
        if with_entropy:
            with torch.no_grad():
                logp_all = torch.log_softmax(logits.float(), dim=-1)
                out += (-(logp_all.exp() * logp_all).sum(-1),)
        if value_head is not None:
            hidden = full.hidden_states[-1].flatten(0, 1)[at]
    if value_head is not None:
        out += (value_head(hidden),)
    out = tuple(torch.zeros(keep.shape, dtype=v.dtype, device=v.device).masked_scatter(keep, v) for v in out)
    return out if len(out) > 1 else out[0]


def _full_path_outputs(out, ids, scored, start: int, temperature, with_entropy: bool, value_head) -> tuple:
    """(log-probs, [entropy], [values]) of the full-logits path from a causal LM's output `out` over `ids`, for the
    positions from `start` on that predict a next token, 0 where the predicted token is not `scored`."""
    logits = out.logits[:, start:-1] / temperature  # position t predicts token t + 1
    keep = scored[:, start + 1 :]
    result = (gather_logprobs(logits, ids[:, start + 1 :]) * keep,)
    if with_entropy:
        with torch.no_grad():
            logp_all = torch.log_softmax(logits.float(), dim=-1)
            result += (-(logp_all.exp() * logp_all).sum(-1) * keep,)
    if value_head is not None:  # the final hidden states, after the final norm: what the LM head reads
        result += (value_head(out.hidden_states[-1][:, start:-1]) * keep,)
    return result


# ----------------------------------------------------------------------------------------------------
# Log-probs of responses and of sequences


def response_logits(model, queries, query_mask, responses, response_mask, temperature: float = 1.0) -> torch.Tensor:
    """(B, Tr, V) logits that predicted each response token (one forward over query + response).

    Logits are divided by the sampling temperature so log-probs match the distribution sampled from.
    """
    input_ids = torch.cat([queries, responses], dim=1)  # (B, Tq + Tr)
    mask = torch.cat([query_mask, response_mask], dim=1)
    Tq = queries.shape[1]
    logits = causal_logits(model, input_ids, mask)[:, Tq - 1 : -1, :]  # position t predicts token t + 1
    return logits / temperature


def response_logprobs(model, queries, query_mask, responses, response_mask, temperature: float = 1.0,
                      chunk: int | None = None) -> torch.Tensor:
    """(B, Tr) log pi(response_t | query, response_<t); zero where response_mask = 0. Chunked where the model
    allows (chunk: positions per chunk, LOGPROB_CHUNK by default; 0 = the full-logits path)."""
    if use_chunked(model, chunk):
        return _chunked_response_logprobs(model, queries, query_mask, responses, response_mask, temperature, chunk)
    logits = response_logits(model, queries, query_mask, responses, response_mask, temperature)
    return gather_logprobs(logits, responses) * response_mask


def _chunked_response_logprobs(model, queries, query_mask, responses, response_mask, temperature, chunk,
                               with_entropy: bool = False, value_head=None):
    input_ids = torch.cat([queries, responses], dim=1)  # (B, Tq + Tr)
    mask = torch.cat([query_mask, response_mask], dim=1)
    scored = torch.cat([torch.zeros_like(query_mask), response_mask], dim=1)  # the response tokens
    Tq = queries.shape[1]
    out = scored_token_logprobs(model, input_ids, mask, scored, temperature, chunk, with_entropy,
                                value_head=value_head)
    return tuple(v[:, Tq - 1 :] for v in out) if isinstance(out, tuple) else out[:, Tq - 1 :]  # (B, Tr) each


def sequence_logprobs(model, input_ids, attention_mask, completion_mask, chunk: int | None = None) -> torch.Tensor:
    """(B,) sum over completion tokens of log pi(token | prefix): the sequence log-prob DPO compares.

    For the right-padded prompt + completion + EOS layout of `batching.encode_pairs` (completion_mask = 1 on
    completion tokens, EOS included). One forward; position t predicts token t + 1, so token t's log-prob
    sits at position t - 1 and the masks shift by one. Token 0 has no prefix to be predicted from: a
    completion must not start there (a prompt of at least one token, e.g. BOS). Chunked where the model allows
    (chunk: positions per chunk, LOGPROB_CHUNK by default; 0 = the full-logits path).
    """
    if completion_mask[:, 0].any():
        raise ValueError("completion_mask marks token 0, which no prefix predicts; give each completion a prompt "
                         "of at least one token (e.g. the tokenizer's BOS)")
    if use_chunked(model, chunk):
        return scored_token_logprobs(model, input_ids, attention_mask, completion_mask, 1.0, chunk).sum(dim=-1)  # (B,)
    logits = causal_logits(model, input_ids, attention_mask)[:, :-1]  # (B, T-1, V): position t predicts t + 1
    logprobs = gather_logprobs(logits, input_ids[:, 1:])  # (B, T-1), fp32
    return (logprobs * completion_mask[:, 1:]).sum(dim=-1)  # (B,)


def forward_response(policy, value_model, queries, query_mask, responses, response_mask, temperature, rt: Runtime,
                     with_entropy: bool = False, chunk: int | None = None):
    """Log-probs (B, Tr) of the responses, values (B, Tr) predicted before each token (None without a value
    model) and, when asked, the policy's entropy (B, Tr), without grad: a metric, computed from each chunk's logits
    on the chunked path. The chunked path is taken where the model allows (chunk: positions per chunk,
    LOGPROB_CHUNK by default; 0 = the full-logits path). Log-probs, values and entropy where response_mask = 0 are
    not meaningful (callers mask them). `value_model`: a scalar model of its own (a second forward), or a ValueHead
    on the policy's body (ppo.value_init = 'shared': the values come from the policy's own forward)."""
    if rt.padding_free or rt.shared_prefix:
        return _packed_forward_response(policy, value_model, queries, query_mask, responses, response_mask,
                                        temperature, rt, with_entropy, chunk)
    shared = value_model if isinstance(value_model, ValueHead) else None
    Tq = queries.shape[1]
    with autocast(rt.device, rt.dtype):
        if use_chunked(policy, chunk):
            out = _chunked_response_logprobs(policy, queries, query_mask, responses, response_mask, temperature,
                                             chunk, with_entropy, shared)  # (B, Tr) fp32 each
        else:
            ids, mask = torch.cat([queries, responses], dim=1), torch.cat([query_mask, response_mask], dim=1)
            scored = torch.cat([torch.zeros_like(query_mask), response_mask], dim=1)
            full = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                          output_hidden_states=shared is not None)
            out = _full_path_outputs(full, ids, scored, Tq - 1, temperature, with_entropy, shared)
        out = out if isinstance(out, tuple) else (out,)
        logprobs, entropy, values = out[0], out[1] if with_entropy else None, out[-1] if shared is not None else None
        if value_model is not None and shared is None:
            ids, mask = torch.cat([queries, responses], dim=1), torch.cat([query_mask, response_mask], dim=1)
            values = token_scalars(value_model, ids, mask)[:, Tq - 1 : -1]  # (B, Tr)
    return logprobs, values, entropy


def _packed_forward_response(policy, value_model, queries, query_mask, responses, response_mask, temperature,
                             rt: Runtime, with_entropy: bool, chunk: int | None):
    """forward_response with train.padding_free: query + response rows packed (packed_scored_logprobs, and
    token_scalars for a value model of its own): the padded values to rounding where response_mask = 1, 0
    elsewhere."""
    ids, mask = torch.cat([queries, responses], dim=1), torch.cat([query_mask, response_mask], dim=1)
    scored = torch.cat([torch.zeros_like(query_mask), response_mask], dim=1)
    shared = value_model if isinstance(value_model, ValueHead) else None
    Tq = queries.shape[1]
    with autocast(rt.device, rt.dtype):
        out = packed_scored_logprobs(policy, ids, mask, scored, rt, temperature, chunk, with_entropy, shared)
        out = tuple(v[:, Tq - 1 :] for v in (out if isinstance(out, tuple) else (out,)))
        logprobs, entropy, values = out[0], out[1] if with_entropy else None, out[-1] if shared is not None else None
        if value_model is not None and shared is None:
            values = token_scalars(value_model, ids, mask, rt)[:, Tq - 1 : -1]
    return logprobs, values, entropy


def row_logprobs(model, seqs, rows: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """(len(rows),) sequence log-probs of rows `rows` of seqs = (ids, mask, completion_mask) in encode_pairs'
    right-padded layout, in ONE forward (columns past the longest of these rows hold only padding: cut)."""
    ids, mask, completion_mask = seqs
    rows = rows.to(ids.device)  # rows index the data where it is held (the host: Runtime.put)
    if rt.padding_free or rt.shared_prefix:
        return _packed_row_logprobs(model, ids[rows], mask[rows], completion_mask[rows], rt)
    T = used_columns(mask[rows])
    with autocast(rt.device, rt.dtype):
        return sequence_logprobs(model, rt.put(ids[rows, :T]), rt.put(mask[rows, :T]),
                                 rt.put(completion_mask[rows, :T]))


def _packed_row_logprobs(model, ids, mask, completion_mask, rt: Runtime) -> torch.Tensor:
    """row_logprobs with train.padding_free: the rows packed back to back, each sequence's completion log-probs
    summed (the padded forward's sums to float rounding)."""
    T = used_columns(mask)  # only the columns moved to the device that some row uses
    ids, mask, completion_mask = (rt.put(t[:, :T]) for t in (ids, mask, completion_mask))
    with autocast(rt.device, rt.dtype):
        return packed_scored_logprobs(model, ids, mask, completion_mask, rt).sum(dim=-1)  # (B,)
