"""The data layer: every format and container round-trips, formats are told from their fields, implicit
prompts (HH, TRL) are found exactly, ratings keep their ties, SFT conversations mask the assistant turns,
and bad files fail naming the file, the line and the field."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit.cli import main as cli_main
from rlhfkit.core.errors import DataError
from rlhfkit.data.contract import Comparison, Demonstration, PromptRecord, RankingRecord, prompt_item_id
from rlhfkit.data.formats import FORMATS, split_hh
from rlhfkit.data.load import load_demonstrations, load_pairs, load_prompts, load_rankings, read_data, save_records

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


H, A = "\n\nHuman:", "\n\nAssistant:"

# Rows in each format, as people's files hold them (name -> (format, rows)).
SAMPLES = {
    "comparisons": ("comparisons", [
        {"item_id": "a", "prompt": "2+2=", "chosen": " 4", "rejected": " 5", "margin": 0.5, "labeler_ids": ["u1"],
         "criterion": "helpfulness"},
        {"item_id": "b", "prompt": "hi", "chosen": " hello", "rejected": " go away", "margin": None, "labeler_ids": [],
         "criterion": "overall"}]),
    "trl-standard": ("trl", [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "The sky is", "chosen": " clear.", "rejected": " green.", "item_id": "mine", "margin": 1.0}]),
    "trl-conversational": ("trl", [
        {"prompt": [{"role": "system", "content": "Be brief.", "name": "sys"}, user("What color is the sky?")],
         "chosen": [bot("Blue.")], "rejected": [bot("Green.")]},
        {"prompt": [user("Where is the sun?")], "chosen": [bot("In the sky.")], "rejected": [bot("Under the bed.")],
         "criterion": "honesty"}]),
    "trl-implicit-standard": ("trl-implicit", [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Water is wet", "rejected": "Water is dry and hot"}]),
    "trl-implicit-conversational": ("trl-implicit", [
        {"chosen": [user("Sky color?"), bot("Blue.")], "rejected": [user("Sky color?"), bot("Green.")]},
        {"chosen": [user("a"), bot("b"), user("c"), bot("d")], "rejected": [user("a"), bot("b"), user("c"), bot("e")]}]),
    "hh": ("hh", [
        {"chosen": f"{H} Hi{A} Hello! How can I help?", "rejected": f"{H} Hi{A} Go away."},
        {"chosen": f"{H} What is 2+2?{A} 4.{H} And 3+3?{A} It is 6.", "rejected": f"{H} What is 2+2?{A} 4.{H} And 3+3?{A} It is 7."}]),
    "rankings": ("rankings", [
        {"item_id": "x", "prompt": "p", "completions": ["a", "b", "c"], "labeler_id": "u1", "ranking": [[1], [0, 2]],
         "criterion": "overall", "strengths": ["slightly"]},
        {"item_id": "x", "prompt": "p", "completions": ["a", "b", "c"], "labeler_id": "u2", "ranking": [[2], [1], [0]],
         "criterion": "overall", "strengths": None}]),
    "rated": ("rated", [
        {"prompt": "Write a haiku", "completions": ["one", "two", "three", "four"], "ratings": [4, 2, 4, 1]},
        {"prompt": "Hi", "completions": ["Hello", "Bye"], "ratings": [5.0, 1.5], "labeler_id": "gpt-4"}]),
    "rated-conversational": ("rated", [
        {"prompt": [user("Hi")], "completions": [[bot("Hello")], [bot("Bye")]], "ratings": [5.0, 1.5],
         "criterion": "helpfulness", "labeler_id": "gpt-4"}]),
    "ultrafeedback": ("ultrafeedback", [
        {"source": "evol", "instruction": "Name a prime.", "models": ["m1", "m2", "m3"], "completions": [
            {"model": "m1", "response": "7", "overall_score": 9.0, "annotations": {"honesty": {"Rating": "5"}}},
            {"model": "m2", "response": "8", "overall_score": 2.5},
            {"model": "m3", "response": "11", "overall_score": 9.0}]},
        {"instruction": "Say hi.", "completions": [{"response": "hi", "overall_score": 5}, {"response": "no", "overall_score": 1}]}]),
    "sft-standard": ("sft", [
        {"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "Q: hi\nA:", "completion": " hello", "item_id": 7}]),
    "sft-conversational": ("sft", [
        {"prompt": [user("Hi"), bot("Hello"), user("Name a color")], "completion": [bot("Red.")]}]),
    "messages": ("messages", [
        {"messages": [{"role": "system", "content": "Be kind."}, user("Hi"), bot("Hello!"), user("Bye"), bot("Goodbye!")]},
        {"messages": [user("2+2?"), bot("4")]}]),
    "prompts": ("prompts", [{"prompt": "Tell me a joke."}, {"prompt": "Hi", "item_id": "p2"}]),
    "prompts-conversational": ("prompts", [{"prompt": [user("Tell me a joke.")]}, {"prompt": [user("Hi")], "item_id": 3}]),
    "txt": ("txt", ["Tell me a joke.", "What is the capital of France?"]),
}


def write_rows(path: Path, rows) -> Path:
    """Rows as a file in the container its suffix names, written here without rlhfkit."""
    if path.suffix == ".txt":
        path.write_text("\n".join(rows) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def containers_for(sample):
    return [".txt"] if sample == "txt" else [".jsonl", ".json", ".parquet", ""]


@pytest.mark.parametrize("sample,suffix", [(s, x) for s in SAMPLES for x in containers_for(s)])
def test_every_format_round_trips_and_is_detected(tmp_path, sample, suffix):
    """read -> write (same format, same container) -> read gives the same records; the format is told
    from the fields, on the file written by hand and on the file rlhfkit wrote."""
    fmt, rows = SAMPLES[sample]
    src = write_rows(tmp_path / f"in{suffix}", rows)
    first = read_data(src)
    assert first.format == fmt and first.records
    out = tmp_path / f"out{suffix}"
    save_records(out, first.records, fmt)
    again = read_data(out)
    assert again.format == fmt
    assert again.records == first.records


def test_comparisons_and_rankings_read_exactly_what_the_rows_say(tmp_path):
    src = write_rows(tmp_path / "c.jsonl", SAMPLES["comparisons"][1])
    assert load_pairs(src)[0] == Comparison("a", "2+2=", " 4", " 5", 0.5, ["u1"], "helpfulness")
    src = write_rows(tmp_path / "r.jsonl", SAMPLES["rankings"][1])
    assert load_rankings(src)[0] == RankingRecord("x", "p", ["a", "b", "c"], "u1", [[1], [0, 2]], "overall", ["slightly"])


def test_trl_records_and_derived_item_ids(tmp_path):
    pairs = load_pairs(write_rows(tmp_path / "t.jsonl", SAMPLES["trl-standard"][1]))
    assert pairs[0] == Comparison(prompt_item_id("The sky is"), "The sky is", " blue.", " green.")
    assert pairs[1].item_id == "mine" and pairs[1].margin == 1.0
    conv = load_pairs(write_rows(tmp_path / "c.json", SAMPLES["trl-conversational"][1]))
    assert conv[0].prompt[0] == {"role": "system", "content": "Be brief.", "name": "sys"}  # extra keys kept
    assert conv[0].chosen == [bot("Blue.")] and conv[1].criterion == "honesty"
    # The same prompt is the same item, so a held-out split by item never splits a prompt's pairs.
    same = load_pairs(write_rows(tmp_path / "s.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                       {"prompt": "p", "chosen": "a", "rejected": "c"}]))
    assert same[0].item_id == same[1].item_id == prompt_item_id("p")


def test_parquet_null_padding_of_message_keys_is_dropped(tmp_path):
    """Parquet gives every message every key of its column (null where absent); reading drops the nulls."""
    rows = SAMPLES["trl-conversational"][1]
    pairs = load_pairs(write_rows(tmp_path / "c.parquet", rows))
    assert pairs[1].prompt == [user("Where is the sun?")]  # no "name": None


def test_ultrafeedback_binarized_conversations_that_repeat_the_prompt(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: a text prompt, and chosen/rejected that repeat it as a user turn."""
    row = {"prompt": "Hi", "chosen": [user("Hi"), bot("Hello")], "rejected": [user("Hi"), bot("Go")],
           "score_chosen": 8.0, "score_rejected": 3.0}
    (pair,) = load_pairs(write_rows(tmp_path / "b.jsonl", [row]))
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user("Hi")], [bot("Hello")], [bot("Go")])
    row = {"prompt": [user("Hi")], "chosen": "Hello", "rejected": "Go"}  # text replies to a conversation
    assert load_pairs(write_rows(tmp_path / "m.jsonl", [row]))[0].chosen == [bot("Hello")]


