"""End-to-end plumbing on a tiny budget: outputs, reports, rerun and skip, the same seed gives the same
summary (also across processes), a killed PPO run resumes to exactly the same model, early stop, a user's
model directory. No outcome thresholds here: a tiny budget sits on a knife edge whose side depends on the
thread count and CPU kernels. The outcomes (the preferred behaviour rose, KL bounded, RM accuracy) are
asserted on the default budget in tests/test_acceptance.py, with margins measured at 1 and 2 threads."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhfkit.core.runio import read_metrics
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import pipeline_stages, run_pipeline, run_stage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
THREADS = int(os.environ.get("RLHFKIT_TEST_THREADS", "1"))  # CI checks 1 (the default) and 2
TINY = [
    "sft.n_demos=8000", "sft.epochs=1", "feedback.n_prompts=800", "reward.epochs=3",
    "ppo.total_steps=30", "ppo.rollout_batch_size=64", "ppo.minibatch_size=32", "ppo.checkpoint_every=5",
    "eval.n_prompts=400", "eval.dist_samples=200", "device='cpu'", f"threads={THREADS}",
]
STAGES = pipeline_stages(load_config(overrides=TINY))  # sft, feedback, reward, ppo, eval


def _figures(summary: dict) -> dict:
    """The summary without wall times (which differ between identical runs)."""
    drop = lambda d: {k: (drop(v) if isinstance(v, dict) else v) for k, v in d.items() if k != "wall_time_s"}  # noqa: E731
    return drop(summary)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = run_pipeline(load_config(overrides=TINY), out)
    return out, summary


def test_every_stage_complete_with_invariants(run):
    """What holds at any budget: the SFT policy is the reference (KL exactly 0), PPO moved away from it,
    no model beats the task's entropy floor, every stage is marked complete and timed."""
    out, summary = run
    sft, ppo = summary["eval"]["sft"], summary["eval"]["ppo"]
    assert sft["kl"] == pytest.approx(0.0, abs=1e-6) and sft["kl_k1"] == pytest.approx(0.0, abs=1e-6)
    assert ppo["kl"] > 0.0
    assert summary["sft"]["heldout_loss"] >= summary["sft"]["loss_floor"] - 0.01
    assert summary["ppo"]["steps"] == 30 and len(read_metrics(out / "ppo" / "metrics.jsonl")) == 30
    for stage in STAGES:
        assert (out / stage / "COMPLETE.json").is_file()
        assert 0 < summary["wall_time_s"][stage] < 3600


def test_outputs_report_and_summary(run):
    out, summary = run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["eval"]["ppo"]["preferred_first_rate"] == summary["eval"]["ppo"]["preferred_first_rate"]
    report = (out / "eval" / "report.md").read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / "eval" / image).stat().st_size > 1000
    assert "preferred_first_rate" in report
    for key in ("heldout_accuracy", "n_comparisons", "heldout_loss", "final_kl"):
        assert any(key in summary[s] for s in ("sft", "feedback", "reward", "ppo"))
    comparisons = (out / "feedback" / "comparisons.jsonl").read_text().splitlines()
    assert len(comparisons) == summary["feedback"]["n_comparisons"] > 0


