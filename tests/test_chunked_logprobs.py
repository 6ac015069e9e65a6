"""The chunked log-prob path (hidden states once, the head over chunks of the scored positions) against the
full-logits path it replaces: values and gradients (every weight, the LoRA weights, the adapter-disabled reference),
ragged padding, temperature, chunk sizes that do not divide the positions; that the training passes take it (and
never build full logits), that the backward keeps no (N, V) logits, and that a model whose logits are not a plain
linear head (Gemma 2's soft-capping) falls back to the full path.

The models are sharp_policy's (logit std ~2): a position shifted by one, a dropped temperature or a row lost at a
chunk boundary moves a log-prob by far more than the tolerances below. The tolerances are float rounding: on
CPU the chunked values are the full path's to the last bit (same ops per row), except that a chunk of one row takes
BLAS's matrix-vector kernel (~1e-6); gradients of the head's weight are summed over chunks in another order.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import rlhfkit.models.forward as fwd
from rlhfkit.data.batching import pad_left, pad_right
from rlhfkit.models.forward import forward_response, plain_head, response_logprobs, sequence_logprobs
from rlhfkit.models.lora import AdapterDisabled, wrap_lora
from rlhfkit.models.runtime import Runtime
from rlhfkit.ops.logprobs import chunked_head_logprobs, gather_logprobs

CPU = Runtime(torch.device("cpu"), None)
ARCHS = ["gpt2", "llama"]
CHUNKS = [1, 3, 1000]  # one row per chunk; 3, which divides none of the position counts below; more than all

# Ragged rows, right-padded (prompt lengths 6, 1, 3, 2; completion lengths 4, 1, 6, 2): 13 scored positions.
PROMPTS = [[1, 5, 6, 7, 8, 4], [1], [1, 9, 4], [1, 13]]
COMPLETIONS = [[6, 7, 8, 2], [2], [13, 5, 10, 5, 6, 2], [7, 2]]
# Queries left-padded (lengths 6, 2, 9, 1), responses right-padded (lengths 4, 1, 3, 6): 14 scored positions.
QUERIES = [[1, 5, 6, 7, 8, 4], [1, 4], [1, 9, 9, 14, 5, 6, 7, 8, 4], [1]]
RESPONSES = [[6, 7, 8, 2], [2], [13, 5, 10], [5, 5, 6, 7, 8, 9]]
ROW_WEIGHTS = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a loss that weighs rows differently, so no gradient cancels


def pairs_batch(tokenizer):
    ids, mask = pad_right([p + c for p, c in zip(PROMPTS, COMPLETIONS)], tokenizer.pad_token_id)
    completion_mask, _ = pad_right([[0] * len(p) + [1] * len(c) for p, c in zip(PROMPTS, COMPLETIONS)], 0)
    return ids, mask, completion_mask


def response_batch(tokenizer):
    q, qm = pad_left(QUERIES, tokenizer.pad_token_id)
    r, rm = pad_right(RESPONSES, tokenizer.pad_token_id)
    return q, qm, r, rm


def value_and_grads(params, fn):
    """fn() -> (B,) or (B, T) log-probs; its value and the gradients of a row-weighted sum w.r.t. params."""
    for p in params:
        p.grad = None
    out = fn()
    weights = ROW_WEIGHTS if out.dim() == 1 else ROW_WEIGHTS[:, None]
    (out * weights).sum().backward()
    return out.detach(), [p.grad.clone() for p in params]


def assert_grads_close(got, expected):
    """Each parameter's gradient within 1e-5 of its largest entry (rounding, summed in another order, is ~1e-7;
    a shifted position or a lost row moves it by O(1))."""
    for g, e in zip(got, expected):
        assert e.abs().max() > 0
        assert (g - e).abs().max() <= 1e-5 * e.abs().max(), (g - e).abs().max() / e.abs().max()


def lora_policy(make, arch):
    """A LoRA-wrapped sharp policy with its B matrices drawn too (at B = 0 the adapter changes nothing)."""
    policy = wrap_lora(make(arch), SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=[]), ".", seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return policy


# ---------------------------------------------------------------- the pure function

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 3, 10, 11, 100])  # N = 11 rows: uneven chunks, one chunk, one larger
def test_chunked_head_logprobs_equal_the_full_gather(chunk, temperature, bias):
    g = torch.Generator().manual_seed(0)
    N, H, V = 11, 8, 37
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(V, (N,), generator=g)
    leaves = [hidden, weight] + ([b] if bias else [])
    coef = torch.randn(N, generator=g)

    def run(fn):
        for t in leaves:
            t.grad = None
        out = fn()
        (out * coef).sum().backward()
        return out.detach(), [t.grad.clone() for t in leaves]

    expected, expected_grads = run(lambda: gather_logprobs(F.linear(hidden, weight, b) / temperature, labels))
    got, grads = run(lambda: chunked_head_logprobs(hidden, weight, b, labels, temperature, chunk))
    assert got.shape == (N,) and got.dtype == torch.float32
    # relative: a log-prob near -15 is only held to ~1e-6 by float32 itself (CI saw 2 ulp under the BLAS
    # matrix-vector kernel of a one-row chunk); a shifted position or a lost temperature moves it by O(1)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6), (got - expected).abs().max()
    assert_grads_close(grads, expected_grads)


def test_chunked_head_logprobs_with_no_position_and_bad_chunk():
    hidden, weight = torch.zeros(0, 4, requires_grad=True), torch.randn(5, 4)
    out = chunked_head_logprobs(hidden, weight, None, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()  # still in the graph: a batch with nothing to score does not break the backward
    with pytest.raises(ValueError, match="positive"):
        chunked_head_logprobs(hidden, weight, None, torch.zeros(0, dtype=torch.long), chunk=0)


@pytest.mark.parametrize("chunk", [4, 16])
def test_backward_keeps_no_full_logits(chunk):
    """What autograd saves for the backward: the full path keeps (N, V) fp32 logits (and more); the chunked path
    keeps at most a chunk's inputs, nothing of size V per row (each chunk's logits are recomputed in the backward).
    Removing the checkpoint fails this test."""
    N, H, V = 64, 8, 1000
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(V, (N,))
    saved = {}

    def pack(t):  # what the forward leaves for the backward, by storage (the weight is shared by every chunk)
        saved[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full = gather_logprobs(F.linear(hidden, weight), labels).sum()
    assert max(saved.values()) >= N * V  # the full path keeps its (N, V) logits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked = chunked_head_logprobs(hidden, weight, None, labels, chunk=chunk).sum()
    assert sum(n for n in saved.values() if n >= V) <= V * H  # the weight at most: no chunk's logits at rest
    chunked.backward()  # and the backward still has what it needs
    assert torch.allclose(chunked, full.detach())


# ---------------------------------------------------------------- sequence log-probs (DPO and relatives)

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_sequence_logprobs_chunked_equal_full_values_and_grads(arch, chunk, tokenizer, sharp_policy):
    model = sharp_policy(arch)
    params = list(model.parameters())
    batch = pairs_batch(tokenizer)
    expected, expected_grads = value_and_grads(params, lambda: sequence_logprobs(model, *batch, chunk=0))
    got, grads = value_and_grads(params, lambda: sequence_logprobs(model, *batch, chunk=chunk))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got, expected)
    assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_grads_and_adapter_disabled_reference(arch, tokenizer, sharp_policy):
    """Gradients w.r.t. the LoRA weights (the base frozen), and the reference = the same model with the adapter
    off: the chunked path runs the body with the adapter off too (it differs from the policy's)."""
    policy = lora_policy(sharp_policy, arch)
    params = [p for p in policy.parameters() if p.requires_grad]
    assert params and plain_head(policy) is not None
    batch = pairs_batch(tokenizer)
    expected, expected_grads = value_and_grads(params, lambda: sequence_logprobs(policy, *batch, chunk=0))
    got, grads = value_and_grads(params, lambda: sequence_logprobs(policy, *batch, chunk=3))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert_grads_close(grads, expected_grads)
    reference = AdapterDisabled(policy)
    with torch.no_grad():
        ref_full = sequence_logprobs(reference, *batch, chunk=0)
        ref_chunked = sequence_logprobs(reference, *batch, chunk=3)
    assert torch.allclose(ref_chunked, ref_full, atol=1e-5, rtol=0)
    assert (ref_chunked - got).abs().max() > 0.1  # the adapter really was off


def test_chunked_under_bf16_autocast_is_the_full_paths(tokenizer, sharp_policy):
    """Under the runs' autocast the head runs in bf16 on both paths (a chunk computed in fp32 instead would differ
    by bf16 rounding of logits of size ~2, ~1e-2)."""
    model = sharp_policy("llama")
    batch = pairs_batch(tokenizer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = sequence_logprobs(model, *batch, chunk=0)
        got = sequence_logprobs(model, *batch, chunk=3)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got, expected)


# ---------------------------------------------------------------- response log-probs (PPO, RLOO, GRPO, the reference)

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_response_logprobs_chunked_equal_full_values_and_grads(arch, temperature, chunk, tokenizer, sharp_policy):
    model = sharp_policy(arch)
    params = list(model.parameters())
    q, qm, r, rm = response_batch(tokenizer)
    expected, expected_grads = value_and_grads(params, lambda: response_logprobs(model, q, qm, r, rm, temperature, chunk=0))
    got, grads = value_and_grads(params, lambda: response_logprobs(model, q, qm, r, rm, temperature, chunk=chunk))
    assert got.shape == r.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert (got[rm == 0] == 0).all()
    assert_grads_close(grads, expected_grads)
    # the training pass: forward_response's log-probs (masked by its callers) are the same
    got_fr, grads_fr = value_and_grads(
        params, lambda: forward_response(model, None, q, qm, r, rm, temperature, CPU, chunk=chunk)[0] * rm)
    assert torch.allclose(got_fr, expected, atol=1e-5, rtol=0)
    assert_grads_close(grads_fr, expected_grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_passes_take_the_chunked_path_and_build_no_full_logits(arch, tokenizer, sharp_policy, monkeypatch):
    """By default (LOGPROB_CHUNK) the training passes and the rollout pass with entropy go through
    chunked_head_logprobs and never call the model's head module (the full path's (B, T, V) logits); chunk = 0
    selects the full path."""
    model = sharp_policy(arch)
    calls = {"chunked": 0, "head": 0}
    real = fwd.chunked_head_logprobs

    def counting(*args, **kwargs):
        calls["chunked"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(fwd, "chunked_head_logprobs", counting)
    model.get_output_embeddings().register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))
    q, qm, r, rm = response_batch(tokenizer)
    sequence_logprobs(model, *pairs_batch(tokenizer))
    response_logprobs(model, q, qm, r, rm, 0.7)
    forward_response(model, None, q, qm, r, rm, 0.7, CPU)
    assert calls == {"chunked": 3, "head": 0}
    forward_response(model, None, q, qm, r, rm, 0.7, CPU, with_entropy=True)  # the entropy metric too
    assert calls == {"chunked": 4, "head": 0}
    sequence_logprobs(model, *pairs_batch(tokenizer), chunk=0)
    assert calls == {"chunked": 4, "head": 1}
    monkeypatch.setattr(fwd, "LOGPROB_CHUNK", 0)  # the module default selects the path too
    response_logprobs(model, q, qm, r, rm, 0.7)
    assert calls == {"chunked": 4, "head": 2}


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_entropy_equals_the_full_paths_and_changes_no_gradient(tokenizer, sharp_policy, chunk, monkeypatch):
    """forward_response(with_entropy=True) on the chunked path: the same log-probs and entropy as the full path
    (chunk = 0), the same gradients as without entropy (the metric has no grad), and the backward's recompute of
    each chunk does not compute the entropy again."""
    import rlhfkit.ops.logprobs as ops_logprobs

    model = sharp_policy("gpt2")
    params = [p for p in model.parameters() if p.requires_grad]
    q, qm, r, rm = response_batch(tokenizer)
    mask = rm.bool()
    with torch.no_grad():
        full_lp, _, full_ent = forward_response(model, None, q, qm, r, rm, 0.7, CPU, with_entropy=True, chunk=0)
    calls = {"n": 0}
    real = ops_logprobs._entropy

    def counting(logits):
        calls["n"] += 1
        return real(logits)

    monkeypatch.setattr(ops_logprobs, "_entropy", counting)
    holder = {}

    def with_entropy():
        lp, _, holder["entropy"] = forward_response(model, None, q, qm, r, rm, 0.7, CPU, with_entropy=True,
                                                    chunk=chunk)
        return lp * rm

    lp, grads = value_and_grads(params, with_entropy)
    n_chunks = -(-int(mask.sum()) // chunk)
    assert calls["n"] == n_chunks  # once per chunk in the forward, never in the backward's recompute
    _, plain_grads = value_and_grads(params, lambda: forward_response(model, None, q, qm, r, rm, 0.7, CPU,
                                                                      chunk=chunk)[0] * rm)
    entropy = holder["entropy"]
    assert not entropy.requires_grad
    assert torch.allclose(lp[mask], full_lp[mask], atol=2e-6)
    assert torch.allclose(entropy[mask], full_ent[mask], atol=1e-5)
    assert entropy[mask].std() > 0.1  # not near-constant: a position shifted by one would show
    assert (entropy[~mask] == 0).all()
    for g, h in zip(grads, plain_grads):
        assert torch.equal(g, h)


# ---------------------------------------------------------------- models whose logits are not a plain linear head

def soft_capped_model(tokenizer, cap=1.0):
    """A tiny Gemma 2: logits = cap * tanh(lm_head(h) / cap), a strong cap so that ignoring it shows."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
                          final_logit_softcapping=cap, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # logits well past the cap
    return model


def test_soft_capped_model_falls_back_to_the_full_path(tokenizer):
    model = soft_capped_model(tokenizer)
    assert plain_head(model) is None
    batch = pairs_batch(tokenizer)
    with torch.no_grad():
        got = sequence_logprobs(model, *batch)  # the default: would be chunked for a plain head
        full = sequence_logprobs(model, *batch, chunk=0)
        # what the chunked path would compute, ignoring the cap
        ids, mask, completion_mask = batch
        hidden = model.base_model(input_ids=ids, attention_mask=mask,
                                  position_ids=fwd.position_ids(mask)).last_hidden_state  # (B, T, H)
        keep = completion_mask[:, 1:].bool()
        wrong = torch.zeros(keep.shape).masked_scatter(keep, chunked_head_logprobs(
            hidden[:, :-1][keep], model.lm_head.weight, None, ids[:, 1:][keep])).sum(-1)
    assert torch.equal(got, full)
    assert (wrong - full).abs().max() > 0.1  # the fallback matters


def test_plain_head_detection(tokenizer, sharp_policy):
    """Chunked only where the logits are exactly a plain linear head of the final hidden states."""
    model = sharp_policy("llama")
    assert plain_head(model) is not None
    model.config.final_logit_softcapping = 30.0  # a logit transform in the config: full path, whatever the class
    assert plain_head(model) is None
    del model.config.final_logit_softcapping
    # LoRA on the head itself: the head is no longer the plain weight
    on_head = wrap_lora(sharp_policy("gpt2"), SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["lm_head"]),
                        ".", seed=0)
    assert plain_head(on_head) is None

    class Subclass(type(model)):  # a user's own forward: unknown, so not assumed plain
        pass

    model.__class__ = Subclass
    assert plain_head(model) is None