# ----------------------------------------------------------------------------------------------------
# Implicit prompts


@pytest.mark.parametrize("chosen_reply,rejected_reply", [
    (" Hello!", " Go away."),
    (" I think it is 6.", " I think it is 7."),  # the replies share their first words
    (" Yes.", " Yes. And more."),  # one reply is a prefix of the other
    (" Sure.\n\nHuman is a word.", " No."),  # a reply holding a marker-like text
])
def test_hh_prompt_is_the_shared_prefix_up_to_the_last_assistant_turn(chosen_reply, rejected_reply):
    prompt = f"{H} What is 2+2?{A} 4.{H} And 3+3?{A}"  # multi-turn: an earlier assistant turn in the prompt
    assert split_hh(prompt + chosen_reply, prompt + rejected_reply, "x") == (prompt, chosen_reply, rejected_reply)


def test_hh_errors_and_round_trip(tmp_path):
    with pytest.raises(DataError, match="share no '\\\\n\\\\nAssistant:' turn"):
        split_hh(f"{H} a{A} b", f"{H} c{A} b", "f:3")
    with pytest.raises(DataError, match="identical"):
        split_hh(f"{H} a{A} b", f"{H} a{A} b", "f:3")
    rows = SAMPLES["hh"][1]
    pairs = load_pairs(write_rows(tmp_path / "hh.jsonl", rows))
    assert pairs[1].prompt == f"{H} What is 2+2?{A} 4.{H} And 3+3?{A}" and pairs[1].chosen == " It is 6."
    save_records(tmp_path / "out.jsonl", pairs, "hh")
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written == rows  # the very transcripts
    with pytest.raises(DataError, match=r"record 1 .*cannot be written as 'hh'.*ending with"):
        save_records(tmp_path / "bad.jsonl", [Comparison("a", "plain prompt", "x", "y")], "hh")
    assert not list(tmp_path.glob("bad*")) and not list(tmp_path.glob(".bad*"))  # nothing half-written


