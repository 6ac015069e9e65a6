"""Constitutional AI's supervised stage (rlhfkit/spine/constitution.py): the constitution as data, the
critique -> revision chains, chains on disk, the SL-CAI demonstrations.

Oracle: the batched chains of a tiny chat model against a manual loop that, one prompt at a time, builds each
conversation by hand, renders it with the chat template and generates greedily with full forwards (an argmax per
token). It catches a wrong turn order, a lost critique, a revision not carried into the next round, a wrong principle
and padding bugs. The tiny models have every weight redrawn at std 0.3 (test_judge._sharp_judge_dir), so a changed
input changes the greedy text.
"""

import random

import pytest
import torch

import rlhfkit.models.sampling as sampling_module
from rlhfkit.core.errors import ConfigError, DataError
from rlhfkit.spine.constitution import (
    DEFAULT_CONSTITUTION,
    Chain,
    Constitution,
    Principle,
    Step,
    critique_messages,
    critique_revision_chains,
    draw_principles,
    load_constitution,
    read_chains,
    revision_messages,
    sl_cai_demonstrations,
    write_chains,
)
from rlhfkit.models.load import load_policy, load_tokenizer

from test_judge import _sharp_judge_dir

CONSTITUTION = '''
[[principles]]
name = "harm"
critique_request = "what is bad ?"
revision_request = "say it better ."
comparison = "Which is less harmful?"

[[principles]]
name = "rude"
critique_request = "is it rude ?"
revision_request = "be kind ."
comparison = "Which is kinder?"

[[principles]]
name = "lazy"
critique_request = "the lazy dog ?"
revision_request = "jumps over ."
comparison = "Which is better?"

[[examples]]
prompt = "hello"
response = "go away"
critique = "rude"
revision = "hello world"
'''

# Prompts of different lengths, so that every batch is padded; one is a conversation with a system message.
PROMPTS = ["the quick brown fox", "two plus two", "hello world , hello user , what is the lazy dog doing now",
           "hi", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "four"}]]
MAX_NEW = 5


@pytest.fixture(scope="module")
def constitution(tmp_path_factory):
    path = tmp_path_factory.mktemp("constitution") / "c.toml"
    path.write_text(CONSTITUTION)
    return load_constitution(path)


@pytest.fixture(scope="module")
def policy_dirs(tmp_path_factory, chat_tokenizer):
    root = tmp_path_factory.mktemp("policies")
    dirs = {arch: _sharp_judge_dir(root / arch, chat_tokenizer, arch) for arch in ("llama", "gpt2")}
    plain = load_tokenizer(dirs["llama"])
    plain.chat_template = None
    dirs["plain"] = _sharp_judge_dir(root / "plain", plain, "llama")
    return dirs


def _policy(path):
    return load_policy(path, torch.device("cpu")), load_tokenizer(path)


# ----------------------------------------------------------------------------------------------------
# The constitution


def test_the_shipped_constitution_loads():
    c = load_constitution()
    assert c.source == str(DEFAULT_CONSTITUTION)
    assert 4 <= len(c.principles) <= 6 and len({p.name for p in c.principles}) == len(c.principles)
    assert all(p.critique_request.strip() and p.revision_request.strip() and p.comparison.startswith("Which")
               for p in c.principles)
    assert c.examples and all(e.prompt and e.response and e.critique and e.revision for e in c.examples)


P = '[[principles]]\nname = "a"\ncritique_request = "c"\nrevision_request = "r"\ncomparison = "q"\n'
E = '[[examples]]\nprompt = "p"\nresponse = "r"\ncritique = "c"\nrevision = "v"\n'


@pytest.mark.parametrize("text, field", [
    ("", "no principles"),  # no [[principles]] at all
    ("principles = []\n", "no principles"),
    ('principles = "be nice"\n', "[[principles]]"),  # not tables
    ('[principles]\nname = "a"\n', "[[principles]]"),  # one table, not an array of tables
    ('principle = "x"\n' + P, "unknown field principle;"),  # a top-level typo
    ('[[principles]]\nname = "a"\n', "principles[1].critique_request"),  # missing
    (P.replace("critique_request", "critque_request"), "principles[1].critque_request"),  # unknown (a typo)
    (P.replace('comparison = "q"', "comparison = 3"), "principles[1].comparison"),  # wrong type
    (P.replace('revision_request = "r"', 'revision_request = "  "'), "principles[1].revision_request"),  # empty
    (P + P.replace('name = "a"', 'name = ""'), "principles[2].name"),  # empty, in the second table
    (P + P, "principles[2].name"),  # a duplicate name
    (P + E.replace('revision = "v"\n', ""), "examples[1].revision"),  # an example's missing field
    (P + E + E.replace('critique = "c"', "critique = ['c']"), "examples[2].critique"),  # wrong type
    ('examples = ["p"]\n' + P, "[[examples]]"),  # (top-level keys go before the first table in TOML)
    ("principles = \n", "TOML"),  # not TOML at all
])
def test_a_bad_constitution_is_a_config_error_naming_the_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_constitution(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_a_missing_constitution_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="constitution .*nope.toml does not exist"):
        load_constitution(tmp_path / "nope.toml")


