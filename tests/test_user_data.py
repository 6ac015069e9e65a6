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
