"""The AI judge (rlhfkit/models/judge.py): templates as data, the judge's input, P(first better) from the two
labels' logits, position swap, chain of thought and the disk cache.

Oracles: the judge's probability against a softmax over the two label logits of a plain, unpadded full forward
(catches padding side, attention mask, position ids, the wrong position or labels, a softmax over the whole
vocabulary); batched against one at a time; a greedy rationale against an argmax loop; the swap formula against
fake judges whose answers are known. The tiny judges have every weight redrawn at std 0.3, so the label
probabilities spread over (0, 1) and a shifted position changes them by far more than rounding.
"""

import math
import os

import pytest
import torch

from rlhfkit.core.errors import ConfigError, RlhfkitError
from rlhfkit.models.judge import (
    DEFAULT_TEMPLATE,
    JudgeCache,
    Judgement,
    LocalJudge,
    alignment,
    answer_token_ids,
    encode_text,
    judge_pairs,
    load_template,
    model_identity,
    position_bias,
    render,
    same_position_rate,
    swap_average,
    template_from_dict,
)
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy, load_tokenizer
from rlhfkit.models.runtime import Runtime

TEMPLATE = '''
preamble = "Pick the better reply."
question = "Q: {prompt}\\nA1: {reply_1}\\nA2: {reply_2}\\nBetter one?"
labels = ["1", "2"]
cot_instruction = "Think first."
cot_answer_prefix = "\\nSo "

[[exemplars]]
prompt = "hello"
reply_1 = "hello world"
reply_2 = "dog"
answer = "1"
rationale = "it greets"
'''

# Pairs of different lengths, so that a batch is padded and a padding bug shows.
PROMPTS = ["the quick brown fox", "two plus two", "hello", "what is the lazy dog doing over there now", "four", "hi"]
REPLIES_A = ["jumps", "four .", "hello world , hello user", "it sleeps", "two plus two is four", "hello"]
REPLIES_B = ["the lazy dog jumps over the fox", "five", "dog", "over the dog", "no", "the quick brown fox says hi"]
ITEMS = list(zip(PROMPTS, REPLIES_A, REPLIES_B))


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "judge.toml"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture
def template(template_file):
    return load_template(template_file)