def test_trl_implicit_prompts():
    pairs = [p for s in ("trl-implicit-standard", "trl-implicit-conversational") for p in
             [FORMATS["trl-implicit"].parse(r, "f:1")[0] for r in SAMPLES[s][1]]]
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("The sky is", " blue.", " green.")
    assert (pairs[1].prompt, pairs[1].chosen) == ("Water is", " wet")
    assert pairs[2].prompt == [user("Sky color?")] and pairs[2].chosen == [bot("Blue.")]
    assert pairs[3].prompt == [user("a"), bot("b"), user("c")] and pairs[3].rejected == [bot("e")]
    # Conversations that part at a user turn: the replies begin at the assistant turn before it.
    (p,) = FORMATS["trl-implicit"].parse({"chosen": [user("a"), bot("b"), user("c"), bot("d")],
                                         "rejected": [user("a"), bot("b"), user("x"), bot("d")]}, "f:1")
    assert p.prompt == [user("a")] and p.chosen == [bot("b"), user("c"), bot("d")]


def test_implicit_prompts_match_trl_extract_prompt():
    """TRL's extract_prompt on the cases where both rules apply: texts that part at a word, conversations that
    part at an assistant message. (TRL cuts mid-word, "The c" | "at"; rlhfkit cuts at the word: docs/data.md.)"""
    extract_prompt = pytest.importorskip("trl.data_utils").extract_prompt
    rows = [r for s in ("trl-implicit-standard", "trl-implicit-conversational") for r in SAMPLES[s][1]]
    rows.append({"chosen": f"{H} Hi{A} Hello!", "rejected": f"{H} Hi{A} Go away."})
    for row in rows:
        (pair,) = FORMATS["trl-implicit"].parse(row, "f:1")
        assert (pair.prompt, pair.chosen, pair.rejected) == tuple(extract_prompt(dict(row)).values())


