"""Hugging Face models in every role, the KV-cache sampler, and model-directory errors."""

import json

import pytest
import torch

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.data.batching import encode_pairs, encode_prompts
from rlhfkit.models.forward import causal_logits, last_token_index, response_logprobs, sequence_scores, token_scalars
from rlhfkit.models.load import check_model_dir, load_policy, load_scalar_model, load_tokenizer
from rlhfkit.models.sampling import SamplingParams, decode_responses, sample, sample_completions
from rlhfkit.ops.sampling import draw_tokens

CPU = torch.device("cpu")
PROMPTS = ["1 2 3 4 =", "5 =", "9 9 0 1 2 3 =", "7 7 ="]  # different lengths exercise left padding


def naive_sample(model, tokenizer, prompt, n_new, generator, draw="multinomial"):
    """Recompute the whole prefix at every step (no cache, no padding): the oracle for the sampler."""
    ids = tokenizer(prompt)["input_ids"]
    out = []
    for _ in range(n_new):
        x = torch.tensor([ids + out])
        logits = model(input_ids=x).logits[0, -1]
        tok = draw_tokens(torch.softmax(logits.float(), -1).unsqueeze(0), generator, draw).item()
        out.append(tok)
        if tok == tokenizer.eos_token_id:
            break
    return out


def test_load_roundtrip_and_kv_cache_sampler_matches_naive(tiny_policy_dir):
    tok = load_tokenizer(tiny_policy_dir)
    model = load_policy(tiny_policy_dir, CPU).eval()
    for i, prompt in enumerate(PROMPTS):
        q, qm = encode_prompts(tok, [prompt])
        s = sample(model, q, qm, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   generator=torch.Generator().manual_seed(i))
        got = s.responses[0][s.response_mask[0].bool()].tolist()
        assert got == naive_sample(model, tok, prompt, 6, torch.Generator().manual_seed(i))  # torch.multinomial
        # the cheaper draw ([sampling] draw = 'inverse_cdf') through the KV-cache sampler, against the same oracle
        s = sample(model, q, qm, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   generator=torch.Generator().manual_seed(i), sampling=SamplingParams(draw="inverse_cdf"))
        got = s.responses[0][s.response_mask[0].bool()].tolist()
        assert got == naive_sample(model, tok, prompt, 6, torch.Generator().manual_seed(i), "inverse_cdf")


def test_left_padding_does_not_change_logprobs(tiny_policy_dir):
    tok = load_tokenizer(tiny_policy_dir)
    model = load_policy(tiny_policy_dir, CPU).eval()
    q, qm = encode_prompts(tok, PROMPTS)
    s = sample(model, q, qm, max_new_tokens=5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = response_logprobs(model, q, qm, s.responses, s.response_mask)
        for i, prompt in enumerate(PROMPTS):
            q1, qm1 = encode_prompts(tok, [prompt])
            n = int(s.response_mask[i].sum())
            single = response_logprobs(model, q1, qm1, s.responses[i : i + 1, :n], s.response_mask[i : i + 1, :n])
            assert torch.allclose(batched[i, :n], single[0], atol=1e-5)
            assert (batched[i, n:] == 0).all()


def test_response_mask_stops_after_eos(tokenizer):
    class EOSAtSecond(torch.nn.Module):
        """A fake LM that emits token 5 then EOS for row 0 and never EOS for row 1."""

        def __call__(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, cache=None):
            B, T = input_ids.shape
            V = len(tokenizer)
            step = attention_mask.shape[1]
            logits = torch.full((B, T, V), -1e9)
            logits[0, -1, tokenizer.eos_token_id if step > 6 else 5] = 0
            logits[1, -1, 6] = 0
            return type("Out", (), {"logits": logits, "past_key_values": None, "cache": None})()

    q, qm = encode_prompts(tokenizer, ["1 2 3 4 =", "1 2 3 4 ="])
    s = sample(EOSAtSecond(), q, qm, max_new_tokens=4, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert s.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert s.ended.tolist() == [True, False]
    assert s.responses[0, 2:].tolist() == [tokenizer.pad_token_id] * 2
    assert decode_responses(tokenizer, s) == ["0", "1 1 1 1"]  # token 5 is "0", 6 is "1"; EOS and padding dropped


def test_reward_model_scores_last_real_token(tiny_policy_dir):
    tok = load_tokenizer(tiny_policy_dir)
    torch.manual_seed(0)
    rm = load_scalar_model(tiny_policy_dir, CPU, "reward").eval()
    ids, mask, _ = encode_pairs(tok, ["1 2 3 4 =", "5 ="], ["2 3", "6 7 8 9"])
    with torch.no_grad():
        scores = sequence_scores(rm, ids, mask)
        per_token = token_scalars(rm, ids, mask)
        for i in range(2):
            n = int(mask[i].sum())
            alone = token_scalars(rm, ids[i : i + 1, :n], mask[i : i + 1, :n])[0, -1]
            assert scores[i].item() == pytest.approx(alone.item(), abs=1e-5)
            assert scores[i] == per_token[i, n - 1]
    assert last_token_index(torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])).tolist() == [2, 3]