def _sharp_judge_dir(path, tokenizer, arch, seed=1):
    """A tiny random causal LM with every weight matrix redrawn at std 0.3, saved with its tokenizer."""
    model = build_tiny_policy(TinyModelSpec(arch, 2, 32, 4, 512), tokenizer, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def judge_dirs(tmp_path_factory, chat_tokenizer):
    """{"llama", "gpt2"}: chat-template judges; "plain": the llama weights with a tokenizer without a chat template."""
    root = tmp_path_factory.mktemp("judges")
    dirs = {arch: _sharp_judge_dir(root / arch, chat_tokenizer, arch) for arch in ("llama", "gpt2")}
    plain = load_tokenizer(dirs["llama"])
    plain.chat_template = None
    dirs["plain"] = _sharp_judge_dir(root / "plain", plain, "llama")
    return dirs


def _count_forwards(model) -> list[int]:
    n = [0]
    model.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


def _manual_prob(judge, text: str, labels=("1", "2")) -> float:
    """Softmax over the two labels' logits at the last position of ONE unpadded full forward; the label ids are
    those that continue `text` by one token."""
    ids = encode_text(judge.tokenizer, text)
    label_ids = []
    for label in labels:
        longer = encode_text(judge.tokenizer, text + label)
        assert longer[:-1] == ids
        label_ids.append(longer[-1])
    with torch.no_grad():
        logits = judge.model(input_ids=torch.tensor([ids])).logits[0, -1]  # (V,)
    return torch.softmax(logits[label_ids].float(), dim=-1)[0].item()


# ----------------------------------------------------------------------------------------------------
# Templates


def test_the_default_template_loads_and_its_labels_are_single_tokens(chat_tokenizer):
    t = load_template()
    assert t.source == str(DEFAULT_TEMPLATE) and t.labels == ("1", "2")
    assert [e.answer for e in t.exemplars] == ["1", "2"] and all(e.rationale for e in t.exemplars)
    assert t.cot_instruction and t.preamble
    text = render(t, chat_tokenizer, "my house is too hot .", "open the windows .", "shut up .", few_shot=True)
    assert answer_token_ids(chat_tokenizer, t, text, "answer_prefix", "tiny")[0] == 0
    cot = render(t, chat_tokenizer, "p", "a", "b", few_shot=True, cot=True) + "reasons" + t.cot_answer_prefix
    cut, ids = answer_token_ids(chat_tokenizer, t, cot, "cot_answer_prefix", "tiny")
    assert cut == 1 and chat_tokenizer.convert_ids_to_tokens(ids) == ["Ġ1", "Ġ2"]  # "Preferred reply: " then " 1"


Q = 'question = "{prompt} {reply_1} {reply_2}"\n'


@pytest.mark.parametrize("text, field", [
    ('preamble = "x"\n', "question"),  # missing
    (Q + 'preambel = "x"\n', "preambel"),  # unknown field (a typo)
    (Q + 'labels = "12"\n', "labels"),  # wrong type
    (Q + "preamble = 3\n", "preamble"),  # wrong type
    (Q + 'labels = ["1", "2", "3"]\n', "labels"),  # three labels
    (Q + 'labels = ["1", "1"]\n', "labels"),  # not distinct
    ('question = "{prompt} {reply_1}"\n', "{reply_2}"),  # a placeholder missing
    ('question = "{prompt} {reply_1} {reply_2} {reply_3}"\n', "{reply_3}"),  # an unknown placeholder
    ('question = "{prompt} {reply_1} {reply_2} {"\n', "question"),  # a stray brace
    (Q + '[[exemplars]]\nprompt = "p"\nreply_1 = "a"\nreply_2 = "b"\nanswer = "3"\n', "exemplars[1].answer"),
    (Q + '[[exemplars]]\nprompt = "p"\n', "exemplars[1].reply_1"),  # a missing exemplar field
    (Q + '[[exemplars]]\nprompt = "p"\nreply_1 = "a"\nreply_2 = "b"\nanswr = "1"\n', "exemplars[1].answr"),
    (Q + 'exemplars = ["p"]\n', "exemplars"),  # not tables
    ("question = \n", "TOML"),  # not TOML at all
])
def test_a_bad_template_is_a_config_error_naming_the_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_template(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_a_missing_template_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_template(tmp_path / "nope.toml")


def test_a_template_hash_changes_with_its_content_not_its_source(template, template_file, tmp_path):
    other = tmp_path / "copy.toml"
    other.write_text(TEMPLATE)
    assert load_template(other).content_hash == template.content_hash
    other.write_text(TEMPLATE.replace("Pick the better reply.", "Pick the best reply."))
    assert load_template(other).content_hash != template.content_hash
    other.write_text(TEMPLATE.replace('answer = "1"', 'answer = "2"'))  # exemplars count too
    assert load_template(other).content_hash != template.content_hash


# ----------------------------------------------------------------------------------------------------
# The judge's input


def test_render_through_a_chat_template(template, chat_tokenizer):
    text = render(template, chat_tokenizer, "two plus two", "four", "five", few_shot=True)
    assert text.startswith("<s><|im_start|>system\nPick the better reply.<|im_end|>\n")
    assert "A1: hello world\nA2: dog\nBetter one?<|im_end|>\n<|im_start|>assistant\n1<|im_end|>" in text  # exemplar
    assert text.endswith("<|im_start|>user\nQ: two plus two\nA1: four\nA2: five\nBetter one?<|im_end|>\n"
                         "<|im_start|>assistant\n")  # the label is the next token
    zero = render(template, chat_tokenizer, "two plus two", "four", "five", few_shot=False)
    assert "hello world" not in zero and zero.endswith(text[-60:])
    cot = render(template, chat_tokenizer, "two plus two", "four", "five", few_shot=True, cot=True)
    assert "Better one?\n\nThink first.<|im_end|>\n<|im_start|>assistant\n" in cot and cot.endswith("assistant\n")
    assert "assistant\nit greets\nSo 1<|im_end|>" in cot  # the exemplar's rationale, then its answer


def test_render_as_plain_text(template, judge_dirs):
    tok = load_tokenizer(judge_dirs["plain"])
    text = render(template, tok, "two plus two", "four", "five", few_shot=True)
    assert text == ("Pick the better reply.\n\nQ: hello\nA1: hello world\nA2: dog\nBetter one?\n1\n\n"
                    "Q: two plus two\nA1: four\nA2: five\nBetter one?\n")
    assert encode_text(tok, text)[0] == tok.bos_token_id  # plain text gets the tokenizer's BOS


def test_a_chat_template_without_a_system_role_gets_the_preamble_in_the_first_user_turn(template, chat_tokenizer):
    import copy

    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    text = render(template, tok, "two plus two", "four", "five", few_shot=False)
    assert text == "[user] Pick the better reply.\n\nQ: two plus two\nA1: four\nA2: five\nBetter one?\n[assistant] "


# ----------------------------------------------------------------------------------------------------
# The local judge: probabilities


@pytest.mark.parametrize("arch", ["llama", "gpt2", "plain"])
def test_batched_probabilities_equal_a_manual_softmax_and_one_at_a_time(judge_dirs, template, arch):
    judge = LocalJudge(judge_dirs[arch], template, batch_size=8)
    texts = [render(template, judge.tokenizer, *item, few_shot=True) for item in ITEMS]
    assert len({len(encode_text(judge.tokenizer, t)) for t in texts}) > 3  # the batch is really padded
    got = [p for p, _ in judge.first_probs(ITEMS, few_shot=True)]
    want = [_manual_prob(judge, t) for t in texts]
    assert got == pytest.approx(want, abs=1e-5)
    assert max(want) - min(want) > 0.2  # the oracle is not a row of 0.5s
    one = LocalJudge(judge_dirs[arch], template, batch_size=1)
    assert [p for p, _ in one.first_probs(ITEMS, few_shot=True)] == pytest.approx(got, abs=1e-5)
    assert judge.stats.calls == 1 and judge.stats.judged == len(ITEMS) and one.stats.calls == len(ITEMS)


def test_only_the_last_position_is_turned_into_logits(judge_dirs, template):
    judge = LocalJudge(judge_dirs["llama"], template, batch_size=8)
    shapes = []
    judge.model.get_output_embeddings().register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    got = [p for p, _ in judge.first_probs(ITEMS)]
    assert shapes == [(len(ITEMS), 1, judge.model.config.vocab_size)]
    judge.keep_one = False  # a model without logits_to_keep: the last hidden state through the LM head
    shapes.clear()
    assert [p for p, _ in judge.first_probs(ITEMS)] == pytest.approx(got, abs=1e-5)
    assert shapes == [(len(ITEMS), judge.model.config.vocab_size)]


def test_trailing_spaces_of_the_answer_prefix_go_into_the_label(judge_dirs, tmp_path, chat_tokenizer):
    assert chat_tokenizer.convert_ids_to_tokens(chat_tokenizer(" 1", add_special_tokens=False)["input_ids"]) == ["Ġ1"]
    path = tmp_path / "spaced.toml"
    path.write_text('answer_prefix = "Answer: "\n' + TEMPLATE)  # "Answer: 1" is "Answer", ":", " 1" here
    judge = LocalJudge(judge_dirs["llama"], load_template(path))
    assert judge._answer(False)[0] == 1
    text = render(judge.template, judge.tokenizer, *ITEMS[0], few_shot=True)
    assert text.endswith("assistant\nAnswer: ")
    (p, _), = judge.first_probs(ITEMS[:1])
    assert p == pytest.approx(_manual_prob(judge, text[:-1], labels=(" 1", " 2")), abs=1e-5)


def test_autocast_dtype_is_used(judge_dirs, template):
    fp32 = LocalJudge(judge_dirs["llama"], template)
    bf16 = LocalJudge(judge_dirs["llama"], template, Runtime(torch.device("cpu"), torch.bfloat16))
    dtypes = []
    bf16.model.get_output_embeddings().register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    low = [p for p, _ in bf16.first_probs(ITEMS)]
    assert dtypes == [torch.bfloat16]
    assert low == pytest.approx([p for p, _ in fp32.first_probs(ITEMS)], abs=0.1)
    assert fp32.options(False) != bf16.options(False)  # so the cache keeps them apart


def test_labels_that_are_not_single_tokens_are_refused(judge_dirs, tmp_path):
    path = tmp_path / "words.toml"
    path.write_text(TEMPLATE.replace('labels = ["1", "2"]', 'labels = ["first", "second"]').replace(
        'answer = "1"', 'answer = "first"'))
    with pytest.raises(ConfigError) as e:
        LocalJudge(judge_dirs["llama"], load_template(path))
    assert str(path) in str(e.value) and "labels" in str(e.value) and "single tokens" in str(e.value)


def test_labels_that_are_the_same_token_are_refused(tokenizer):
    """The digits task's word-level tokenizer reads every English word as <unk>: "yes" and "no" are one token
    each, the same one, and the judge's two probabilities would be equal whatever the replies."""
    t = template_from_dict({"question": "{prompt} {reply_1} {reply_2}", "labels": ["yes", "no"]}, "words.toml")
    text = render(t, tokenizer, "1 2", "3", "4", few_shot=False)
    with pytest.raises(ConfigError, match="words.toml: labels .* distinct single tokens"):
        answer_token_ids(tokenizer, t, text, "answer_prefix", "digits")


def test_an_unknown_model_directory_is_refused(tmp_path, template):
    with pytest.raises(RlhfkitError, match="does not exist"):
        LocalJudge(tmp_path / "no-such-judge", template)


def test_an_input_longer_than_the_judge_context_is_refused(judge_dirs, template):
    judge = LocalJudge(judge_dirs["gpt2"], template)  # 512 learned positions
    with pytest.raises(RlhfkitError, match="512 positions"):
        judge.first_probs([("hello", "dog " * 600, "hi")])


def test_chain_of_thought_needs_an_instruction(judge_dirs, tmp_path):
    path = tmp_path / "no-cot.toml"
    path.write_text(TEMPLATE.replace('cot_instruction = "Think first."', ""))
    judge = LocalJudge(judge_dirs["llama"], load_template(path))
    with pytest.raises(ConfigError, match="cot_instruction"):
        judge.first_probs(ITEMS[:1], cot=True)


def test_chain_of_thought_is_greedy_and_reads_the_answer_after_the_rationale(judge_dirs, template):
    judge = LocalJudge(judge_dirs["llama"], template, batch_size=2, cot_max_tokens=6)
    out = judge.first_probs(ITEMS[:3], cot=True)
    stops = {judge.tokenizer.eos_token_id, judge.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for item, (p, rationale) in zip(ITEMS[:3], out):
        text = render(template, judge.tokenizer, *item, few_shot=True, cot=True)
        ids = encode_text(judge.tokenizer, text)
        greedy = []
        with torch.no_grad():
            for _ in range(6):  # the argmax loop, one full forward per token
                nxt = int(judge.model(input_ids=torch.tensor([ids + greedy])).logits[0, -1].argmax())
                if nxt in stops:
                    break
                greedy.append(nxt)
        assert rationale == judge.tokenizer.decode(greedy, skip_special_tokens=False)
        # "\nSo " ends with a space that " 1" takes (deviation 3): the input ends at "\nSo"
        assert p == pytest.approx(_manual_prob(judge, text + rationale.rstrip() + "\nSo", (" 1", " 2")), abs=1e-5)
    again = LocalJudge(judge_dirs["llama"], template, batch_size=3, cot_max_tokens=6).first_probs(ITEMS[:3], cot=True)
    assert [p for p, _ in again] == pytest.approx([p for p, _ in out]) and [r for _, r in again] == [r for _, r in out]


def test_self_consistency_averages_the_answer_over_sampled_rationales(judge_dirs, template):
    """cot_samples = 3: three rationales sampled at cot_temperature (draws seeded by the input's cache key), the
    answer read after each, averaged: equal to a manual average over those rationales, whatever the batch."""
    judge = LocalJudge(judge_dirs["llama"], template, batch_size=2, cot_max_tokens=6, cot_samples=3,
                       cot_temperature=1.5)
    out = judge.first_probs(ITEMS[:3], cot=True)
    for item, (p, joined) in zip(ITEMS[:3], out):
        rationales = joined.split("\n~~~\n")
        assert len(rationales) == 3 and len(set(rationales)) > 1  # sampled, not greedy
        text = render(template, judge.tokenizer, *item, few_shot=True, cot=True)
        manual = [_manual_prob(judge, text + r.rstrip() + "\nSo", (" 1", " 2")) for r in rationales]
        assert p == pytest.approx(sum(manual) / 3, abs=1e-5)
    alone = LocalJudge(judge_dirs["llama"], template, cot_max_tokens=6, cot_samples=3, cot_temperature=1.5)
    assert alone.first_probs(ITEMS[1:2], cot=True) == [out[1]]  # the same draws outside the batch
    greedy = LocalJudge(judge_dirs["llama"], template, cot_max_tokens=6)
    assert greedy.options(True) != judge.options(True) and greedy.options(False) == judge.options(False)
    with pytest.raises(ConfigError, match="cot_samples"):
        LocalJudge(judge_dirs["llama"], template, cot_samples=0)


# ----------------------------------------------------------------------------------------------------
# Position swap and what the judgements say


def test_swap_average():
    assert swap_average(0.75, 0.75) == 0.5  # the same slot preferred in both orders: no preference left
    assert swap_average(0.9, 0.2) == pytest.approx(0.85)  # (0.9 + 0.8) / 2
    assert swap_average(1.0, 0.0) == 1.0 and swap_average(0.0, 1.0) == 0.0


class FirstSlotJudge:
    """Always prefers the reply shown first, whatever it is."""

    def __init__(self):
        self.items = []

    def first_probs(self, items, *, few_shot=True, cot=False):
        self.items.append(list(items))
        return [(0.75, "") for _ in items]


class LongerJudge:
    """Order-independent: P(first better) = sigmoid(len(first) - len(second))."""

    def first_probs(self, items, *, few_shot=True, cot=False):
        return [(1 / (1 + math.exp(len(r2) - len(r1))), "") for _, r1, r2 in items]


def test_a_judge_that_always_picks_the_first_slot_says_nothing_after_swap():
    judge = FirstSlotJudge()
    out = judge_pairs(judge, PROMPTS, REPLIES_A, REPLIES_B, swap=True)
    assert [j.p for j in out] == [0.5] * len(PROMPTS)
    assert all(j.p_ab == 0.75 and j.p_ba == 0.75 for j in out)
    assert judge.items == [ITEMS + list(zip(PROMPTS, REPLIES_B, REPLIES_A))]  # both orders, one call
    assert position_bias(out) == 1.0 and same_position_rate(out) == 1.0
    plain = judge_pairs(FirstSlotJudge(), PROMPTS, REPLIES_A, REPLIES_B, swap=False)
    assert [j.p for j in plain] == [0.75] * len(PROMPTS) and all(j.p_ba is None for j in plain)
    assert position_bias(plain) == 1.0
    with pytest.raises(ValueError, match="swap"):
        same_position_rate(plain)


def test_an_order_independent_judge_is_unchanged_by_swap():
    out = judge_pairs(LongerJudge(), PROMPTS, REPLIES_A, REPLIES_B, swap=True)
    assert [j.p for j in out] == pytest.approx([j.p_ab for j in out], abs=1e-12)
    assert position_bias(out) == 0.5 and same_position_rate(out) == 0.0
    longer = [len(a) > len(b) for a, b in zip(REPLIES_A, REPLIES_B)]
    assert alignment(out, longer) == 1.0 and alignment(out, [not x for x in longer]) == 0.0


def test_position_bias_and_alignment_count_a_tie_half():
    out = [Judgement(p=0.7, p_ab=0.9, p_ba=0.5), Judgement(p=0.5, p_ab=0.2, p_ba=0.2)]
    assert position_bias(out) == (1 + 0.5 + 0 + 0) / 4
    assert same_position_rate(out) == 0.5  # the second prefers slot 2 in both orders
    assert alignment(out, [True, True]) == (1 + 0.5) / 2 and alignment(out, [False, True]) == (0 + 0.5) / 2


def test_the_local_judge_swaps_and_averages(judge_dirs, template):
    judge = LocalJudge(judge_dirs["llama"], template, batch_size=4)
    out = judge.judge(PROMPTS, REPLIES_A, REPLIES_B, swap=True, few_shot=False)
    ab = [p for p, _ in judge.first_probs(ITEMS, few_shot=False)]
    ba = [p for p, _ in judge.first_probs(list(zip(PROMPTS, REPLIES_B, REPLIES_A)), few_shot=False)]
    assert [j.p_ab for j in out] == pytest.approx(ab) and [j.p_ba for j in out] == pytest.approx(ba)
    assert [j.p for j in out] == pytest.approx([(x + 1 - y) / 2 for x, y in zip(ab, ba)])


# ----------------------------------------------------------------------------------------------------
# The cache


def test_a_rerun_from_the_cache_makes_no_model_call(judge_dirs, template, tmp_path):
    cache = tmp_path / "judgements.sqlite"
    first = LocalJudge(judge_dirs["llama"], template, batch_size=4, cache=cache)
    calls = _count_forwards(first.model)
    out = first.judge(PROMPTS, REPLIES_A, REPLIES_B, swap=True)
    assert calls[0] == 3 and len(JudgeCache(cache)) == 12  # 6 pairs x 2 orders, 4 a batch
    again = LocalJudge(judge_dirs["llama"], template, batch_size=4, cache=cache)
    calls = _count_forwards(again.model)
    assert again.judge(PROMPTS, REPLIES_A, REPLIES_B, swap=True) == out
    assert calls[0] == 0 and again.stats.cached == 12 and again.stats.judged == 0
    # a changed input is a miss for its two orders only
    changed = LocalJudge(judge_dirs["llama"], template, batch_size=4, cache=cache)
    calls = _count_forwards(changed.model)
    changed.judge(PROMPTS, REPLIES_A[:-1] + ["something else"], REPLIES_B, swap=True)
    assert calls[0] == 1 and changed.stats.judged == 2
    # without few-shot, with chain of thought: other inputs or options, so misses
    assert LocalJudge(judge_dirs["llama"], template, cache=cache).first_probs(ITEMS, few_shot=False) is not None
    cot = LocalJudge(judge_dirs["llama"], template, cache=cache, cot_max_tokens=2)
    cot.first_probs(ITEMS[:2], few_shot=True, cot=True)
    assert cot.stats.judged == 2 and cot.stats.cached == 0
    # the same rendered inputs under other options (a longer rationale, another dtype): misses
    longer = LocalJudge(judge_dirs["llama"], template, cache=cache, cot_max_tokens=3)
    longer.first_probs(ITEMS[:2], few_shot=True, cot=True)
    assert longer.stats.judged == 2 and longer.stats.cached == 0
    bf16 = LocalJudge(judge_dirs["llama"], template, Runtime(torch.device("cpu"), torch.bfloat16), cache=cache)
    bf16.first_probs(ITEMS)
    assert bf16.stats.judged == len(ITEMS) and bf16.stats.cached == 0


def test_a_changed_template_or_model_is_a_miss(judge_dirs, template, tmp_path):
    cache = tmp_path / "judgements.sqlite"
    LocalJudge(judge_dirs["llama"], template, cache=cache).first_probs(ITEMS)
    other = tmp_path / "other.toml"
    other.write_text(TEMPLATE.replace('cot_instruction = "Think first."', 'cot_instruction = "Think twice."'))
    edited = LocalJudge(judge_dirs["llama"], load_template(other), cache=cache)  # same rendered input, new template
    edited.first_probs(ITEMS)
    assert edited.stats.judged == len(ITEMS) and edited.stats.cached == 0
    gpt2 = LocalJudge(judge_dirs["gpt2"], template, cache=cache)
    gpt2.first_probs(ITEMS)
    assert gpt2.stats.judged == len(ITEMS)


def test_a_model_identity_changes_when_the_weights_are_rewritten(judge_dirs):
    before = model_identity(judge_dirs["llama"])
    assert model_identity(judge_dirs["llama"]) == before != model_identity(judge_dirs["gpt2"])
    weights = judge_dirs["llama"] / "model.safetensors"
    st = weights.stat()
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert model_identity(judge_dirs["llama"]) != before
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_judge_that_dies_keeps_the_batches_it_finished(judge_dirs, template, tmp_path):
    cache = tmp_path / "judgements.sqlite"
    dying = LocalJudge(judge_dirs["llama"], template, batch_size=4, cache=cache)
    calls = _count_forwards(dying.model)

    def die_on_the_second(*_):
        if calls[0] == 2:
            raise RuntimeError("killed")

    dying.model.register_forward_hook(die_on_the_second)
    items = ITEMS + list(zip(PROMPTS, REPLIES_B, REPLIES_A))  # 12 inputs: 3 batches
    with pytest.raises(RuntimeError, match="killed"):
        dying.first_probs(items)
    assert len(JudgeCache(cache)) == 4  # batch 1's rows were committed
    resumed = LocalJudge(judge_dirs["llama"], template, batch_size=4, cache=cache)
    calls = _count_forwards(resumed.model)
    got = resumed.first_probs(items)
    assert calls[0] == 2 and resumed.stats.cached == 4 and len(JudgeCache(cache)) == 12
    fresh = LocalJudge(judge_dirs["llama"], template, batch_size=4).first_probs(items)
    assert [p for p, _ in got] == pytest.approx([p for p, _ in fresh], abs=1e-6)


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "cache.sqlite"
    path.write_text("not a database, just text " * 100)
    with pytest.raises(RlhfkitError, match="SQLite"):
        JudgeCache(path)
