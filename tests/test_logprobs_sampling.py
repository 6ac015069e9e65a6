"""Response log-probs and the sampler, against a direct oracle: one unpadded sequence at a time through the model.

The tiny models are re-initialised with a larger weight scale: at the default init (std 0.02) the next-token
distributions are almost uniform (logit std ~0.1), where an ignored temperature or a shifted position barely
changes anything and a statistical test has no power. Position ids that ignore left padding are caught by
GPT-2 (learned absolute positions); Llama's rotary embeddings are blind to a shift of a whole row.
"""

import pytest
import torch

from rlhfkit.data.batching import pad_left, pad_right
from rlhfkit.models.forward import response_logits, response_logprobs
from rlhfkit.models.sampling import sample

ARCHS = ["gpt2", "llama"]


@torch.no_grad()
def oracle_logprobs(model, query, response, temperature):
    """(len(response), V) log softmax(logits / T) that predicted each response token, from one forward over the
    unpadded query + response (no mask, default positions 0..n-1); position t predicts token t + 1."""
    ids = torch.tensor([query + response])
    logits = model(input_ids=ids).logits[0] / temperature  # (n, V)
    return torch.log_softmax(logits, dim=-1)[len(query) - 1 : len(query) - 1 + len(response)]


# ---------------------------------------------------------------- response_logits / response_logprobs

