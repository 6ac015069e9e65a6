"""Online DPO (rlhfkit/algorithms/online_dpo.py, the pair rule in rlhfkit/ops/selection.py): the best-vs-worst pair
rule on fixed inputs and against a plain loop (ties skipped, unended samples never paired, K = 2), the config's
refusals, and on a tiny budget (a small SFT policy, the task's gold scorer as the reward, so no reward model is
trained here) the iteration directories as contract comparisons, what each reference option means (the previous
iteration's policy as reference => the first step of every iteration has loss exactly ln 2), the preferred first
digit rising, every logged name in docs/metrics.md, and a run killed after its first iteration resuming to exactly
the uninterrupted result. With the run's reward model, at the default budget: tests/test_acceptance.py."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.core.errors import ConfigError
from rlhfkit.core.runio import read_metrics
from rlhfkit.data.contract import read_comparisons
from rlhfkit.ops.selection import best_worst_pairs
from rlhfkit.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
THREADS = int(os.environ.get("RLHFKIT_TEST_THREADS", "1"))


# ----------------------------------------------------------------------------------------------------
# The pair rule: fixed inputs


def _t(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def _pairs(scores, ended, group, min_gap=0.0):
    chosen, rejected = best_worst_pairs(scores, ended, group, min_gap)
    return list(zip(chosen.tolist(), rejected.tolist()))


def test_best_worst_pairs_fixed_cases():
    #            0: ties at both ends   1: all tied       2: best unended      3: one ended   4: none ended
    scores = _t(1.0, 3.0, 3.0, 0.0, 0.0,  2.0, 2.0, 2.0,   9.0, 1.0, 2.0, 0.0,  5.0, 6.0,      7.0, 8.0)
    ended = _t(1, 1, 1, 1, 1,            1, 1, 1,         0, 1, 1, 1,          1, 0,          0, 0, dtype=torch.bool)
    group = _t(0, 0, 0, 0, 0,            1, 1, 1,         2, 2, 2, 2,          3, 3,          4, 4, dtype=torch.long)
    # best and worst each go to the first row of a tie; an all-tied prompt, a prompt with one ended sample and one
    # with none give no pair; an unended sample is never chosen, even with the top score
    assert _pairs(scores, ended, group) == [(1, 3), (10, 11)]
    # min_gap: the gap must exceed it (group 0's gap is 3, group 2's 2)
    assert _pairs(scores, ended, group, min_gap=2.0) == [(1, 3)]
    assert _pairs(scores, ended, group, min_gap=3.0) == []


def test_best_worst_pairs_k2():
    """K = 2 (TRL's online DPO, Guo et al.): the two samples ordered by the reward, either way round; a tie or an
    unended sample gives no pair."""
    scores = _t(1.0, 2.0, 5.0, -1.0, 0.5, 0.5, 3.0, 4.0)
    ended = _t(1, 1, 1, 1, 1, 1, 1, 0, dtype=torch.bool)
    group = _t(0, 0, 1, 1, 2, 2, 3, 3, dtype=torch.long)
    assert _pairs(scores, ended, group) == [(1, 0), (2, 3)]


def test_best_worst_pairs_empty_and_unsorted_groups():
    none = torch.zeros(0)
    assert _pairs(none, none.bool(), none.long()) == []
    # groups need not be consecutive rows: pairs come in group order
    scores, ended = _t(0.0, 5.0, 1.0, 4.0), torch.ones(4, dtype=torch.bool)
    assert _pairs(scores, ended, _t(1, 0, 1, 0, dtype=torch.long)) == [(1, 3), (2, 0)]


# ----------------------------------------------------------------------------------------------------
# The pair rule against a plain loop on random inputs (many ties, unended rows, groups of several sizes)


def _loop_pairs(scores, ended, group, min_gap):
    best, worst = {}, {}
    for i, (s, e, g) in enumerate(zip(scores.tolist(), ended.tolist(), group.tolist())):
        if not e:
            continue
        if g not in best or s > scores[best[g]].item():
            best[g] = i
        if g not in worst or s < scores[worst[g]].item():
            worst[g] = i
    return [(best[g], worst[g]) for g in sorted(best) if scores[best[g]].item() - scores[worst[g]].item() > min_gap]


@pytest.mark.parametrize("seed", range(5))
def test_best_worst_pairs_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 7, (15,), generator=g).tolist()
    group = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    scores = torch.randint(-2, 3, (len(group),), generator=g).float()  # small integers: many ties
    ended = torch.rand(len(group), generator=g) < 0.8
    for min_gap in (0.0, 1.0, 2.5):
        assert _pairs(scores, ended, group, min_gap) == _loop_pairs(scores, ended, group, min_gap)


# ----------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("overrides,needle", [
    (["online_dpo.k=1"], "online_dpo.k = 1: must be at least 2"),
    (["online_dpo.iterations=0"], "online_dpo.iterations"),
    (["online_dpo.n_prompts=0"], "online_dpo.n_prompts"),
    (["online_dpo.min_score_gap=-0.1"], "online_dpo.min_score_gap = -0.1: must be >= 0"),
    (["online_dpo.loss='plackett_luce'"], "online_dpo.loss = 'plackett_luce': choose 'sigmoid'"),
    (["online_dpo.beta=0"], "online_dpo.beta = 0.0: must be > 0"),
    (["online_dpo.label_smoothing=0.1"], "only the 'conservative' loss (cDPO) models flipped labels"),
    (["online_dpo.loss='conservative'", "online_dpo.label_smoothing=0.5"], "must be in [0, 0.5)"),
    (["online_dpo.reference='cached'"], "online_dpo.reference = 'cached': choose 'sft'"),
    (["online_dpo.lr=0"], "online_dpo.lr"),
    (["online_dpo.max_grad_norm=-1"], "online_dpo.max_grad_norm"),
])
def test_bad_config_messages(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert needle in str(e.value)


def test_wiring_reads_sft_and_the_reward():
    """`method = 'online_dpo'`: the run trains SFT, gathers feedback and trains the reward model (which labels the
    pairs); with a reward source that needs no reward model (here the gold scorer), SFT alone."""
    from rlhfkit.pipeline.stages import pipeline_stages

    assert pipeline_stages(load_config(overrides=["method='online_dpo'"])) == [
        "sft", "feedback", "reward", "online_dpo", "eval"]
    assert pipeline_stages(load_config(overrides=["method='online_dpo'", GOLD])) == ["sft", "online_dpo", "eval"]
    assert load_config(overrides=["method='online_dpo'", "online_dpo.loss='conservative'",
                                  "online_dpo.label_smoothing=0.1"]).online_dpo.label_smoothing == 0.1


# ----------------------------------------------------------------------------------------------------
# Tiny end to end: iteration directories, the reference option, the outcome, the glossary, resume


GOLD = "reward.sources=[{kind='gold'}]"
TINY_SFT = ["sft.n_demos=8000", "sft.epochs=1", "device='cpu'", f"threads={THREADS}"]
TINY = TINY_SFT + ["method='online_dpo'", GOLD, "online_dpo.iterations=3", "online_dpo.n_prompts=128",
                   "online_dpo.k=4", "online_dpo.batch_size=32", "online_dpo.beta=0.1"]
ITERATIONS, N_PROMPTS = 3, 128


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small SFT policy (no reward model: the gold scorer labels the pairs)."""
    from rlhfkit.pipeline.stages import run_stage

    out = tmp_path_factory.mktemp("online_dpo") / "base"
    run_stage("sft", load_config(overrides=TINY_SFT), out)
    return out


def _run(base, name, extra=()):
    from rlhfkit.pipeline.stages import run_stage

    out = base.parent / name
    shutil.copytree(base, out)
    return out, run_stage("online_dpo", load_config(overrides=TINY + list(extra)), out)


@pytest.fixture(scope="module")
def uninterrupted(base):
    return _run(base, "sft-reference")


@pytest.fixture(scope="module")
def previous(base):
    return _run(base, "previous-reference", ["online_dpo.reference='previous'"])


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_iterations_are_written_and_kept(uninterrupted):
    """Each iteration's pairs are contract comparisons under STAGE/iter-N/, each the best and the worst ended sample
    of its prompt by the reward, strictly apart; samples, DPO steps and the model after the iteration stay beside
    them; the stage's log and result have one entry per iteration."""
    out, result = uninterrupted
    stage = out / "online_dpo"
    records = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, ITERATIONS + 1))
    for n, record in enumerate(records, start=1):
        d = stage / f"iter-{n}"
        assert (d / "COMPLETE.json").is_file() and (d / "model" / "model.safetensors").is_file()
        comparisons = read_comparisons(d / "comparisons.jsonl")  # the one data contract's reader
        samples = _lines(d / "samples.jsonl")
        assert len(samples) == N_PROMPTS * 4
        assert len(comparisons) == result["pairs"][n - 1] == round(record["selection/kept_fraction"] * N_PROMPTS) > 0
        chosen = [s for s in samples if s["pair"] == "chosen"]
        rejected = [s for s in samples if s["pair"] == "rejected"]
        assert len(chosen) == len(rejected) == len(comparisons)
        for c, r, comparison in zip(chosen, rejected, comparisons, strict=True):
            group = [s["score"] for s in samples if s["group"] == c["group"] and s["ended"]]
            assert c["group"] == r["group"] and c["ended"] and r["ended"]
            assert c["score"] == max(group) > min(group) == r["score"]
            assert (comparison.prompt, comparison.chosen, comparison.rejected) == (c["prompt"], c["completion"],
                                                                                   r["completion"])
        # every prompt without a pair is an exact tie among its ended samples (or has fewer than two)
        for g in {s["group"] for s in samples} - {c["group"] for c in chosen}:
            scores = [s["score"] for s in samples if s["group"] == g and s["ended"]]
            assert len(set(scores)) <= 1
        assert record["selection/chosen_scores"] == pytest.approx(sum(c["score"] for c in chosen) / len(chosen))
        assert record["selection/rejected_scores"] < record["selection/chosen_scores"]
        steps = read_metrics(d / "metrics.jsonl")  # one line per DPO step
        assert [s["step"] for s in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 2
        assert record["loss/dpo"] == pytest.approx(sum(s["loss/dpo"] for s in steps) / len(steps), rel=1e-6)
    assert records[0]["objective/kl_k1"] == pytest.approx(0.0, abs=1e-5)  # iteration 1 samples the SFT policy
    assert result["kl"] == [r["objective/kl_k1"] for r in records] and result["final_kl"] == result["kl"][-1]
    assert not result["resumed"] and result["passes"]["sampled"] == ITERATIONS * N_PROMPTS * 4
    # sampling: policy, reference and reward over every sample; then the pairs' reference pass, 2 per pair
    assert result["passes"]["forward"] == 3 * result["passes"]["sampled"] + 2 * sum(result["pairs"])
    final = load_file(stage / "model" / "model.safetensors")
    last = load_file(stage / f"iter-{ITERATIONS}" / "model" / "model.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_reference_option(uninterrupted, previous):
    """reference = 'previous': pi_ref is the policy at the start of each iteration, so the first step of EVERY
    iteration has loss ln 2. reference = 'sft': ln 2 only in iteration 1 (the policy is still the SFT policy);
    later the policy has moved from its reference. Iteration 1 is the same run either way."""
    (sft_out, sft), (prev_out, prev) = uninterrupted, previous
    assert prev["initial_loss"] == pytest.approx([math.log(2)] * ITERATIONS, abs=1e-5)
    assert sft["initial_loss"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert all(abs(x - math.log(2)) > 1e-3 for x in sft["initial_loss"][1:])
    for name in ("comparisons.jsonl", "metrics.jsonl"):
        assert (sft_out / "online_dpo/iter-1" / name).read_text() == (prev_out / "online_dpo/iter-1" / name).read_text()
    # the same policy (after iteration 1) sampled iteration 2
    assert (sft_out / "online_dpo/iter-2/samples.jsonl").read_text() == (prev_out / "online_dpo/iter-2/samples.jsonl").read_text()
    assert sft["reference"] == "sft" and prev["reference"] == "previous"


def test_reference_option_with_lora(base):
    """With LoRA the policy is adapters on the SFT model: 'previous' reads the policy with its adapter on as the
    iteration starts (ln 2 at each first step), and the iteration's adapter is what it saves."""
    out, result = _run(base, "lora-previous", ["lora.r=4", "online_dpo.reference='previous'", "online_dpo.iterations=2",
                                               "online_dpo.n_prompts=64"])
    assert result["initial_loss"] == pytest.approx([math.log(2)] * 2, abs=1e-5)
    assert result["kl"][1] > 0  # the adapter moved the policy away from the SFT model in iteration 1
    assert (out / "online_dpo" / "iter-2" / "model" / "adapter_model.safetensors").is_file()


def test_outcome_preferred_first_digit_rose(uninterrupted):
    """The loop has the right sign: labelled by the task's gold scorer, the preferred first digit rises from
    iteration 1's samples (the SFT policy, about 0.3) to the last's, the later digits keep the rule, and every
    iteration's chosen samples score above its rejected ones."""
    _, result = uninterrupted
    records = read_metrics(uninterrupted[0] / "online_dpo" / "metrics.jsonl")
    first, last = records[0], records[-1]
    assert last["gold/preferred_first_rate"] > first["gold/preferred_first_rate"] + 0.1
    assert last["gold/later_rule_validity"] > first["gold/later_rule_validity"] - 0.05
    assert all(c > r for c, r in zip(result["chosen_scores"], result["rejected_scores"]))
    assert all(acc > 0.5 for acc in result["accuracy"])  # the implicit reward learned each iteration's order


def test_logged_metrics_are_in_the_glossary(uninterrupted):
    out, _ = uninterrupted
    glossary = set(re.findall(r"^\| `([\w/]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), flags=re.M))
    logged = {k for rec in read_metrics(out / "online_dpo" / "metrics.jsonl") for k in rec}
    logged |= {k for rec in read_metrics(out / "online_dpo" / "iter-1" / "metrics.jsonl") for k in rec}
    assert {"selection/kept_fraction", "loss/dpo_initial", "rewards/accuracies", "objective/kl_k1"} <= logged
    assert logged - glossary == set(), "online_dpo logs undocumented metrics"


@pytest.mark.slow
def test_killed_run_resumes_to_identical_model(base, uninterrupted, tmp_path, capsys):
    """`rlhfkit online_dpo` killed once its first iteration is complete (in iteration 2), then rerun: it resumes at
    the iteration it was in and ends with the same model, pairs and metrics as the uninterrupted run."""
    from rlhfkit.pipeline.stages import run_stage

    done, expected = uninterrupted
    resumed = tmp_path / "resumed"
    shutil.copytree(base, resumed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [a for o in TINY for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", "online_dpo", "--out", str(resumed), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = resumed / ".partial" / "online_dpo" / "iter-1" / "COMPLETE.json"  # a running stage lives in .partial
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (resumed / "online_dpo" / "COMPLETE.json").exists(), \
        "killed before iteration 1 or after the end"
    result = run_stage("online_dpo", load_config(overrides=TINY), resumed)
    assert result["resumed"] is True, capsys.readouterr().out  # the pipeline's log says why it started afresh
    a = load_file(done / "online_dpo" / "model" / "model.safetensors")
    b = load_file(resumed / "online_dpo" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"
    assert (resumed / "online_dpo" / "metrics.jsonl").read_text() == (done / "online_dpo" / "metrics.jsonl").read_text()
    for n in range(1, ITERATIONS + 1):
        for name in ("comparisons.jsonl", "samples.jsonl", "metrics.jsonl"):
            d = f"online_dpo/iter-{n}/{name}"
            assert (resumed / d).read_text() == (done / d).read_text(), d
    for key in ("pairs", "initial_loss", "loss", "accuracy", "kl", "passes", "steps"):
        assert result[key] == expected[key], key
