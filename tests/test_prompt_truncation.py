"""data.max_prompt_length: a too-long prompt is cut on the stated side (rlhfkit.data.batching.truncate_prompt), its
template kept whole, and a run on a file of long prompts is told how many were cut before anything trains."""

import json

import pytest

from rlhfkit.core.errors import ConfigError, DataError
from rlhfkit.data.batching import encode_prompt, truncate_prompt
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import preflight

LONG = " ".join(["the quick brown fox"] * 6) + " hello world"


def test_short_prompt_is_untouched(chat_tokenizer):
    assert truncate_prompt(chat_tokenizer, "hello world", 200) == ("hello world", False)


@pytest.mark.parametrize("side", ["left", "right"])
def test_plain_prompt_is_cut_to_the_limit_on_its_side(chat_tokenizer, side):
    full = len(encode_prompt(chat_tokenizer, LONG))
    limit = full - 7
    cut, was_cut = truncate_prompt(chat_tokenizer, LONG, limit, side)
    assert was_cut and len(encode_prompt(chat_tokenizer, cut)) <= limit
    assert len(encode_prompt(chat_tokenizer, cut)) >= limit - 2  # cut no more than it must (a decode can merge)
    words = cut.split()
    if side == "left":  # the end, next to the reply, stays
        assert LONG.endswith(cut.strip()) and words[-2:] == ["hello", "world"]
    else:
        assert LONG.startswith(cut.strip()) and words[:2] == ["the", "quick"]
    # the template stays whole: the rendered prompt still opens the assistant's turn
    assert chat_tokenizer.decode(encode_prompt(chat_tokenizer, cut)).rstrip().endswith("assistant")


def test_conversation_loses_its_oldest_turns_first_and_keeps_the_system_message(chat_tokenizer):
    conv = [{"role": "system", "content": "be kind"}, {"role": "user", "content": LONG},
            {"role": "assistant", "content": "four"}, {"role": "user", "content": "what is two plus two?"}]
    last_two = conv[:1] + conv[2:]
    limit = len(encode_prompt(chat_tokenizer, last_two))
    cut, was_cut = truncate_prompt(chat_tokenizer, conv, limit)
    assert was_cut and cut == last_two  # the long first user turn went whole; the system message stayed
    only_last = conv[:1] + conv[3:]
    cut, _ = truncate_prompt(chat_tokenizer, conv, len(encode_prompt(chat_tokenizer, only_last)) - 2)
    assert cut[0] == conv[0] and len(cut) == 2 and cut[1]["role"] == "user"
    assert "two?".endswith(cut[1]["content"].split()[-1]) or cut[1]["content"].endswith("?")


def test_a_limit_below_the_template_is_an_error(chat_tokenizer):
    with pytest.raises(DataError, match="leaves no room .* raise data.max_prompt_length"):
        truncate_prompt(chat_tokenizer, LONG, 2)


def test_config_checks_the_fields():
    with pytest.raises(ConfigError, match="data.truncation_side"):
        load_config(overrides=["data.truncation_side='middle'"])
    with pytest.raises(ConfigError, match="data.max_prompt_length"):
        load_config(overrides=["data.max_prompt_length=-1"])


def test_preflight_cuts_long_prompts_of_a_file_and_says_so(tmp_path, tiny_policy_dir, capsys):
    """A file with prompts far beyond the model's 32 positions: refused before anything runs without a cut, and
    with data.max_prompt_length the preflight passes and names how many prompts it cut."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"{'1 ' * (30 if a % 3 == 0 else 1)}{a} {b} =" for a in range(10) for b in range(3)) + "\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"{a} {a} =", "completion": f" {a}"}) + "\n" for a in range(10)) * 3)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"{a} =", "chosen": " 1", "rejected": " 2"}) + "\n" for a in range(10)))
    base = ["task='none'", f"policy.path='{tiny_policy_dir}'", f"data.sft='{sft}'", f"data.prompts='{prompts}'",
            f"reward.data='{prefs}'", "device='cpu'", "data.max_new_tokens=8"]
    names = ["sft", "reward", "ppo", "eval"]
    with pytest.raises(ConfigError, match=r"cut long prompts with data.max_prompt_length \(at most 23\)"):
        preflight(load_config(overrides=base), tmp_path / "out", names)
    preflight(load_config(overrides=base + ["data.max_prompt_length=20"]), tmp_path / "out", names)
    assert "data.prompts: 12 prompt(s) longer than data.max_prompt_length = 20 tokens cut on the left" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # the preflight writes nothing