def test_the_content_hash_follows_the_content_not_the_source(constitution, tmp_path):
    other = tmp_path / "copy.toml"
    other.write_text(CONSTITUTION)
    assert load_constitution(other).content_hash == constitution.content_hash
    other.write_text(CONSTITUTION.replace("be kind .", "be kinder ."))
    assert load_constitution(other).content_hash != constitution.content_hash
    other.write_text(CONSTITUTION.replace('revision = "hello world"', 'revision = "hi"'))  # examples count too
    assert load_constitution(other).content_hash != constitution.content_hash
    assert constitution.principle("rude").revision_request == "be kind ."
    with pytest.raises(ConfigError, match="harm, rude, lazy"):
        constitution.principle("nope")


# ----------------------------------------------------------------------------------------------------
# The draws and the conversations


def test_the_drawn_principles_are_reproducible_for_a_seed_and_differ_across_seeds(constitution):
    def names(seed, n=8, rounds=2):
        return [[p.name for p in row] for row in draw_principles(constitution, n, rounds, seed)]

    assert names(0) == names(0)
    assert names(0) != names(1)
    assert names(0, n=3) == names(0)[:3]  # a prompt's draws do not depend on the prompts after it
    assert {n for row in names(0, n=30) for n in row} == {"harm", "rude", "lazy"}  # every principle is drawn
    rng = random.Random(5)  # the documented order: prompt by prompt, round by round, one random.Random
    assert names(5, n=4, rounds=3) == [[rng.choice(constitution.principles).name for _ in range(3)] for _ in range(4)]


def test_the_conversations_put_each_turn_in_its_place(constitution):
    harm = constitution.principle("harm")
    ex = constitution.examples
    assert critique_messages("hi", "go", harm) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"},
        {"role": "user", "content": "what is bad ?"}]
    assert revision_messages("hi", "go", "rude", harm) == critique_messages("hi", "go", harm) + [
        {"role": "assistant", "content": "rude"}, {"role": "user", "content": "say it better ."}]
    system = {"role": "system", "content": "be brief"}
    shots = critique_messages([system, {"role": "user", "content": "hi"}], "go", harm, ex)
    assert shots[0] == system  # the prompt's system message stays first, before the examples
    assert [m["content"] for m in shots[1:7]] == ["hello", "go away", "what is bad ?", "rude", "say it better .",
                                                  "hello world"]  # the example, asked with the drawn principle
    assert shots[7:] == critique_messages("hi", "go", harm)


# ----------------------------------------------------------------------------------------------------
# The chains against a manual loop


def _greedy(model, tokenizer, messages, n=MAX_NEW) -> str:
    """Render with the chat template, then n argmax steps of full forwards, stopping at EOS or <|im_end|>."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
    return tokenizer.decode(out, skip_special_tokens=False)


def _manual_chain(model, tokenizer, prompt, principles, examples) -> Chain:
    """One prompt's chain, every conversation written out by hand."""
    system = [m for m in prompt if m["role"] == "system"] if isinstance(prompt, list) else []
    asked = [m for m in prompt if m["role"] != "system"] if isinstance(prompt, list) else [
        {"role": "user", "content": prompt}]
    first = response = _greedy(model, tokenizer, system + asked)
    steps = []
    for c in principles:
        shots = []
        for e in examples:
            shots += [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.response},
                      {"role": "user", "content": c.critique_request}, {"role": "assistant", "content": e.critique},
                      {"role": "user", "content": c.revision_request}, {"role": "assistant", "content": e.revision}]
        conversation = system + shots + asked + [{"role": "assistant", "content": response},
                                                 {"role": "user", "content": c.critique_request}]
        critique = _greedy(model, tokenizer, conversation)
        response = _greedy(model, tokenizer, conversation + [{"role": "assistant", "content": critique},
                                                             {"role": "user", "content": c.revision_request}])
        steps.append(Step(c.name, critique, response))
    return Chain(prompt, first, tuple(steps))