def test_sample_completions_from_directory(tiny_policy_dir):
    out = sample_completions(tiny_policy_dir, ["1 2 3 4 =", "5 6 7 8 ="], 3, seed=1, max_new_tokens=5, device="cpu")
    assert len(out) == 2 and all(len(c) == 3 for c in out)
    assert out == sample_completions(tiny_policy_dir, ["1 2 3 4 =", "5 6 7 8 ="], 3, seed=1, max_new_tokens=5, device="cpu")


def test_model_directory_errors(tmp_path, tiny_policy_dir):
    with pytest.raises(RlhfkitError, match="does not exist"):
        check_model_dir(tmp_path / "missing", "policy.path", causal=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RlhfkitError, match="no config.json"):
        check_model_dir(tmp_path / "empty", "policy.path", causal=True)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(RlhfkitError, match="not a causal language model"):
        load_policy(bert, CPU)
    assert check_model_dir(tiny_policy_dir, "policy.path", causal=True) == tiny_policy_dir


def test_causal_logits_shape(tiny_policy_dir):
    tok = load_tokenizer(tiny_policy_dir)
    model = load_policy(tiny_policy_dir, CPU)
    ids, mask, _ = encode_pairs(tok, ["1 ="], ["2"])
    assert causal_logits(model, ids, mask).shape == (1, ids.shape[1], len(tok))


def test_model_directory_without_weights(tmp_path, tiny_policy_dir):
    """config.json alone is not a model: say which weight files were looked for, before anything loads."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_policy_dir / "config.json").read_text())
    with pytest.raises(RlhfkitError) as e:
        load_policy(bare, CPU, "policy.path")
    message = str(e.value)
    assert message.startswith(f"policy.path: {bare} has a config.json but no weights")
    assert all(name in message for name in ("model.safetensors", "pytorch_model.bin", "*.index.json"))
    with pytest.raises(RlhfkitError, match="no weights"):
        load_scalar_model(bare, CPU, "reward.init")
    (bare / "model.safetensors.index.json").write_text("{}")  # a sharded checkpoint's index counts
    assert check_model_dir(bare, "policy.path", causal=True) == bare


def test_directory_without_tokenizer_files(tmp_path, tiny_policy_dir):
    """transformers builds an empty tokenizer from config.json alone; training on it would learn nothing."""
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for f in tiny_policy_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (no_tok / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RlhfkitError) as e:
        load_tokenizer(no_tok, "policy.path")
    assert str(e.value).startswith(f"policy.path: {no_tok} has no tokenizer files")
    assert "tokenizer.json" in str(e.value) and "save_pretrained" in str(e.value)
    assert len(load_tokenizer(tiny_policy_dir)) > 10
