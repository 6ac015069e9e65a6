"""Evaluation and report for any task, not only digits: reply metrics, reward sources, bounded token
distributions for a large vocabulary, conversations in the report, strict JSON (no NaN or Infinity)."""

import json
import math
import random
import re

import numpy as np
import pytest
import torch

from rlhfkit.algorithms import METHODS
from rlhfkit.core.runio import finite_or_none, mark_complete, read_json, stage_result, write_json
from rlhfkit.evaluation.evaluate import (
    TOP_K,
    TOP_POSITIONS,
    BestOfN,
    distributions_record,
    evaluate_best_of_n,
    evaluate_policy,
    reply_metrics,
    token_distributions,
)
from rlhfkit.evaluation.report import write_report
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
from rlhfkit.models.runtime import Runtime
from rlhfkit.spine.reward_sources import CombinedScorer

RT = Runtime(torch.device("cpu"), None)
# The keys evaluate_policy returned before the reply metrics, in order: benchmarks/acceptance.py, the report and
# rlhfkit compare read them, so names, order and values stay.
OLD_KEYS = ["reward", "preferred_first_rate", "later_rule_validity", "well_formed_rate", "kl", "kl_k1",
            "kl_per_position", "kl_first_position_share", "samples"]
REPLY_KEYS = ["length", "length_words", "distinct_1", "distinct_2", "repetition_rate"]


# ----------------------------------------------------------------------------------------------------
# Reply metrics


def test_reply_metrics_by_hand():
    m = reply_metrics(["a b a b", "a b c", ""], [4, 3, 0])
    # words a b a b | a b c | (none): 7 words, 3 distinct; bigrams ab ba ab | ab bc: 5, 3 distinct
    assert m == {"length": pytest.approx(7 / 3), "length_words": pytest.approx(7 / 3), "distinct_1": pytest.approx(3 / 7),
                 "distinct_2": pytest.approx(3 / 5), "repetition_rate": pytest.approx(1 / 3)}  # only "a b a b" repeats
    assert reply_metrics(["x", "y"], [1, 1])["distinct_2"] == 0.0  # no bigram spans two replies
    assert reply_metrics(["Hi hi", "hi  hi\n"], [2, 3])["distinct_1"] == pytest.approx(2 / 4)  # case kept, any space
    assert reply_metrics(["the cat the cat", "the cat the cat"], [4, 4])["distinct_2"] == pytest.approx(2 / 6)


def _sources_scorer():
    """A combination of two reward sources (reward.sources), as build_scorer makes one."""
    length = lambda prompts, texts: torch.tensor([float(len(t)) for t in texts])  # noqa: E731
    seven = lambda prompts, texts: torch.tensor([float(t[:1] == "7") for t in texts])  # noqa: E731
    return CombinedScorer({"length": length, "seven": seven}, {"length": 1.0, "seven": 2.0})


def test_evaluate_policy_adds_reply_metrics_and_source_means(digits, tokenizer, sharp_policy):
    policy, scorer = sharp_policy("gpt2"), _sources_scorer()
    prompts = digits.prompts(24, random.Random(0))
    r = evaluate_policy(policy, policy, tokenizer, scorer, digits, prompts, RT, seed=0, batch_size=10)
    texts = r["completions"]
    assert list(r) == [*OLD_KEYS, "reward/length", "reward/seven", *REPLY_KEYS, "completions"]
    assert r["reward"] == scorer(prompts, texts).mean().item()  # the value as before: the combination's mean
    assert r["reward/length"] == pytest.approx(sum(map(len, texts)) / 24)
    assert r["reward/seven"] == pytest.approx(sum(t[:1] == "7" for t in texts) / 24)
    assert r["reward"] == pytest.approx(r["reward/length"] + 2.0 * r["reward/seven"])  # the weighted sum
    # length counts the sampled tokens before the stop token: here each decodes to one word
    retokenised = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert r["length"] == pytest.approx(sum(retokenised) / 24) == pytest.approx(r["length_words"])
    assert {k: r[k] for k in REPLY_KEYS} == pytest.approx(reply_metrics(texts, retokenised))
    # a single reward model (no score_sources): no reward/<name>
    plain = evaluate_policy(policy, policy, tokenizer, lambda p, c: torch.ones(len(c)), digits, prompts, RT, seed=0)
    assert not any(k.startswith("reward/") for k in plain) and plain["reward"] == 1.0
    assert list(plain)[-len(REPLY_KEYS) - 1:-1] == REPLY_KEYS


