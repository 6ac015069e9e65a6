"""Chat templates: prompts rendered with the template and tokenised once (no double BOS), completions end
with the template's end-of-turn token, the sampler stops on EOS or end of turn, no pad token is fine."""

from types import SimpleNamespace

import pytest
import torch

from rlhfkit.core.errors import DataError
from rlhfkit.data.batching import encode_pairs, encode_prompt, encode_prompts, stop_ids, turn_end_id
from rlhfkit.models.sampling import decode_responses, sample


def test_prompt_rendered_once_with_generation_prompt(chat_tokenizer):
    t = chat_tokenizer
    ids = encode_prompt(t, "hello world")
    assert ids.count(t.bos_token_id) == 1 and ids[0] == t.bos_token_id  # the template's BOS, not a second one
    assert t.decode(ids) == "<s><|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    conversation = [{"role": "system", "content": "the fox"}, {"role": "user", "content": "hello"}]
    assert t.decode(encode_prompt(t, conversation)).startswith("<s><|im_start|>system\nthe fox<|im_end|>\n")
    assert encode_prompt(t, "hello world") == encode_prompt(t, [{"role": "user", "content": "hello world"}])


def test_completion_ends_with_end_of_turn(chat_tokenizer, tokenizer):
    t = chat_tokenizer
    im_end = t.convert_tokens_to_ids("<|im_end|>")
    assert turn_end_id(t) == im_end and sorted(stop_ids(t)) == sorted({t.eos_token_id, im_end})
    ids, mask, comp = encode_pairs(t, ["hello", "the quick brown fox"], ["world", "jumps"])
    for row in range(2):
        last = int(mask[row].sum()) - 1
        assert ids[row, last] == im_end and comp[row, last] == 1  # the loss and the RM's score include it
        assert t.decode(ids[row][comp[row].bool()]) == ["world", "jumps"][row] + "<|im_end|>"
    # without a template: EOS, as before; a conversation prompt is refused clearly
    assert turn_end_id(tokenizer) == tokenizer.eos_token_id
    with pytest.raises(DataError, match="chat template"):
        encode_prompt(tokenizer, [{"role": "user", "content": "1 2"}])


def test_no_pad_token_batches(chat_tokenizer, tmp_path):
    """A tokenizer without a pad token pads with EOS (always masked), raw or loaded from a directory."""
    from rlhfkit.models.load import load_tokenizer

    assert chat_tokenizer.pad_token is None
    chat_tokenizer.save_pretrained(tmp_path)
    for t in (chat_tokenizer, load_tokenizer(tmp_path, "test")):
        q, qm = encode_prompts(t, ["hello", "the quick brown fox"])
        assert qm[0].sum() < qm[1].sum() and qm[0, 0] == 0 and q[0, 0] == t.eos_token_id  # left padded with EOS
        ids, mask, comp = encode_pairs(t, ["hello", "the quick brown fox"], ["world", "jumps"])
        assert mask[0, -1] == 0 and ids[0, -1] == t.eos_token_id


class _Scripted:
    """A stand-in causal LM that emits a fixed token sequence per row (all mass on it), for the sampler."""

    def __init__(self, script, vocab):
        self.script, self.vocab, self.t = script, vocab, 0

    def __call__(self, input_ids, attention_mask, position_ids, use_cache, past_key_values=None, cache=None):
        # the KV cache under either name (transformers 5.2x calls it `cache`, older releases `past_key_values`)
        past = cache if cache is not None else past_key_values
        step = 0 if past is None else past + 1
        logits = torch.full((len(self.script), input_ids.shape[1], self.vocab), -1e9)
        for row, seq in enumerate(self.script):
            logits[row, -1, seq[min(step, len(seq) - 1)]] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=step, cache=step)


def test_sampler_stops_on_any_stop_id(chat_tokenizer):
    t = chat_tokenizer
    im_end, eos = t.convert_tokens_to_ids("<|im_end|>"), t.eos_token_id
    a, b = t.convert_tokens_to_ids(t.tokenize("the"))[0], t.convert_tokens_to_ids(t.tokenize("fox"))[0]
    model = _Scripted([[a, im_end, b, b], [a, b, eos, b], [a, b, b, b]], len(t))
    q, qm = torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)
    s = sample(model, q, qm, max_new_tokens=4, eos_token_id=stop_ids(t), pad_token_id=0)
    assert s.ended.tolist() == [True, True, False]
    assert s.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    texts = decode_responses(t, s)
    assert texts[0] == t.decode([a]) and texts[1] == t.decode([a, b])  # the stop token itself is not text


def test_conversation_completion_learns_assistant_turns_only(chat_tokenizer):
    t = chat_tokenizer
    im_end = t.convert_tokens_to_ids("<|im_end|>")
    prompt = [{"role": "user", "content": "hello"}]
    turns = [{"role": "assistant", "content": "world"}, {"role": "user", "content": "the fox"},
             {"role": "assistant", "content": "jumps"}]
    ids, mask, comp = encode_pairs(t, [prompt], [turns])
    assert t.decode(ids[0][comp[0].bool()]) == "world<|im_end|>jumps<|im_end|>"
    assert ids[0, int(mask[0].sum()) - 1] == im_end  # ends where a sampled reply stops, no trailing newline
    assert "<|im_start|>user\nthe fox<|im_end|>" in t.decode(ids[0])  # the user turn is context
    # one assistant message is the same example as its content given as a string
    one = encode_pairs(t, [prompt], [[{"role": "assistant", "content": "world"}]])
    assert all(torch.equal(a, b) for a, b in zip(one, encode_pairs(t, [prompt], ["world"])))