def test_metric_names_are_in_the_glossary(run):
    out, _ = run
    glossary = set(re.findall(r"^\| `([\w/]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), flags=re.M))
    for stage in ("sft", "reward", "ppo"):
        logged = {k for rec in read_metrics(out / stage / "metrics.jsonl") for k in rec}
        assert logged - glossary == set(), f"{stage} logs undocumented metrics"


def test_rerun_skips_complete_stages(run, capsys):
    out, summary = run
    markers = {stage: (out / stage / "COMPLETE.json").stat().st_mtime_ns for stage in STAGES}
    again = run_pipeline(load_config(overrides=TINY), out)
    assert {stage: (out / stage / "COMPLETE.json").stat().st_mtime_ns for stage in STAGES} == markers
    assert _figures(again) == _figures(summary)
    assert capsys.readouterr().out.count(": up to date in ") == len(STAGES)


def test_same_seed_same_summary_in_a_new_process(run, tmp_path):
    """The reproducibility claim: same seed + config + threads (+ machine kind) => the same summary, also
    from the command line in a fresh process (where memory layout and thread start-up differ)."""
    _, summary = run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [arg for o in TINY for arg in ("--set", o)]
    subprocess.run([sys.executable, "-m", "rlhfkit", "run", "--out", str(tmp_path / "again"), *args], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert _figures(again) == _figures(json.loads(json.dumps(summary)))


def test_killed_ppo_resumes_to_identical_model(run, tmp_path):
    out, _ = run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("ppo", "eval", "summary.json"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", "ppo", "--out", str(resumed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = resumed / ".partial" / "ppo" / "checkpoint" / "state.pt"  # a running stage lives in .partial
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it run past the checkpoint, so some steps are lost and redone
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "ppo" / "COMPLETE.json").exists(), "a killed stage must not look finished"
    result = run_stage("ppo", load_config(resumed / "config.toml"), resumed)
    assert result["resumed"] is True
    a = load_file(out / "ppo" / "model" / "model.safetensors")
    b = load_file(resumed / "ppo" / "model" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a), "resumed PPO differs from the uninterrupted run"
    steps = [r["step"] for r in read_metrics(resumed / "ppo" / "metrics.jsonl")]
    assert steps == list(range(1, 31)), "each step logged exactly once"
    assert read_metrics(resumed / "ppo" / "metrics.jsonl") == read_metrics(out / "ppo" / "metrics.jsonl")


def test_llama_policy_end_to_end(tmp_path):
    # Also runs the non-default PPO options: value model from the policy, k3, adaptive KL, reward norm
    # (their math is checked on fixed batches in tests/test_ppo.py; here: they run end to end).
    cfg = load_config(overrides=TINY + ["policy.arch='llama'", "ppo.total_steps=20", "eval.n_prompts=300",
                                        "ppo.value_init='policy'", "ppo.kl_estimator='k3'", "ppo.adaptive_kl=true",
                                        "ppo.target_kl=0.5", "ppo.kl_horizon=500", "ppo.reward_norm=true",
                                        "ppo.reward_clip=5.0"])
    summary = run_pipeline(cfg, tmp_path / "llama")
    assert json.loads((tmp_path / "llama" / "sft" / "model" / "config.json").read_text())["model_type"] == "llama"
    assert summary["eval"]["sft"]["kl"] == pytest.approx(0.0, abs=1e-6) and summary["eval"]["ppo"]["kl"] > 0
    betas = [r["objective/kl_coef"] for r in read_metrics(tmp_path / "llama" / "ppo" / "metrics.jsonl")]
    assert betas[-1] != betas[0]  # the adaptive controller moved beta


def test_reward_threshold_stops_early(run, tmp_path):
    out, _ = run
    copy = tmp_path / "threshold"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("ppo", "eval", "summary.json"))
    cfg = load_config(overrides=TINY + ["ppo.reward_threshold=-1000.0"])
    result = run_stage("ppo", cfg, copy)
    assert result["stopped_by_threshold"] is True and result["steps"] == 1
    assert (copy / "ppo" / "model" / "model.safetensors").is_file()


def test_user_model_directory_as_policy(run, tmp_path):
    """policy.path: start SFT from a local Hugging Face directory instead of building a tiny model."""
    out, _ = run
    cfg = load_config(overrides=TINY + [f"policy.path='{out / 'sft' / 'model'}'", "sft.n_demos=640"])
    result = run_stage("sft", cfg, tmp_path / "user")
    assert result["heldout_loss"] < 1.3  # starts from a trained model, so it is already good


def test_every_long_phase_shows_progress(tmp_path, capfd):
    """Each phase that takes more than a few seconds on a real model says what it is doing and how far it is:
    sampling for feedback, the reward model's evaluation, a self-training round's sampling, the evaluation."""
    budget = ["sft.n_demos=2000", "sft.epochs=1", "feedback.n_prompts=100", "reward.epochs=1", "eval.n_prompts=50",
              "eval.dist_samples=20", "device='cpu'", f"threads={THREADS}", "method='rejection_sampling'",
              "rejection_sampling.rounds=1", "rejection_sampling.n_prompts=32", "rejection_sampling.epochs=1"]
    run_pipeline(load_config(overrides=budget), tmp_path / "out")
    err = capfd.readouterr().err
    for phase in ("sft", "feedback: sampling", "reward model: held-out accuracy", "reward model: training accuracy",
                  "rejection_sampling round 1: sampling: 32 prompts x 4", "eval: sft on 50 held-out prompts",
                  "eval: rejection_sampling on 50 held-out prompts"):
        assert phase in err, f"no progress shown for {phase!r}"


@pytest.mark.parametrize("method, option", [("ppo", "padding_free"), ("grpo", "padding_free"),
                                            ("grpo", "shared_prefix"), ("rloo", "shared_prefix")])
def test_packed_online_methods_take_the_padded_steps(method, option, run, tmp_path, monkeypatch):
    """train.padding_free and train.shared_prefix in the online methods (the rollout's policy, reference and value
    passes and the updates packed; shared_prefix: each group's prompt once): the first step, sampled from the same
    SFT policy, logs the padded run's figures to rounding (tests/test_batch_columns.py and
    tests/test_shared_prefix.py check the packed passes themselves against the padded ones)."""
    from rlhfkit.models import forward

    out, _ = run
    firsts, packed_calls = [], []
    real = forward._packed_forward_response
    monkeypatch.setattr(forward, "_packed_forward_response", lambda *a: packed_calls.append(1) or real(*a))
    steps = ["ppo.total_steps=1"] if method == "ppo" else [
        f"method='{method}'", f"{method}.total_steps=1", f"{method}.prompts_per_step=8", f"{method}.k=4",
        f"{method}.minibatch_size=32"]
    for on in (False, True):
        copy = tmp_path / f"{option}_{on}"
        shutil.copytree(out, copy, ignore=shutil.ignore_patterns("ppo", "eval", "summary.json"))
        run_stage(method, load_config(overrides=TINY + steps + [f"train.{option}={str(on).lower()}"]), copy)
        firsts.append(read_metrics(copy / method / "metrics.jsonl")[0])
    padded, packed = firsts
    assert len(packed_calls) >= 2  # the rollout's policy and reference passes, and the update
    figures = [k for k, v in padded.items() if isinstance(v, float) and "time" not in k and "per_s" not in k]
    assert {"loss/policy", "objective/kl"} <= set(figures) and (method != "ppo" or "loss/value" in figures)
    for k in figures:
        assert packed[k] == pytest.approx(padded[k], rel=1e-3, abs=1e-5), k