def test_evaluate_best_of_n_adds_reply_metrics(digits, tokenizer, sharp_policy):
    policy, scorer = sharp_policy("gpt2"), _sources_scorer()
    prompts = digits.prompts(8, random.Random(1))
    r = evaluate_best_of_n(policy, tokenizer, scorer, digits, prompts, BestOfN(4, 1.0), RT, seed=0)
    texts = r["completions"]
    assert list(r) == [*OLD_KEYS, "reward/length", "reward/seven", *REPLY_KEYS, "completions"]
    assert math.isnan(r["kl_k1"]) and r["kl"] == pytest.approx(math.log(4) - 3 / 4)
    assert r["reward"] == pytest.approx(r["reward/length"] + 2.0 * r["reward/seven"])  # the picks, rescored
    assert r["length"] == pytest.approx(sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / 8)


# ----------------------------------------------------------------------------------------------------
# Token distributions: whole for a small vocabulary, top tokens of the first positions for a large one


def test_small_vocabulary_keeps_every_position_and_token(digits, tokenizer, sharp_policy):
    policy = sharp_policy("gpt2")
    f = token_distributions(policy, tokenizer, "4 5 9 1 =", 50, digits.max_new_tokens, RT, seed=0)
    assert f.shape == (digits.max_new_tokens, len(tokenizer)) and torch.all(f.sum(1) <= 1 + 1e-6)
    record = distributions_record("4 5 9 1 =", {"sft": f, "ppo": f}, tokenizer)
    assert list(record) == ["prompt", "vocab", "by_policy"]  # digits' eval.json as before
    assert record["vocab"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert record["by_policy"]["sft"] == f.tolist()


@pytest.fixture(scope="module")
def text_policy(chat_tokenizer):
    """A tiny random GPT-2 on a byte-level BPE vocabulary of a few hundred tokens (more than digits' 15)."""
    return build_tiny_policy(TinyModelSpec("gpt2", 1, 16, 2, 128), chat_tokenizer, seed=0).eval()


def test_large_vocabulary_keeps_top_tokens_of_first_positions(chat_tokenizer, text_policy):
    tok, prompt = chat_tokenizer, [{"role": "user", "content": "hello world"}]
    assert len(tok) > 64
    f = token_distributions(text_policy, tok, prompt, 40, 40, RT, seed=0)
    assert f.shape == (TOP_POSITIONS, len(tok))  # 8 of the 40 positions
    g = torch.roll(f, 1, dims=1)  # a second policy that prefers other tokens
    record = distributions_record(prompt, {"sft": f, "dpo": g}, tok)
    assert "vocab" not in record and record["top_k"] == TOP_K and record["vocab_size"] == len(tok)
    assert len(record["token_ids"]) == len(record["tokens"]) == TOP_POSITIONS
    for p, ids in enumerate(record["token_ids"]):
        assert len(ids) <= 2 * TOP_K and len(set(ids)) == len(ids)
        for name, freqs in (("sft", f), ("dpo", g)):
            assert record["by_policy"][name][p] == pytest.approx(freqs[p, ids].tolist())
            top = freqs[p].topk(TOP_K)
            assert {i for v, i in zip(top.values.tolist(), top.indices.tolist()) if v > 0} <= set(ids)
        most = [max(f[p, i].item(), g[p, i].item()) for i in ids]
        assert most == sorted(most, reverse=True)  # the most frequent first
        assert record["tokens"][p] == [tok.decode([i]) for i in ids]
    assert len(json.dumps(record)) < 20_000  # not a positions x vocabulary table


# ----------------------------------------------------------------------------------------------------
# The report of a text task


def _text_eval_result(tok) -> dict:
    """What evaluate_run returns for a DPO run on chat prompts with a large vocabulary, best-of-n beside it, read
    back from strict JSON (NaN is null there)."""
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi | twice"}]
    replies = {"sft": "hi hi <|im_end|>\nbye", "dpo": "Hello there.", "best_of_n": ""}
    kl = {"sft": [0.0] * 40, "dpo": [0.05] * 40, "best_of_n": [math.nan] * 40}

    def policy(name):
        return {"kl": sum(kl[name]), "kl_k1": math.nan if name == "best_of_n" else 0.1, "kl_per_position": kl[name],
                "kl_first_position_share": math.nan if name == "best_of_n" else 0.025,
                "samples": [{"prompt": convo, "completion": replies[name]}, {"prompt": "plain prompt", "completion": "ok"}],
                "length": 12.5, "length_words": 9.0, "distinct_1": 0.5, "distinct_2": 0.625, "repetition_rate": 0.1}

    gen = torch.Generator().manual_seed(0)
    freqs = {n: torch.softmax(torch.randn(TOP_POSITIONS, len(tok), generator=gen) * 3, dim=1) for n in ("sft", "dpo")}
    result = {"policies": {n: policy(n) for n in ("sft", "dpo", "best_of_n")},
              "distributions": distributions_record(convo, freqs, tok)}
    return json.loads(json.dumps(finite_or_none(result), allow_nan=False))


def test_text_task_report(tmp_path, chat_tokenizer):
    from PIL import Image

    (tmp_path / "eval").mkdir()
    summary = {"config": {"task": "none", "seed": 0, "dpo": {"beta": 0.1, "loss": "sigmoid"}},
               "sft": {"heldout_loss": 2.5, "loss_floor": math.nan, "excess_loss": None}}
    text = write_report(tmp_path, summary, _text_eval_result(chat_tokenizer), METHODS["dpo"],
                        tmp_path / "dpo" / "metrics.jsonl").read_text()
    # the results table: KL, length, diversity, every policy; an undefined figure is "–", never "nan"
    assert "| length | 12.500 | 12.500 | 12.500 |" in text and "| distinct_2 | 0.625 | 0.625 | 0.625 |" in text
    assert "| kl_k1 | 0.100 | 0.100 | – |" in text and "`distinct_1` / `distinct_2`" in text
    assert not re.search(r"\bnan\b", text, flags=re.I) and "| reward |" not in text  # DPO: no reward model
    assert "| sft | heldout_loss | 2.500 |" in text and "loss_floor" not in text and "excess_loss" not in text
    # no digits wording; the kept part of a large vocabulary is said
    assert "digit" not in text.lower() and "rule is kept" not in text
    assert f"keeps the first {TOP_POSITIONS} positions" in text and f"the {TOP_K} most frequent tokens" in text
    # samples: conversations as role: content lines, the policies' replies side by side on one row per prompt
    assert "| prompt | sft | dpo | best_of_n |" in text
    assert ("| system: Be brief.<br>user: Say hi \\| twice | hi hi &lt;\\|im_end\\|&gt;<br>bye | Hello there. | "
            "*(empty)* |") in text
    assert "| plain prompt | ok | ok | ok |" in text and "'role'" not in text
    # small figures: a panel per position for 8 positions, not 40 (the 14,080-pixel figure)
    for png, max_width in (("token_distributions.png", 2000), ("kl_per_position.png", 1400)):
        width, height = Image.open(tmp_path / "eval" / png).size
        assert width <= max_width and height <= 1200, (png, width, height)


# ----------------------------------------------------------------------------------------------------
# Strict JSON


def _strict_load(path):
    def refuse(name):
        raise ValueError(f"{path.name} holds {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_write_json_is_strict(tmp_path):
    obj = {"a": math.nan, "b": [math.inf, -math.inf, 1.5, (2, math.nan)], "c": {"d": np.float32("nan"), "e": True},
           "f": torch.tensor(0.25), "g": None, "h": "NaN", "i": 3}
    for name in ("summary.json", "eval.json", "compare.json"):
        write_json(tmp_path / name, obj)
        assert _strict_load(tmp_path / name) == {"a": None, "b": [None, None, 1.5, [2, None]],
                                                 "c": {"d": None, "e": True}, "f": 0.25, "g": None, "h": "NaN", "i": 3}
    with pytest.raises(TypeError):  # what JSON cannot hold still fails, as before
        write_json(tmp_path / "x.json", {"p": tmp_path})
    assert not (tmp_path / "x.json").exists()


def test_records_read_back_stay_lossless(tmp_path):
    """INPUTS.json holds the config a stage was made with (ppo.reward_threshold = inf by default) and is compared
    with the config of the next run: a null there would make every stage look stale."""
    inputs = {"ppo": {"reward_threshold": math.inf}, "rejection_sampling": {"threshold": -math.inf}}
    write_json(tmp_path / "INPUTS.json", inputs)
    assert read_json(tmp_path / "INPUTS.json") == inputs
    mark_complete(tmp_path, {"loss_floor": math.nan})
    assert math.isnan(stage_result(tmp_path)["loss_floor"])
    write_json(tmp_path / "INPUTS.json", inputs, strict=True)  # either way when asked
    assert _strict_load(tmp_path / "INPUTS.json") == {"ppo": {"reward_threshold": None}, "rejection_sampling": {"threshold": None}}
    write_json(tmp_path / "eval.json", {"a": math.nan}, strict=False)
    assert math.isnan(read_json(tmp_path / "eval.json")["a"])