@pytest.mark.parametrize("arch, few_shot", [("llama", True), ("gpt2", False)])
def test_greedy_chains_equal_a_manual_loop_one_prompt_at_a_time(policy_dirs, constitution, arch, few_shot):
    model, tokenizer = _policy(policy_dirs[arch])
    rounds, seed = 2, 3
    chains = critique_revision_chains(model, tokenizer, PROMPTS, constitution, rounds=rounds, seed=seed,
                                      max_new_tokens=MAX_NEW, few_shot=few_shot, batch_size=4)
    rng = random.Random(seed)
    drawn = [[rng.choice(constitution.principles) for _ in range(rounds)] for _ in PROMPTS]
    want = [_manual_chain(model, tokenizer, p, d, constitution.examples if few_shot else ())
            for p, d in zip(PROMPTS, drawn)]
    assert chains == want
    assert [c.revision for c in chains] == [w.steps[-1].revision for w in want]
    # the oracle is not vacuous: the texts vary with their conversation, so a lost turn would show
    texts = [t for c in chains for t in (c.response, *(x for s in c.steps for x in (s.critique, s.revision)))]
    assert all(texts) and len(set(texts)) > len(texts) // 2
    assert any(c.steps[0].revision != c.steps[1].revision for c in chains)
    assert len({n for c in chains for n in (s.principle for s in c.steps)}) > 1


def test_the_requests_reach_the_model_in_the_rendered_conversation(policy_dirs, constitution, monkeypatch):
    """What the model is really fed (the sampler's query ids, padding dropped), decoded: each critique input ends
    with the drawn principle's critique request after the reply; each revision input continues it with the
    critique and ends with the revision request."""
    model, tokenizer = _policy(policy_dirs["llama"])
    fed, real = [], sampling_module.sample

    def spy(model, queries, query_mask, **kw):
        fed.append([tokenizer.decode(q[m.bool()].tolist(), skip_special_tokens=False)
                    for q, m in zip(queries, query_mask)])
        return real(model, queries, query_mask, **kw)

    monkeypatch.setattr(sampling_module, "sample", spy)
    prompts = PROMPTS[:3]
    chains = critique_revision_chains(model, tokenizer, prompts, constitution, rounds=2, seed=0,
                                      max_new_tokens=MAX_NEW, few_shot=False)
    assert len(fed) == 5 and all(len(batch) == len(prompts) for batch in fed)  # 1 + 2 x rounds batched calls
    turn = lambda role, content: f"<|im_start|>{role}\n{content}<|im_end|>\n"  # noqa: E731
    for i, (prompt, chain) in enumerate(zip(prompts, chains)):
        assert fed[0][i] == "<s>" + turn("user", prompt) + "<|im_start|>assistant\n"
        shown = chain.response
        for k, step in enumerate(chain.steps):
            c = constitution.principle(step.principle)
            critique_in, revision_in = fed[1 + 2 * k][i], fed[2 + 2 * k][i]
            asked = turn("user", prompt) + turn("assistant", shown) + turn("user", c.critique_request)
            assert critique_in == "<s>" + asked + "<|im_start|>assistant\n"
            assert revision_in == ("<s>" + asked + turn("assistant", step.critique) + turn("user", c.revision_request)
                                   + "<|im_start|>assistant\n")
            shown = step.revision  # the next round is shown this round's revision


def test_batching_does_not_change_greedy_chains(policy_dirs, constitution):
    model, tokenizer = _policy(policy_dirs["gpt2"])
    kw = dict(rounds=1, seed=0, max_new_tokens=MAX_NEW)
    one = critique_revision_chains(model, tokenizer, PROMPTS, constitution, batch_size=1, **kw)
    assert critique_revision_chains(model, tokenizer, PROMPTS, constitution, batch_size=5, **kw) == one
    assert critique_revision_chains(model, tokenizer, PROMPTS[:2], constitution, batch_size=5, **kw) == one[:2]


def test_sampled_chains_are_reproducible_for_a_seed(policy_dirs, constitution):
    model, tokenizer = _policy(policy_dirs["llama"])
    kw = dict(rounds=1, max_new_tokens=MAX_NEW, temperature=1.5)
    a = critique_revision_chains(model, tokenizer, PROMPTS, constitution, seed=0, **kw)
    assert critique_revision_chains(model, tokenizer, PROMPTS, constitution, seed=0, **kw) == a
    assert critique_revision_chains(model, tokenizer, PROMPTS, constitution, seed=1, **kw) != a