def test_implicit_writer_refuses_a_prompt_it_would_not_find_again(tmp_path):
    same_start = Comparison("i", "Q:", " yes it is", " yes it isn't")  # read back, the prompt would be "Q: yes it"
    with pytest.raises(DataError, match="record 1 .*would not be found again.*'trl' format"):
        save_records(tmp_path / "o.jsonl", [same_start], "trl-implicit")
    save_records(tmp_path / "o.jsonl", [same_start], "trl")  # the explicit prompt holds it
    assert load_pairs(tmp_path / "o.jsonl") == [same_start]


# ----------------------------------------------------------------------------------------------------
# Ratings -> rankings (ties kept) -> pairs (ties dropped)


def test_ratings_keep_ties_in_rankings_and_drop_them_from_pairs(tmp_path):
    src = write_rows(tmp_path / "uf.jsonl", SAMPLES["rated"][1][:1])
    (r,) = load_rankings(src)
    assert r.ranking == [[0, 2], [1], [3]] and r.labeler_id == "ratings"
    pairs = {(p.chosen, p.rejected) for p in load_pairs(src)}
    assert pairs == {("one", "two"), ("three", "two"), ("one", "four"), ("three", "four"), ("two", "four")}
    raw = load_rankings(write_rows(tmp_path / "raw.jsonl", SAMPLES["ultrafeedback"][1]))
    assert raw[0].prompt == "Name a prime." and raw[0].completions == ["7", "8", "11"] and raw[0].ranking == [[0, 2], [1]]
    assert {(p.chosen, p.rejected) for p in load_pairs(tmp_path / "raw.jsonl")} == {("7", "8"), ("11", "8"), ("hi", "no")}


def test_a_repeated_prompt_with_other_completions_is_another_item(tmp_path):
    rows = [{"prompt": "p", "completions": ["a", "b"], "ratings": [2, 1]},
            {"prompt": "p", "completions": ["c", "d"], "ratings": [1, 2]},
            {"prompt": "p", "completions": ["a", "b"], "ratings": [1, 2]}]
    src = write_rows(tmp_path / "r.jsonl", rows)
    ids = [r.item_id for r in load_rankings(src)]
    assert ids == [prompt_item_id("p"), prompt_item_id("p") + "#2", prompt_item_id("p")]
    save_records(tmp_path / "o.jsonl", load_rankings(src), "rated")
    assert load_rankings(tmp_path / "o.jsonl") == load_rankings(src)
    # An item id given by the file is the file's word: other completions under it are an error.
    rows = [{**r, "item_id": "x"} for r in rows]
    expect_error(write_rows(tmp_path / "x.jsonl", rows), "x.jsonl:2: field 'completions' differs from that of item 'x'")


def test_ratings_per_criterion(tmp_path):
    row = {"prompt": "p", "completions": ["a", "b", "c"], "ratings": {"helpfulness": [3, 1, 2], "harmlessness": [1, 1, 2]}}
    src = write_rows(tmp_path / "r.jsonl", [row])
    rankings = load_rankings(src)
    assert [(r.criterion, r.ranking) for r in rankings] == [("helpfulness", [[0], [2], [1]]), ("harmlessness", [[2], [0, 1]])]
    pairs = load_pairs(src)
    assert sorted((p.criterion, p.chosen, p.rejected) for p in pairs) == [
        ("harmlessness", "c", "a"), ("harmlessness", "c", "b"),
        ("helpfulness", "a", "b"), ("helpfulness", "a", "c"), ("helpfulness", "c", "b")]


