"""The score judge (rlhfkit/models/judge_score.py, direct RLAIF): templates as data, the judge's input, the
expected 1-10 score from the labels' probabilities (one- and two-token labels), rescaling, the cache, and the
judge as a reward source.

Oracles: the expected score against a plain, unpadded full forward per input (and for "10" = "1", "0" a second
full forward after "1", the chain rule written out by hand); batched against one at a time; and judges built to
answer one score, with half their mass on a word that is no score, whose expected score is known exactly (a sum
over label indices instead of values, a dropped renormalisation, or P("1") read as P("1") + P("10") each moves it
by a point or more). The tokenizer splits digits as SmolLM2's does (Digits(individual_digits=True) before the
byte-level split), so "10" is two tokens and "1" ... "9" one each.
"""

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.core.errors import ConfigError
from rlhfkit.models.judge import DEFAULT_TEMPLATE, JudgeCache, LocalJudge, encode_text, load_template
from rlhfkit.models.judge_score import (
    DEFAULT_SCORE_TEMPLATE,
    LocalScoreJudge,
    load_score_template,
    render_score,
    rescale,
    score_label_ids,
    score_template_from_dict,
)
from rlhfkit.models.load import TinyModelSpec, tiny_config
from rlhfkit.models.runtime import Runtime
from rlhfkit.pipeline.config import RewardSourceConfig, load_config
from rlhfkit.spine.reward_sources import build_scorer, open_score_judge, preflight_sources
from test_judge import _count_forwards, _sharp_judge_dir

CPU = Runtime(torch.device("cpu"), None)
NINE = [str(i) for i in range(1, 10)]  # one token each for every tokenizer here

TEMPLATE = '''
preamble = "Rate the reply."
question = "Q: {prompt}\\nA: {reply}\\nScore?"

[[exemplars]]
prompt = "hello"
reply = "hello world"
score = "7"
'''

# Inputs of different lengths, so that a batch is padded and a padding bug shows.
PROMPTS = ["the quick brown fox", "two plus two", "hello", "what is the lazy dog doing over there now", "four", "hi"]
REPLIES = ["jumps", "four .", "hello world , hello user", "it sleeps", "two plus two is four", "hello"]


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "score.toml"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture
def template(template_file):
    return load_score_template(template_file)