# Ragged on both sides: queries left-padded (lengths 6, 2, 9, 1), responses right-padded (lengths 4, 1, 3, 6).
QUERIES = [[1, 5, 6, 7, 8, 4], [1, 4], [1, 9, 9, 14, 5, 6, 7, 8, 4], [1]]
RESPONSES = [[6, 7, 8, 2], [2], [13, 5, 10], [5, 5, 6, 7, 8, 9]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_response_logprobs_match_per_row_oracle(arch, temperature, tokenizer, sharp_policy):
    model = sharp_policy(arch)
    q, qm = pad_left(QUERIES, tokenizer.pad_token_id)
    r, rm = pad_right(RESPONSES, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = response_logits(model, q, qm, r, rm, temperature)  # (B, Tr, V)
        logprobs = response_logprobs(model, q, qm, r, rm, temperature)  # (B, Tr)
    assert logits.shape == (len(QUERIES), r.shape[1], len(tokenizer))
    for b, (query, response) in enumerate(zip(QUERIES, RESPONSES)):
        n = len(response)
        expected = oracle_logprobs(model, query, response, temperature)  # (n, V)
        got = torch.log_softmax(logits[b, :n], dim=-1)
        assert torch.allclose(got, expected, atol=1e-5), f"row {b}: next-token distributions differ"
        expected_lp = expected.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(logprobs[b, :n], expected_lp, atol=1e-5), f"row {b}"
        assert (logprobs[b, n:] == 0).all()


# ---------------------------------------------------------------- the sampler draws from exp(logprobs)

N_SAMPLES = 10_000
PROMPT = [1, 5, 6, 7, 8, 4]  # "<bos> 0 1 2 3 ="


def total_variation(counts: torch.Tensor, p: torch.Tensor):
    """TV(empirical, p) and a bound it stays under when the draws come from p.

    Each empirical frequency has std sigma_i = sqrt(p_i (1 - p_i) / n), and E|p_hat_i - p_i| ~ 0.8 sigma_i, so
    E[TV] ~ 0.4 sum_i sigma_i. The bound 2 sum_i sigma_i is 5 times that; passing it by chance would take many
    coordinates 2.5 sigma off at once (TV's own std is a fraction of its mean)."""
    n = counts.sum().item()
    p_hat = counts.double() / n
    tv = 0.5 * (p_hat - p.double()).abs().sum().item()
    bound = 2.0 * torch.sqrt(p.double() * (1 - p.double()) / n).sum().item()
    return tv, bound


@pytest.mark.parametrize("arch,temperature", [("gpt2", 0.6), ("llama", 1.5)])  # ~1 s each: 10k rows
def test_sampler_draws_from_tempered_distribution(arch, temperature, tokenizer, sharp_policy):
    model = sharp_policy(arch)
    V = len(tokenizer)
    queries = torch.tensor([PROMPT] * N_SAMPLES)
    s = sample(model, queries, torch.ones_like(queries), max_new_tokens=2, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, temperature=temperature, generator=torch.Generator().manual_seed(0))

    # First token: frequencies vs exp(oracle log-probs at temperature T).
    p1 = oracle_logprobs(model, PROMPT, [0], temperature)[0].exp()  # (V,) the dummy token 0 is not read
    tv, bound = total_variation(torch.bincount(s.responses[:, 0], minlength=V), p1)
    assert tv < bound, f"first token: TV {tv:.4f} >= {bound:.4f}"
    # Power: draws at temperature 1 would sit about TV(p_T, p_1) - E[TV] > bound away from p_T, so a sampler
    # that ignores the temperature fails the assertion above.
    p1_untempered = oracle_logprobs(model, PROMPT, [0], 1.0)[0].exp()
    assert 0.5 * (p1 - p1_untempered).abs().sum().item() > 2 * bound

    # Second token given the most frequent non-EOS first token (exercises the KV-cache step and its position).
    first_counts = torch.bincount(s.responses[:, 0], minlength=V)
    first_counts[tokenizer.eos_token_id] = 0
    a = int(first_counts.argmax())
    rows = s.responses[:, 0] == a
    assert rows.sum() > 1000
    p2 = oracle_logprobs(model, PROMPT + [a], [0], temperature)[0].exp()
    tv2, bound2 = total_variation(torch.bincount(s.responses[rows, 1], minlength=V), p2)
    assert tv2 < bound2, f"second token after {a}: TV {tv2:.4f} >= {bound2:.4f}"


def sample_and_logits(model, tokenizer, queries, mask):
    """sample() of 12 new tokens at a fixed seed, and the logits of each of the model's forwards in it (the
    prompt's, then one a step)."""
    seen = []
    hook = model.register_forward_hook(lambda m, args, out: seen.append(out.logits.clone()))
    try:
        s = sample(model, queries, mask, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, temperature=1.0, generator=torch.Generator().manual_seed(3))
    finally:
        hook.remove()
    return s, seen


@pytest.mark.parametrize("arch", ARCHS)
def test_the_preallocated_kv_cache_changes_no_number(arch, tokenizer, sharp_policy, monkeypatch):
    """sample() writes keys and values into buffers sized for the whole sample (no per-step allocation); every
    step's logits are bit-identical to transformers' DynamicCache (a concatenation each step), on ragged
    left-padded prompts, so every sample is too. Fails on a cache that feeds a wrong column, skips one, or
    attends over unfilled buffer positions."""
    import rlhfkit.models.sampling as sampling

    model = sharp_policy(arch)
    queries, mask = pad_left(QUERIES, tokenizer.pad_token_id)
    logits = {}

    def run(name):
        s, logits[name] = sample_and_logits(model, tokenizer, queries, mask)
        return s

    assert type(sampling.preallocated_cache(model, 30).layers[0]).__name__ == "PreallocatedLayer"
    with pytest.raises(RuntimeError, match="overflowed"):  # sized by sample(); never grown silently
        model(input_ids=queries, attention_mask=mask, use_cache=True,
              **{sampling.CACHE: sampling.preallocated_cache(model, queries.shape[1] - 1)})
    fast = run("preallocated")
    monkeypatch.setattr(sampling, "preallocated_cache", lambda model, capacity: None)  # the model's own cache
    slow = run("dynamic")
    assert len(logits["preallocated"]) == len(logits["dynamic"]) > 5
    for a, b in zip(logits["preallocated"], logits["dynamic"]):
        assert torch.equal(a, b)
    assert torch.equal(fast.responses, slow.responses) and torch.equal(fast.response_mask, slow.response_mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_prompts_forward_keeps_only_its_last_logits(arch, tokenizer, sharp_policy, tmp_path, monkeypatch):
    """The prompt's forward computes logits at its last position only ((B, 1, V), not (B, Tq, V)), also through a
    LoRA model; the samples are those of a prefill with every position's logits, its last column the same."""
    import rlhfkit.models.sampling as sampling
    from rlhfkit.models.lora import wrap_lora
    from rlhfkit.pipeline.config import LoRAConfig

    queries, mask = pad_left(QUERIES, tokenizer.pad_token_id)
    model = sharp_policy(arch)
    lora = wrap_lora(sharp_policy(arch), LoRAConfig(r=4), tmp_path, 0)
    assert sampling.last_logits_only(model) == sampling.last_logits_only(lora) == {"logits_to_keep": 1}
    assert sample_and_logits(lora, tokenizer, queries, mask)[1][0].shape == (len(QUERIES), 1, model.config.vocab_size)
    kept, kept_logits = sample_and_logits(model, tokenizer, queries, mask)
    assert kept_logits[0].shape == (len(QUERIES), 1, model.config.vocab_size)
    monkeypatch.setattr(sampling, "last_logits_only", lambda model: {})
    full, full_logits = sample_and_logits(model, tokenizer, queries, mask)
    assert full_logits[0].shape[1] == queries.shape[1]
    assert torch.allclose(kept_logits[0][:, -1], full_logits[0][:, -1], rtol=0, atol=1e-5)
    assert torch.equal(kept.responses, full.responses) and torch.equal(kept.response_mask, full.response_mask)


def test_models_with_sliding_windows_keep_their_own_cache(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    from rlhfkit.models.sampling import preallocated_cache

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    assert preallocated_cache(MistralForCausalLM(config), 16) is None
    assert preallocated_cache(torch.nn.Linear(2, 2), 16) is None  # not a transformers model