def test_rankings_with_several_labelers_give_majority_pairs_and_strength_margins(tmp_path):
    rows = [{"item_id": "x", "prompt": "p", "completions": ["a", "b", "c"], "labeler_id": f"u{n}", "ranking": rk,
             "strengths": st} for n, (rk, st) in enumerate([([[0], [1], [2]], ["significantly", "slightly"]),
                                                             ([[0], [2], [1]], None), ([[1], [0], [2]], None)])]
    pairs = load_pairs(write_rows(tmp_path / "r.jsonl", rows))
    got = {(p.chosen, p.rejected): (p.labeler_ids, p.margin) for p in pairs}
    # a > b: u0, u1 (2 of 3); a > c: all; b > c: u0, u2. u0's margin: the strongest step between the two.
    assert got == {("a", "b"): (["u0", "u1"], 1.0), ("a", "c"): (["u0", "u1", "u2"], 1.0), ("b", "c"): (["u0", "u2"], 1 / 3)}


# ----------------------------------------------------------------------------------------------------
# SFT and prompts


def test_demonstrations(tmp_path):
    (d,) = load_demonstrations(write_rows(tmp_path / "m.jsonl", SAMPLES["messages"][1][:1]))
    assert d.prompt == [{"role": "system", "content": "Be kind."}, user("Hi")]
    assert d.completion == [bot("Hello!"), user("Bye"), bot("Goodbye!")]
    text = load_demonstrations(write_rows(tmp_path / "s.jsonl", SAMPLES["sft-standard"][1]))
    assert text[1] == Demonstration("7", "Q: hi\nA:", " hello")
    # A text demonstration written as `messages` becomes one user and one assistant turn.
    save_records(tmp_path / "conv.jsonl", text, "messages")
    assert load_demonstrations(tmp_path / "conv.jsonl")[0].completion == [bot(" 4")]


def test_prompts_from_any_file(tmp_path):
    assert [p.prompt for p in load_prompts(write_rows(tmp_path / "p.txt", SAMPLES["txt"][1]))] == SAMPLES["txt"][1]
    pairs = write_rows(tmp_path / "pairs.jsonl", SAMPLES["trl-standard"][1])
    assert [p.prompt for p in load_prompts(pairs)] == ["The sky is", "The sky is"]  # two items (one has its own id)
    rows = [{"messages": [user("Hi")]}, {"messages": [user("2+2?"), bot("4"), user("and 3+3?")]}]
    prompts = load_prompts(write_rows(tmp_path / "m.jsonl", rows))  # conversations without replies are prompts
    assert [p.prompt for p in prompts] == [[user("Hi")], [user("2+2?")]]
    save_records(tmp_path / "out.txt", load_prompts(pairs))
    assert (tmp_path / "out.txt").read_text() == "The sky is\nThe sky is\n"


# ----------------------------------------------------------------------------------------------------
# Chat templates: ids and the assistant-turn loss mask

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")
# Renders only the last assistant turn's content: earlier turns change once a later one is added.
LAST_ONLY = ("{% for m in messages %}{{ m['role'] }}\n{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}"
             "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}assistant\n{% endif %}")