@pytest.fixture(scope="module")
def digit_tokenizer(chat_tokenizer):
    """The conftest's byte-level BPE with SmolLM2's pre-tokenizer: every digit a piece of its own."""
    from tokenizers import pre_tokenizers

    tok = copy.deepcopy(chat_tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok


@pytest.fixture(scope="module")
def judge_dirs(tmp_path_factory, chat_tokenizer, digit_tokenizer):
    """Sharp random judges: "digits" (Llama, chat template, digits split), "plain" (the same without a chat
    template), "gpt2" (GPT-2, the conftest's chat tokenizer)."""
    root = tmp_path_factory.mktemp("score_judges")
    plain = copy.deepcopy(digit_tokenizer)
    plain.chat_template = None
    return {"digits": _sharp_judge_dir(root / "digits", digit_tokenizer, "llama"),
            "plain": _sharp_judge_dir(root / "plain", plain, "llama"),
            "gpt2": _sharp_judge_dir(root / "gpt2", chat_tokenizer, "gpt2")}


def _token(tok, text: str) -> int:
    (i,) = tok(text, add_special_tokens=False)["input_ids"]
    return i


def _manual_expected(judge, text: str, labels) -> float:
    """E[s] by hand from unpadded full forwards: P(t1) after the input, and for a two-token label the chain rule
    with P(t2 | t1) from a second forward after t1; a one-token label that starts two-token ones keeps only the
    mass that stops there; then normalised over the labels."""
    ids = encode_text(judge.tokenizer, text)
    tokens = {}
    for label in labels:
        longer = encode_text(judge.tokenizer, text + label)
        assert longer[: len(ids)] == ids and len(longer) - len(ids) in (1, 2)
        tokens[label] = longer[len(ids):]
    with torch.no_grad():
        p1 = torch.softmax(judge.model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
        p2 = {t[0]: torch.softmax(judge.model(input_ids=torch.tensor([ids + t[:1]])).logits[0, -1], -1)
              for t in tokens.values() if len(t) == 2}
    mass = {}
    for label, t in tokens.items():
        if len(t) == 2:
            mass[label] = p1[t[0]].item() * p2[t[0]][t[1]].item()
        else:
            go_on = sum(p2[t[0]][u[1]].item() for u in tokens.values() if len(u) == 2 and u[0] == t[0])
            mass[label] = p1[t[0]].item() * (1.0 - go_on)
    total = sum(mass.values())
    return sum(float(label) * m / total for label, m in mass.items())


# ----------------------------------------------------------------------------------------------------
# Templates


def test_the_default_score_template_loads_and_10_is_two_tokens_for_a_digit_splitter(digit_tokenizer):
    t = load_score_template()
    assert t.source == str(DEFAULT_SCORE_TEMPLATE) and t.labels == tuple(str(i) for i in range(1, 11))
    assert t.values == tuple(float(i) for i in range(1, 11)) and t.preamble and "{reply}" in t.question
    assert [e.score for e in t.exemplars] == ["9", "2"]
    assert t.content_hash != load_template(DEFAULT_TEMPLATE).content_hash
    cut, ids = score_label_ids(digit_tokenizer, t)
    assert cut == 0 and [digit_tokenizer.convert_ids_to_tokens(i) for i in ids] == [[d] for d in NINE] + [["1", "0"]]


def test_trailing_spaces_of_the_answer_prefix_go_into_the_first_token(chat_tokenizer):
    """GPT-2-style: "Score: 10" is "Score", ":", " 1", "0": the input ends before the space (judge.py, dev. 3)."""
    t = score_template_from_dict({"question": "{prompt} {reply}", "answer_prefix": "Score: "})
    cut, ids = score_label_ids(chat_tokenizer, t)
    assert cut == 1 and chat_tokenizer.convert_ids_to_tokens(ids[-1]) == ["Ġ1", "0"]
    assert chat_tokenizer.convert_ids_to_tokens(ids[0]) == ["Ġ1"]


Q = 'question = "{prompt} {reply}"\n'
SHOT = '[[exemplars]]\nprompt = "p"\nreply = "r"\n'


@pytest.mark.parametrize("text, field", [
    ('preamble = "x"\n', "question"),  # missing
    (Q + 'preambel = "x"\n', "preambel"),  # unknown field (a typo)
    ('question = "{prompt} {reply_1}"\n', "{reply_1}"),  # the pairwise placeholder
    ('question = "{prompt}"\n', "{reply}"),  # a placeholder missing
    ('question = "{prompt} {reply} {"\n', "question"),  # a stray brace
    (Q + 'labels = ["1", "ten"]\n', "'ten' is not a number"),
    (Q + 'labels = ["1", "nan"]\n', "'nan' is not a number"),
    (Q + 'labels = [1, 2]\n', "labels"),  # numbers, not strings
    (Q + 'labels = ["1"]\n', "labels"),  # one score
    (Q + 'labels = ["1", "1.0"]\n', "the same score twice"),
    (Q + "answer_prefix = 3\n", "answer_prefix"),
    (Q + SHOT + 'score = "11"\n', "exemplars[1].score"),  # not a label
    (Q + SHOT + "score = 7\n", "exemplars[1].score"),  # not a string
    (Q + '[[exemplars]]\nprompt = "p"\nscore = "7"\n', "exemplars[1].reply"),  # a missing exemplar field
    (Q + SHOT + 'score = "7"\nanswer = "7"\n', "exemplars[1].answer"),  # the pairwise field
    (Q + 'exemplars = ["p"]\n', "exemplars"),  # not tables
    ("question = \n", "TOML"),  # not TOML at all
])
def test_a_bad_score_template_is_a_config_error_naming_the_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_score_template(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_a_missing_score_template_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=f"does not exist; copy {DEFAULT_SCORE_TEMPLATE}"):
        load_score_template(tmp_path / "nope.toml")


def test_labels_of_three_tokens_are_refused(digit_tokenizer, judge_dirs, tmp_path):
    path = tmp_path / "hundred.toml"
    path.write_text(Q + 'labels = ["1", "10", "100"]\n')
    with pytest.raises(ConfigError) as e:
        score_label_ids(digit_tokenizer, load_score_template(path), "tiny")
    assert str(path) in str(e.value) and "one or two tokens" in str(e.value) and "['1', '0', '0']" in str(e.value)
    with pytest.raises(ConfigError, match="one or two tokens"):
        LocalScoreJudge(judge_dirs["digits"], load_score_template(path))


# ----------------------------------------------------------------------------------------------------
# The judge's input


def test_render_through_a_chat_template(template, digit_tokenizer):
    text = render_score(template, digit_tokenizer, "two plus two", "four", few_shot=True)
    assert text == ("<s><|im_start|>system\nRate the reply.<|im_end|>\n"
                    "<|im_start|>user\nQ: hello\nA: hello world\nScore?<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"
                    "<|im_start|>user\nQ: two plus two\nA: four\nScore?<|im_end|>\n<|im_start|>assistant\n")
    zero = render_score(template, digit_tokenizer, "two plus two", "four", few_shot=False)
    assert "hello world" not in zero and zero.endswith(text[-70:])
    convo = render_score(template, digit_tokenizer, [{"role": "user", "content": "two plus two"}], "four", False)
    assert "Q: user: two plus two\nA: four" in convo  # a conversation prompt as role lines (scoring.as_text)


def test_render_as_plain_text(template, judge_dirs):
    judge = LocalScoreJudge(judge_dirs["plain"], template)
    text = render_score(template, judge.tokenizer, "two plus two", "four", few_shot=True)
    assert text == "Rate the reply.\n\nQ: hello\nA: hello world\nScore?\n7\n\nQ: two plus two\nA: four\nScore?\n"
    assert encode_text(judge.tokenizer, text)[0] == judge.tokenizer.bos_token_id


# ----------------------------------------------------------------------------------------------------
# Expected scores


@pytest.mark.parametrize("arch", ["digits", "gpt2"])
def test_one_token_labels_equal_a_manual_full_forward(judge_dirs, template_file, arch):
    path = template_file.parent / "nine.toml"
    path.write_text('labels = ["1", "2", "3", "4", "5", "6", "7", "8", "9"]\n' + TEMPLATE)
    t = load_score_template(path)
    judge = LocalScoreJudge(judge_dirs[arch], t, batch_size=8)
    assert all(len(ids) == 1 for ids in judge.label_ids)
    got = judge.expected_scores(PROMPTS, REPLIES)
    texts = [render_score(t, judge.tokenizer, p, r) for p, r in zip(PROMPTS, REPLIES)]
    assert len({len(encode_text(judge.tokenizer, x)) for x in texts}) > 3  # the batch is really padded
    assert got == pytest.approx([_manual_expected(judge, x, NINE) for x in texts], abs=1e-5)
    assert max(got) - min(got) > 0.2 and judge.stats.calls == 1  # the oracle is not a constant


@pytest.mark.parametrize("arch", ["digits", "gpt2"])
def test_continuations_on_the_kv_cache_equal_full_forwards(judge_dirs, arch):
    """next_token_logits_then: the logits after each padded sequence + [a], read on the first forward's cache, for
    several heads (each on its own copy of the cache), equal a full forward of each extended sequence."""
    judge = LocalScoreJudge(judge_dirs[arch])
    seqs = [encode_text(judge.tokenizer, f"{p} {r}") for p, r in zip(PROMPTS, REPLIES)]
    assert len({len(x) for x in seqs}) > 2  # left padding in play
    heads = [_token(judge.tokenizer, "1"), _token(judge.tokenizer, "2"), _token(judge.tokenizer, "3")]
    first, then = judge.next_token_logits_then(seqs, heads)
    assert torch.allclose(first, judge.next_token_logits(seqs), atol=1e-4)
    for a in heads:
        assert torch.allclose(then[a], judge.next_token_logits([x + [a] for x in seqs]), atol=1e-4)
    assert not torch.allclose(then[heads[0]], then[heads[1]], atol=1e-2)  # each head its own continuation


@pytest.mark.parametrize("arch", ["digits", "plain"])
def test_ten_as_two_tokens_follows_the_chain_rule_and_batching_changes_nothing(judge_dirs, template, arch):
    judge = LocalScoreJudge(judge_dirs[arch], template, batch_size=8)
    assert judge.label_ids[-1] == [_token(judge.tokenizer, "1"), _token(judge.tokenizer, "0")]
    got = judge.expected_scores(PROMPTS, REPLIES)
    texts = [render_score(template, judge.tokenizer, p, r) for p, r in zip(PROMPTS, REPLIES)]
    labels = [str(i) for i in range(1, 11)]
    assert got == pytest.approx([_manual_expected(judge, x, labels) for x in texts], abs=1e-5)
    assert judge.stats.calls == 2 and judge.stats.judged == len(PROMPTS)  # one forward more, for "1" then "0"
    one = LocalScoreJudge(judge_dirs[arch], template, batch_size=1)
    assert one.expected_scores(PROMPTS, REPLIES) == pytest.approx(got, abs=1e-5)
    assert one.stats.calls == 2 * len(PROMPTS)
    assert judge.scores(PROMPTS, REPLIES) == pytest.approx([(e - 1) / 9 * 2 - 1 for e in got])
    assert all(1.0 <= e <= 10.0 for e in got)


def test_an_answer_prefix_ending_in_a_space_is_read_before_it(judge_dirs, template_file):
    """The GPT-2 judge's tokenizer reads "Score: 10" as ..., ":", " 1", "0": the input ends at "Score:" and the
    labels read are " 1" ... " 9" and " 1", "0" (judge.py's deviation 3 with a two-token label)."""
    path = template_file.parent / "spaced.toml"
    path.write_text('answer_prefix = "Score: "\n' + TEMPLATE)
    judge = LocalScoreJudge(judge_dirs["gpt2"], load_score_template(path), batch_size=8)
    assert judge.cut == 1 and judge.tokenizer.convert_ids_to_tokens(judge.label_ids[-1]) == ["Ġ1", "0"]
    texts = [render_score(judge.template, judge.tokenizer, p, r) for p, r in zip(PROMPTS, REPLIES)]
    assert all(x.endswith("assistant\nScore: ") for x in texts)
    want = [_manual_expected(judge, x[:-1], [f" {i}" for i in range(1, 11)]) for x in texts]
    assert judge.expected_scores(PROMPTS, REPLIES) == pytest.approx(want, abs=1e-5)


def test_rescaling_maps_the_lowest_and_highest_label_to_minus_one_and_one():
    assert rescale(1.0, 1.0, 10.0) == -1.0 and rescale(10.0, 1.0, 10.0) == 1.0
    assert rescale(5.5, 1.0, 10.0) == 0.0 and rescale(2.0, 0.0, 4.0) == 0.0
    assert rescale(9.0, 1.0, 10.0) == pytest.approx(16 / 9 - 1)


def _bigram_judge_dir(path, tokenizer, rules: dict[int, list[int]], strength: float = 20.0):
    """A tiny untied Llama whose next token depends on the last one only: attention and MLP write nothing, so the
    last hidden state is the last token's (normalised) embedding, and the LM head's row for each token in
    rules[s] is that embedding of s. After s the model answers the tokens of rules[s], equally likely, and
    nothing else (a margin of ~60 logits)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(TinyModelSpec("llama", 1, 32, 4, 512), tokenizer)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight  # (V, H)
        emb.copy_(torch.randn(emb.shape, generator=g))
        head = model.lm_head.weight  # (V, H)
        head.zero_()
        for s, targets in rules.items():
            for t in targets:
                head[t] += strength * F.normalize(emb[s], dim=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("answer, labels, want", [
    ("9", None, 9.0),  # indices 0-based would give 8
    ("10", None, 10.0),  # "1" then "0": P("1") read as P("1") + P("10") would give 5.5; no renormalisation 5
    ("9", ["0", "5", "9", "10"], 9.0),  # index 2 (0-based) or 3 (1-based), not 9
])
def test_a_judge_that_always_answers_one_score_gets_it(tmp_path, digit_tokenizer, template, answer, labels, want):
    """Half the judge's mass goes to a word that is no score: without the renormalisation over the labels the
    expected score would be halved."""
    if labels is not None:
        template = score_template_from_dict({"question": template.question, "labels": labels}, "custom")
    end = encode_text(digit_tokenizer, render_score(template, digit_tokenizer, "p", "r"))[-1]  # "\n" after assistant
    word = _token(digit_tokenizer, " quick")
    one, zero = _token(digit_tokenizer, "1"), _token(digit_tokenizer, "0")
    rules = {end: [_token(digit_tokenizer, "9"), word]} if answer == "9" else {end: [one, word], one: [zero]}
    judge = LocalScoreJudge(_bigram_judge_dir(tmp_path / "judge", digit_tokenizer, rules), template)
    with torch.no_grad():
        p = torch.softmax(judge.model(input_ids=torch.tensor([[end]])).logits[0, -1], -1)
    assert p[word].item() == pytest.approx(0.5, abs=1e-4)  # the word really takes half
    got = judge.expected_scores(PROMPTS[:3], REPLIES[:3])
    assert got == pytest.approx([want] * 3, abs=1e-3)
    lo, hi = min(map(float, template.labels)), max(map(float, template.labels))
    assert judge.scores(PROMPTS[:3], REPLIES[:3]) == pytest.approx([(want - lo) / (hi - lo) * 2 - 1] * 3, abs=1e-3)


# ----------------------------------------------------------------------------------------------------
# The cache


def test_a_rerun_from_the_cache_makes_no_model_call(judge_dirs, template, tmp_path):
    cache = tmp_path / "judgements.sqlite"
    first = LocalScoreJudge(judge_dirs["digits"], template, batch_size=4, cache=cache)
    calls = _count_forwards(first.model)
    want = first.expected_scores(PROMPTS, REPLIES)
    assert calls[0] == 4 and len(JudgeCache(cache)) == len(PROMPTS)  # 2 batches, 2 forwards each
    again = LocalScoreJudge(judge_dirs["digits"], template, batch_size=4, cache=cache)
    calls = _count_forwards(again.model)
    assert again.expected_scores(PROMPTS, REPLIES) == want and again.scores(PROMPTS, REPLIES) == first.scores(
        PROMPTS, REPLIES)
    assert calls[0] == 0 and again.stats.cached == 2 * len(PROMPTS) and again.stats.judged == 0
    zero_shot = LocalScoreJudge(judge_dirs["digits"], template, cache=cache)  # another input: a miss
    zero_shot.expected_scores(PROMPTS[:2], REPLIES[:2], few_shot=False)
    assert zero_shot.stats.judged == 2 and zero_shot.stats.cached == 0
    # a pairwise judge in the same file reads none of these rows (its template and options are other keys)
    pair_template = tmp_path / "pair.toml"
    pair_template.write_text('question = "Q: {prompt}\\nA: {reply_1}\\nB: {reply_2}\\nScore?"\n')
    pairwise = LocalJudge(judge_dirs["digits"], load_template(pair_template), cache=cache)
    pairwise.first_probs([(PROMPTS[0], REPLIES[0], REPLIES[1])])
    assert pairwise.stats.cached == 0 and len(JudgeCache(cache)) == len(PROMPTS) + 3


# ----------------------------------------------------------------------------------------------------
# As a reward source


def test_a_judge_source_rewards_the_rescaled_scores(judge_dirs, template, template_file, digits):
    cfg = load_config(device="cpu", ppo={"value_init": "policy"}, reward={"sources": [
        {"kind": "judge", "path": str(judge_dirs["digits"]), "template": str(template_file), "weight": 2.0}]})
    preflight_sources(cfg)
    scorer = build_scorer(cfg, digits, Path("unused"), CPU)
    combined, parts = scorer.score_sources(PROMPTS, REPLIES)
    want = LocalScoreJudge(judge_dirs["digits"], template).scores(PROMPTS, REPLIES)
    assert parts["judge"].dtype == torch.float32 and parts["judge"].shape == (len(PROMPTS),)
    assert parts["judge"].tolist() == pytest.approx(want, abs=1e-5) and combined.tolist() == pytest.approx(
        [2 * w for w in want], abs=1e-5)
    assert scorer.scorers["judge"].judge.batch_size == cfg.judge.batch_size == 16
    small = load_config(device="cpu", ppo={"value_init": "policy"}, judge={"batch_size": 2},
                        reward={"sources": [dataclasses.asdict(s) for s in cfg.reward.sources]})
    batched = build_scorer(small, digits, Path("unused"), CPU)  # [judge] batch_size: replies per forward
    assert batched.scorers["judge"].judge.batch_size == 2
    assert batched.score_sources(PROMPTS, REPLIES)[1]["judge"].tolist() == pytest.approx(want, abs=1e-4)
    zero_shot = RewardSourceConfig(kind="judge", path=str(judge_dirs["digits"]), template=str(template_file),
                                   few_shot=False)
    assert open_score_judge(zero_shot, CPU, "s")(PROMPTS, REPLIES).tolist() == pytest.approx(
        LocalScoreJudge(judge_dirs["digits"], template).scores(PROMPTS, REPLIES, few_shot=False), abs=1e-5)


def test_a_judge_source_fails_before_anything_runs(judge_dirs, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(Q + 'labels = ["1", "ten"]\n')
    source = {"kind": "judge", "path": str(judge_dirs["digits"]), "template": str(bad)}
    with pytest.raises(ConfigError, match="'ten' is not a number"):
        preflight_sources(load_config(ppo={"value_init": "policy"}, reward={"sources": [source]}))
    bad.write_text(Q + 'labels = ["1", "100"]\n')  # "100" is three tokens for this judge's tokenizer
    with pytest.raises(ConfigError, match="one or two tokens"):
        preflight_sources(load_config(ppo={"value_init": "policy"}, reward={"sources": [source]}))
    with pytest.raises(ConfigError, match=r"reward.sources\[0\].path"):  # the config refuses an empty path...
        load_config(ppo={"value_init": "policy"}, reward={"sources": [{"kind": "judge"}]})
    with pytest.raises(ConfigError, match=r"reward.sources\[3\].path is empty"):  # ...and so does the scorer
        open_score_judge(RewardSourceConfig(kind="judge"), CPU, "reward.sources[3]")
    assert math.isfinite(rescale(3.0, 1.0, 10.0))
