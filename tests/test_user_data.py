"""Your model, your data: a local Llama-style model directory with a chat template (built here with
`tokenizers`), SFT conversations, a prompt file and a preference file in TRL's conversational, Anthropic HH
or UltraFeedback format run SFT -> reward model -> PPO -> eval and the report from one TOML file, without
a built-in task (`task = "none"`)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from rlhfkit.core.errors import ConfigError
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import pipeline_stages, run_pipeline

pytestmark = pytest.mark.slow
THREADS = int(os.environ.get("RLHFKIT_TEST_THREADS", "1"))
_spec = importlib.util.spec_from_file_location("user_data", Path(__file__).resolve().parents[1] / "benchmarks" / "user_data.py")
user_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(user_data)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    return d, user_data.make_user_files(d)


TINY = {"sft": {"epochs": 2, "batch_size": 32}, "reward": {"epochs": 2},
        "ppo": {"total_steps": 4, "rollout_batch_size": 32, "minibatch_size": 16},
        "eval": {"n_prompts": 50, "dist_samples": 50}}


@pytest.mark.parametrize("preferences", ["trl.jsonl", "hh.jsonl", "ultrafeedback.jsonl"])
def test_user_model_and_files_end_to_end(files, preferences):
    d, model_dir = files
    cfg = load_config(user_data.write_config(d, model_dir, preferences, THREADS, TINY))
    assert pipeline_stages(cfg) == ["sft", "reward", "ppo", "eval"]  # the preference file replaces feedback
    out = d / f"out-{preferences}"
    summary = run_pipeline(cfg, out)
    ev = summary["eval"]
    assert {"sft", "ppo"} <= set(ev) and ev["sft"]["kl"] == pytest.approx(0.0, abs=1e-6) and ev["ppo"]["kl"] > 0
    assert summary["reward"]["n_train"] > 0 and 0.0 <= summary["reward"]["heldout_accuracy"] <= 1.0
    assert (out / "eval" / "report.md").is_file()
    # the SFT policy answers in the chat format: sampled replies end with the template's end-of-turn token
    samples = json.loads((out / "eval" / "eval.json").read_text())["policies"]["sft"]["samples"]
    assert samples and all(isinstance(s["prompt"], list) for s in samples)


def test_task_none_needs_files_and_a_model():
    with pytest.raises(ConfigError, match="policy.path"):
        load_config(overrides=["task='none'"])
    with pytest.raises(ConfigError, match="data.sft"):
        load_config(overrides=["task='none'", "policy.path='/x'"])
    with pytest.raises(ConfigError, match="gold scorer"):
        load_config(overrides=["task='none'", "policy.path='/x'", "data.sft='a'", "data.prompts='b'"])


def test_user_model_with_files_and_simulated_feedback(files):
    """The same model directory with plain-text SFT and prompt files on the digits task: the feedback stage
    samples the SFT policy on the file's prompts (through the chat template) and the task's simulated labelers
    rank them, then RM -> PPO -> eval with gold metrics."""
    d, model_dir = files
    budget = {**TINY, "feedback": {"n_prompts": 100}, "sft": {"epochs": 2, "batch_size": 32, "n_demos": 600}}
    cfg = load_config(user_data.write_config(d, model_dir, None, THREADS, budget))
    assert pipeline_stages(cfg) == ["sft", "feedback", "reward", "ppo", "eval"]
    out = d / "out-feedback"
    summary = run_pipeline(cfg, out)
    assert summary["feedback"]["n_comparisons"] > 0 and summary["sft"]["n_demos"] < 600  # the file's training part
    assert "preferred_first_rate" in summary["eval"]["ppo"] and summary["eval"]["ppo"]["kl"] > 0
    prompts = {line for line in (d / "prompts.txt").read_text().splitlines()}
    ranked = [json.loads(line) for line in (out / "feedback" / "rankings.jsonl").read_text().splitlines()]
    assert ranked and all(r["prompt"] in prompts for r in ranked)  # the feedback prompts came from the file


def test_context_length_is_checked_before_anything_runs(tmp_path, tiny_policy_dir):
    """A local model with 32 positions and the default response budget (64 with task = 'none') cannot sample:
    said before SFT, not after SFT and the reward model have run (as it was: "prompt length 10 + max_new_tokens 64
    exceeds the model's 64 positions" from the sampler)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"{a} {b} {c} {a} =" for a in range(10) for b in range(3) for c in range(2)) + "\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"{a} {a} =", "completion": f" {a}"}) + "\n" for a in range(10)) * 3)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"{a} =", "chosen": " 1", "rejected": " 2"}) + "\n" for a in range(10)))
    base = ["task='none'", f"policy.path='{tiny_policy_dir}'", f"data.sft='{sft}'", f"data.prompts='{prompts}'",
            f"reward.data='{prefs}'", "device='cpu'"]
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"has 32 positions, but the longest prompt of data.prompts = .* takes 6 tokens "
                                          r".*data.max_new_tokens \(0: the task's 64\) = 64 more, and the reward "
                                          r"model reads an EOS after a reply cut there: 6 \+ 64 \+ 1 > 32\. Set "
                                          r"data.max_new_tokens to at most 25"):
        run_pipeline(load_config(overrides=base), out)
    assert not (out / "sft").exists() and not (out / ".partial").exists()  # nothing ran
    # DPO alone never samples before the evaluation, which is still checked; a budget that fits passes the check
    with pytest.raises(ConfigError, match="longest prompt"):
        run_pipeline(load_config(overrides=base + ["method='dpo'"]), out)
    long_demo = tmp_path / "long.jsonl"
    long_demo.write_text("".join(json.dumps({"prompt": "1 " * 40 + f"{a % 10} {a // 10} =", "completion": " 1"}) + "\n"
                                 for a in range(30)))
    with pytest.raises(ConfigError, match="longest demonstration of data.sft"):
        run_pipeline(load_config(overrides=base + [f"data.sft='{long_demo}'", "data.max_new_tokens=4"]), out)


def test_compare_without_a_gold_scorer(files, capsys):
    """`rlhfkit compare` with task = 'none' and a preference file: the reward model judges alone (said before
    anything trains), and no gold matrix or ladder is asked of a task that has no gold scorer (it used to train
    every method and then fail at the gold head-to-head)."""
    from rlhfkit.pipeline.compare import run_compare

    d, model_dir = files
    path = user_data.write_config(d, model_dir, "trl.jsonl", THREADS, {**TINY, "dpo": {"epochs": 1},
                                                                        "best_of_n": {"n_prompts": 16}})
    cfg = load_config(path, ["compare.methods=['dpo', 'best_of_n']"])
    out = d / "compare"
    run_compare(cfg, out)
    assert "judges will be reward model (task = 'none' has no gold scorer)" in capsys.readouterr().out
    saved = json.loads((out / "compare" / "compare.json").read_text())
    assert list(saved["win_rates"]) == ["reward model"] and list(saved["elo"]) == ["reward model"]
    rates = saved["win_rates"]["reward model"]
    assert rates["dpo"]["sft"] + rates["sft"]["dpo"] == pytest.approx(1.0)
    report = (out / "compare" / "report.md").read_text()
    assert "No gold judge" in report and "By the task's gold score" not in report