def chat_tokenizer(template):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "user assistant system : hi hello how are you fine thanks what is two plus one three be kind".split()
    special = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(special + ["\n", " "] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|:"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=template)


def learned(tok, ids, mask):
    """The learned tokens, one string per run of mask 1."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(tok.convert_ids_to_tokens(i))
        elif cur:
            runs, cur = runs + ["".join(cur)], []
    return runs + (["".join(cur)] if cur else [])


def test_chat_mask_covers_the_assistant_turns_and_their_end_of_turn():
    from rlhfkit.data.chat import encode_chat, encode_chat_prompt, end_of_turn_ids

    tok = chat_tokenizer(CHATML)
    assert end_of_turn_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    prompt = [{"role": "system", "content": "be kind"}, user("hi how are you")]
    completion = [bot("fine thanks"), user("what is two plus one"), bot("three")]
    ids, mask = encode_chat(tok, prompt, completion)
    assert len(ids) == len(mask)
    assert learned(tok, ids, mask) == ["fine thanks<|im_end|>", "three<|im_end|>"]  # not the "\n" after <|im_end|>
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's BOS, once
    p = encode_chat_prompt(tok, prompt)
    assert ids[: len(p)] == p and tok.convert_ids_to_tokens(p[-3:]) == ["<|im_start|>", "assistant", "\n"]
    assert "".join(tok.convert_ids_to_tokens(ids)) == tok.apply_chat_template(prompt + completion, tokenize=False)
    # Assistant turns inside the prompt are context, not learned.
    ids, mask = encode_chat(tok, prompt + completion[:2], completion[2:])
    assert learned(tok, ids, mask) == ["three<|im_end|>"]


def test_chat_segments_match_trl_apply_chat_template():
    """The prompt segment and the reply text are exactly TRL's rendering of a conversational example."""
    apply_chat_template = pytest.importorskip("trl.data_utils").apply_chat_template
    from rlhfkit.data.chat import chat_segments

    tok = chat_tokenizer(CHATML)
    prompt, completion = [user("hi how are you")], [bot("fine"), user("what"), bot("three")]
    segments = chat_segments(tok, prompt, completion)
    trl = apply_chat_template({"prompt": prompt, "completion": completion}, tok)
    assert segments[0] == (trl["prompt"], False)
    assert "".join(text for text, _ in segments[1:]) == trl["completion"]


def test_chat_template_without_end_of_turn_gets_eos_and_bad_templates_are_refused():
    from rlhfkit.core.errors import RlhfkitError
    from rlhfkit.data.chat import encode_chat, end_of_turn_ids

    tok = chat_tokenizer(PLAIN)
    assert end_of_turn_ids(tok) == [tok.eos_token_id]
    ids, mask = encode_chat(tok, [user("hi")], [bot("hello")])
    assert learned(tok, ids, mask) == [" hello\n</s>"]
    with pytest.raises(RlhfkitError, match="renders earlier turns differently"):
        encode_chat(chat_tokenizer(LAST_ONLY), [user("hi")], [bot("hello"), user("hi"), bot("fine")])


# ----------------------------------------------------------------------------------------------------
# Errors name the file, the line (or record) and the field


def expect_error(path, needle, **kw):
    with pytest.raises(DataError) as e:
        read_data(path, **kw)
    assert needle in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "p", "chosen": "c"', ":3: not valid JSON"),
    ('{"prompt": "p", "chosen": "c"}', ":3: missing field 'rejected'; expected TRL preference pairs (standard or "
                                       "conversational) {prompt, chosen, rejected} (format 'trl' told from the fields of"),
    ('{"prompt": "p", "chosen": 3, "rejected": "r"}', ":3: field 'chosen' must be a string or a list"),
    ('{"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}', ":3: field 'prompt', message 0: 'content' must be a string"),
    ('{"prompt": [], "chosen": "c", "rejected": "r"}', ":3: field 'prompt' must be a string or a list of {role, content} messages, got an empty list"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "c"}], "rejected": "r"}',
     ":3: field 'chosen' must be the assistant's reply"),
    ('{"prompt": "p", "chosen": "c", "rejected": "c"}', ":3: 'chosen' and 'rejected' are identical"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, needle):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n\n" + line + "\n")
    msg = expect_error(path, needle)
    assert msg.startswith(str(path))