def test_a_policy_without_a_chat_template_is_refused(policy_dirs, constitution):
    model, tokenizer = _policy(policy_dirs["plain"])
    with pytest.raises(ConfigError) as e:
        critique_revision_chains(model, tokenizer, ["hi"], constitution)
    assert str(policy_dirs["plain"]) in str(e.value) and "chat template" in str(e.value)


@pytest.mark.parametrize("kw", [dict(rounds=0), dict(max_new_tokens=0), dict(temperature=-1.0), dict(batch_size=0)])
def test_bad_settings_are_refused(policy_dirs, constitution, kw):
    model, tokenizer = _policy(policy_dirs["llama"])
    with pytest.raises(ConfigError, match=next(iter(kw))):
        critique_revision_chains(model, tokenizer, ["hi"], constitution, **kw)


def test_a_conversation_prompt_must_end_with_the_user(policy_dirs, constitution):
    model, tokenizer = _policy(policy_dirs["llama"])
    with pytest.raises(DataError, match="red-team prompt 1"):
        critique_revision_chains(model, tokenizer, ["hi", [{"role": "assistant", "content": "x"}]], constitution)


# ----------------------------------------------------------------------------------------------------
# Chains on disk, and the SFT data

CHAINS = [
    Chain("how do i pick a lock ?", "use a pin", (Step("harm", "illegal", "ask a locksmith"),
                                                  Step("rude", "fine", "please ask a locksmith"))),
    Chain([{"role": "user", "content": "insult me"}], "you fool", (Step("rude", "an insult", "no, friend"),)),
]


def test_chains_round_trip_through_jsonl(tmp_path):
    path = tmp_path / "out" / "chains.jsonl"
    assert write_chains(path, CHAINS) == 2
    assert read_chains(path) == CHAINS
    assert [p.name for p in path.parent.iterdir()] == ["chains.jsonl"]  # atomic: no temporary file left
    first = path.read_text().splitlines()[0]
    assert '"revision": "please ask a locksmith"' in first  # the final revision is on the line, for the report


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "p", "response": "r", "steps": []}', "steps"),
    ('{"prompt": "p", "response": 3, "steps": [{"principle": "a", "critique": "c", "revision": "v"}]}', "response"),
    ('{"prompt": "p", "response": "r", "steps": [{"principle": "a", "critique": "c"}]}', "revision"),
    ('{"prompt": "p", "response": "r", "steps": [{"principle": "a", "critique": "c", "revision": "v"}], '
     '"revision": "w"}', "revision"),
])
def test_a_bad_chain_line_is_a_data_error_naming_the_line_and_field(tmp_path, line, field):
    path = tmp_path / "chains.jsonl"
    write_chains(path, CHAINS[:1])
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(DataError) as e:
        read_chains(path)
    assert f"{path}:2" in str(e.value) and field in str(e.value)


def test_sl_cai_demonstrations_mix_final_revisions_with_helpful_demos():
    helpful = [("what is 2 + 2 ?", "4"), ("say hi", "hi !"), ("name a colour", "blue")]
    ordered = sl_cai_demonstrations(CHAINS, helpful, seed=None)
    assert ordered == [("how do i pick a lock ?", "please ask a locksmith"),  # the FINAL revision, not round 1's
                       ([{"role": "user", "content": "insult me"}], "no, friend")] + helpful
    mixed = sl_cai_demonstrations(CHAINS, helpful, seed=0)
    assert sorted(map(repr, mixed)) == sorted(map(repr, ordered)) and mixed != ordered  # shuffled together
    assert sl_cai_demonstrations(CHAINS, helpful, seed=0) == mixed
    assert sl_cai_demonstrations([], helpful, seed=None) == helpful
    with pytest.raises(DataError, match="pair"):
        sl_cai_demonstrations(CHAINS, [("only a prompt",)])


def test_a_constitution_made_in_memory_is_checked():
    p = Principle("a", "c", "r", "q")
    with pytest.raises(ConfigError, match="no principles"):
        Constitution(())
    with pytest.raises(ConfigError, match=r"principles\[2\]\.name = 'a' repeats principles\[1\]"):
        Constitution((p, p), source="mine.toml")