def test_bad_records_in_other_formats_and_containers(tmp_path):
    rows = [{"item_id": "x", "prompt": "p", "completions": ["a", "b"], "labeler_id": "u", "ranking": [[0], [0]]}]
    expect_error(write_rows(tmp_path / "r.json", rows), "r.json: record 1: field 'ranking': [0, 0] is not a permutation")
    rows = [{"prompt": "p", "completions": ["a", "b"], "ratings": [1]}]
    expect_error(write_rows(tmp_path / "u.parquet", rows), "u.parquet: record 1: field 'ratings' must list 2 numbers")
    rows = [{"instruction": "p", "completions": [{"response": "a", "overall_score": 1}, {"response": "b"}]}]
    expect_error(write_rows(tmp_path / "uf.jsonl", rows), ":1: completions[1]: missing field 'overall_score'")
    expect_error(write_rows(tmp_path / "m.jsonl", [{"messages": [user("hi")]}]), ":1: field 'messages' has no assistant message")
    expect_error(write_rows(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}]), "cannot tell the format from the fields ['answer', 'question']")
    expect_error(write_rows(tmp_path / "h.jsonl", [{"chosen": f"{H} a{A} b", "rejected": f"{H} c{A} d"}]), "share no")
    (tmp_path / "e.jsonl").write_text("\n\n")
    expect_error(tmp_path / "e.jsonl", "e.jsonl: holds no records")
    (tmp_path / "l.json").write_text('{"prompt": "p"}')
    expect_error(tmp_path / "l.json", "must hold a list of records")
    expect_error(tmp_path / "nope.jsonl", "no such file")
    expect_error(tmp_path / "e.jsonl", "unknown format 'alpaca'", fmt="alpaca")
    (tmp_path / "f.csv").write_text("a,b\n")
    expect_error(tmp_path / "f.csv", "unknown file type '.csv'")
    # A format given that the rows do not fit says what that format expects.
    path = write_rows(tmp_path / "s.jsonl", SAMPLES["sft-standard"][1])
    expect_error(path, "missing field 'chosen'; expected TRL preference pairs with an implicit prompt {chosen, rejected} "
                       "(format 'trl-implicit')", fmt="trl-implicit")
    with pytest.raises(DataError, match="holds SFT demonstrations, not preference pairs"):
        load_pairs(path)


def test_a_parquet_column_of_mixed_types_is_refused_whole(tmp_path):
    records = [PromptRecord("a", "text"), PromptRecord("b", [user("conversation")])]
    with pytest.raises(DataError, match="do not fit one Arrow table.*write .jsonl instead"):
        save_records(tmp_path / "p.parquet", records)
    assert list(tmp_path.iterdir()) == []


def test_missing_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "p.parquet", [{"prompt": "x"}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    expect_error(path, "pip install 'rlhfkit[data]'")


def test_datasets_directories(tmp_path):
    """A DatasetDict picks `train` (or --split); what rlhfkit writes, datasets.load_from_disk reads."""
    datasets = pytest.importorskip("datasets")
    rows = SAMPLES["trl-standard"][1][:1]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(SAMPLES["hh"][1])}).save_to_disk(str(tmp_path / "dd"))
    assert read_data(tmp_path / "dd").format == "trl"
    assert read_data(tmp_path / "dd", split="test").format == "hh"
    expect_error(tmp_path / "dd", "no split 'validation'", split="validation")
    save_records(tmp_path / "out", load_pairs(tmp_path / "dd", split="test"), "hh")
    assert datasets.load_from_disk(str(tmp_path / "out")).to_list() == SAMPLES["hh"][1]
    save_records(tmp_path / "out", load_pairs(tmp_path / "dd"))  # replaces the directory whole
    assert datasets.load_from_disk(str(tmp_path / "out"))[0]["prompt"] == "The sky is"


# ----------------------------------------------------------------------------------------------------
# The commands


def test_cli_convert_and_check(tmp_path, capsys):
    src = write_rows(tmp_path / "uf.jsonl", SAMPLES["rated"][1])
    assert cli_main(["data", "convert", str(src), str(tmp_path / "pairs.parquet"), "--to", "trl"]) == 0
    assert "2 records (rated)" in capsys.readouterr().out
    assert len(load_pairs(tmp_path / "pairs.parquet")) == 5 + 1
    assert cli_main(["data", "check", str(src), "--as", "pairs"]) == 0
    out = capsys.readouterr().out
    assert "format: rated (told from the fields of" in out and "holds: 2 rankings" in out and "as preference pairs: 6" in out
    assert "no problems" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}), "{oops",
                              json.dumps({"prompt": "p", "chosen": "a"}), json.dumps({"prompt": "p", "chosen": "a", "rejected": "c"})]))
    assert cli_main(["data", "check", str(bad)]) == 2  # bad input: the CLI's documented status
    out = capsys.readouterr().out
    assert "holds: 2 preference pairs" in out and "problems: 2" in out
    assert f"{bad}:2: not valid JSON" in out and f"{bad}:3: missing field 'rejected'" in out
    assert cli_main(["data", "convert", str(bad), str(tmp_path / "o.jsonl")]) == 2
    assert f"error: {bad}:2: not valid JSON" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()
    assert cli_main(["data", "formats"]) == 0 and "ultrafeedback" in capsys.readouterr().out


def test_data_commands_do_not_import_torch_or_pyarrow():
    code = ("import sys; from rlhfkit.data.cli import main; main(['formats']); import rlhfkit.data.load, rlhfkit.data.chat;"
            "print(sorted(m for m in ('torch', 'pyarrow', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


def test_docs_show_every_format_and_record():
    text = DOCS.read_text()
    for name in FORMATS:
        assert re.search(rf"^### `{re.escape(name)}`", text, flags=re.M), f"docs/data.md: no section for format {name}"
    for cls, heading in ((Demonstration, "## Demonstration record"), (PromptRecord, "## Prompt record")):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        assert set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M)) == set(cls.__dataclass_fields__), cls.__name__
    assert "rlhfkit data convert" in text and "rlhfkit data check" in text


# ---------------------------------------------------------------- UltraFeedback's scores


def _uf_completion(response, overall, ratings=None, **extra):
    c = {"response": response, "overall_score": overall, **extra}
    if ratings is not None:
        c["annotations"] = {a: {"Rating": str(r), "Rationale": "..."} for a, r in
                            zip(("helpfulness", "honesty", "instruction_following", "truthfulness"), ratings)}
    return c


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ultrafeedback_score_that_is_not_finite_is_an_error_not_the_best(tmp_path, bad):
    """A NaN overall_score compares False with everything, so ranking by it put the NaN completion first."""
    path = tmp_path / "uf.jsonl"
    rows = [{"instruction": "p", "completions": [_uf_completion("good", 9.0), _uf_completion("nan", bad)]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # json writes NaN / Infinity, as Python reads them
    with pytest.raises(DataError, match=r"uf.jsonl:1.*completions\[1\].*'overall_score' is .*not a finite number"):
        load_rankings(path)


def test_ultrafeedback_fine_ranks_by_the_mean_of_the_four_ratings(tmp_path):
    """overall_score says a > b; the four ratings say b > a (means 2.0 and 4.25): 'ultrafeedback' ranks by the first,
    'ultrafeedback-fine' by the second (ultrafeedback_binarized's rule); fine-grained_score stands in for
    missing annotations."""
    rows = [{"instruction": "p", "completions": [_uf_completion("a", 9.0, [2, 2, 2, 2]),
                                                 _uf_completion("b", 3.0, [5, 4, 4, 4])]},
            {"instruction": "q", "completions": [_uf_completion("c", 1.0, **{"fine-grained_score": 4.5}),
                                                 _uf_completion("d", 8.0, **{"fine-grained_score": 1.0})]}]
    src = write_rows(tmp_path / "uf.jsonl", rows)
    assert [r.ranking for r in load_rankings(src)] == [[[0], [1]], [[1], [0]]]
    assert [r.ranking for r in load_rankings(src, fmt="ultrafeedback-fine")] == [[[1], [0]], [[0], [1]]]
    assert {(p.chosen, p.rejected) for p in load_pairs(src, fmt="ultrafeedback-fine")} == {("b", "a"), ("c", "d")}


def test_ultrafeedback_fine_names_a_rating_that_is_not_a_number(tmp_path):
    rows = [{"instruction": "p", "completions": [_uf_completion("a", 9.0, [2, "N/A", 2, 2]),
                                                 _uf_completion("b", 3.0, [5, 4, 4, 4])]}]
    src = write_rows(tmp_path / "uf.jsonl", rows)
    with pytest.raises(DataError, match=r"completions\[0\]: annotations.honesty.Rating = 'N/A' is not a number"):
        load_rankings(src, fmt="ultrafeedback-fine")
