"""Rejection sampling and ReST (rlhfkit/algorithms/rejection_sampling.py, rest.py, rlhfkit/spine/self_training.py,
rlhfkit/ops/selection.py): the selection rules on fixed inputs and against plain loops, the shared fine-tuning
loop, the Grow step's bookkeeping, and on a tiny budget the round directories, the metrics glossary and a killed
run that resumes to exactly the uninterrupted result. The outcomes (preferred first digit up, rule kept) are
asserted at the default budget in tests/test_acceptance.py."""

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
from rlhfkit.ops.selection import best_in_group, rejection_sampling_keep, rest_keep, rest_thresholds
from rlhfkit.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
THREADS = int(os.environ.get("RLHFKIT_TEST_THREADS", "1"))


# ----------------------------------------------------------------------------------------------------
# Selection: fixed inputs


def _t(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def test_best_in_group_fixed_cases():
    #            group 0 (tie)   group 1 (best unended)  group 2 (none ended)  group 3 (one row)
    scores = _t(1.0, 3.0, 3.0,  5.0, 9.0, -1.0,          7.0, 8.0,             -4.0)
    ended = _t(1, 1, 1,         1, 0, 1,                 0, 0,                 1, dtype=torch.bool)
    group = _t(0, 0, 0,         1, 1, 1,                 2, 2,                 3, dtype=torch.long)
    best = best_in_group(scores, ended, group)
    # a tie goes to the first row; an unended row never wins, even with the top score; a group where nothing
    # ended has no best; a group of one keeps its only row
    assert best.tolist() == [False, True, False, True, False, False, False, False, True]


def test_rejection_sampling_keep_threshold():
    scores = _t(1.0, 2.0, -3.0, -2.0, 0.5, 0.4)
    ended = torch.ones(6, dtype=torch.bool)
    group = _t(0, 0, 1, 1, 2, 2, dtype=torch.long)
    # -inf keeps every prompt's best (Llama 2)
    assert rejection_sampling_keep(scores, ended, group, -math.inf).tolist() == [0, 1, 0, 1, 1, 0]
    # a group whose best (-2.0) is below the threshold contributes nothing; a best equal to it clears it (>=)
    assert rejection_sampling_keep(scores, ended, group, 0.5).tolist() == [0, 1, 0, 0, 1, 0]
    # the threshold is on the best, not a re-selection among the rows above it: never two rows of one group
    assert rejection_sampling_keep(scores, ended, group, -10.0).sum().item() == 3
    # every group below: nothing kept
    assert not rejection_sampling_keep(scores, ended, group, 2.5).any()


def test_rest_thresholds_fixed_cases():
    scores = _t(0.0, 1.0, 2.0, 3.0, 4.0, 100.0)
    ended = _t(1, 1, 1, 1, 1, 0, dtype=torch.bool)  # the unended outlier is not part of the distribution
    taus = rest_thresholds(scores, ended, [0.25, 0.5, 0.75])
    assert taus == pytest.approx([2.0, 2.0, 3.0])  # quantiles 1, 2, 3 of 0..4; the first is raised to the mean 2
    assert rest_keep(scores, ended, taus[0]).tolist() == [0, 0, 1, 1, 1, 0]  # >= tau, the unended row never
    assert rest_keep(scores, ended, taus[2]).tolist() == [0, 0, 0, 1, 1, 0]
    # a skewed set: the mean floor binds (tau_1 > V in Gulcehre et al.'s Algorithm 1)
    skewed = _t(0.0, 0.0, 0.0, 0.0, 10.0)
    assert rest_thresholds(skewed, torch.ones(5, dtype=torch.bool), [0.5]) == pytest.approx([2.0])
    # nothing ended: nothing can be kept
    none = torch.zeros(6, dtype=torch.bool)
    assert rest_thresholds(scores, none, [0.5, 0.9]) == [math.inf, math.inf]
    assert not rest_keep(scores, none, -math.inf).any()


# ----------------------------------------------------------------------------------------------------
# Selection: against plain loops on random inputs (ties, unended rows, groups of one and of several sizes)


def _loop_best(scores, ended, group):
    best = {}
    for i, (s, e, g) in enumerate(zip(scores.tolist(), ended.tolist(), group.tolist())):
        if e and (g not in best or s > scores[best[g]].item()):
            best[g] = i
    return [i in best.values() for i in range(len(scores))]


@pytest.mark.parametrize("seed", range(5))
def test_selection_matches_loops(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 6, (12,), generator=g).tolist()
    group = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    scores = torch.randint(-3, 4, (len(group),), generator=g).float()  # small integers: many ties
    ended = torch.rand(len(group), generator=g) < 0.8
    assert best_in_group(scores, ended, group).tolist() == _loop_best(scores, ended, group)
    for threshold in (-math.inf, 0.0, 2.0):
        expected = [b and s >= threshold for b, s in zip(_loop_best(scores, ended, group), scores.tolist())]
        assert rejection_sampling_keep(scores, ended, group, threshold).tolist() == expected
    taus = rest_thresholds(scores, ended, [0.3, 0.6, 0.9])
    assert taus == sorted(taus) and taus[0] >= scores[ended].mean().item() - 1e-6
    for tau in taus:
        assert rest_keep(scores, ended, tau).tolist() == [bool(e) and s >= tau for s, e in zip(scores.tolist(), ended.tolist())]


# ----------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("override,field", [
    ("rest.quantiles=[0.5, 0.5]", "rest.quantiles"), ("rest.quantiles=[]", "rest.quantiles"),
    ("rest.quantiles=[0.5, 1.0]", "rest.quantiles"), ("rejection_sampling.threshold=inf", "rejection_sampling.threshold"),
    ("rejection_sampling.rounds=0", "rejection_sampling.rounds"), ("rest.lr=0", "rest.lr"),
])
def test_config_refuses(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(overrides=[override])


# ----------------------------------------------------------------------------------------------------
# The Grow step and the shared fine-tuning loop


def test_grow_in_chunks_keeps_groups_and_prompts(sharp_policy, tokenizer):
    """Chunked sampling: rows stay grouped by prompt across chunks, each scored with its own text, and a
    policy measured against itself has KL exactly 0."""
    from rlhfkit.models.reference import Reference
    from rlhfkit.models.runtime import Runtime
    from rlhfkit.spine.self_training import grow

    policy = sharp_policy("gpt2")
    prompts = [f"{i} {i} {(i + 1) % 10} 2 =" for i in range(7)]
    seen = []

    def scorer(rows, texts):
        seen.extend(zip(rows, texts))
        return torch.tensor([float(len(t)) for t in texts])

    rt = Runtime(torch.device("cpu"), None)
    g = grow(policy, Reference(policy), scorer, tokenizer, prompts, k=3, max_new_tokens=5, temperature=1.0,
             generator=torch.Generator().manual_seed(0), rt=rt, chunk=3)
    assert g.group.tolist() == [i for i in range(7) for _ in range(3)]
    assert g.prompts == [p for p in prompts for _ in range(3)]
    assert list(zip(g.prompts, g.texts)) == seen
    assert g.scores.tolist() == [float(len(t)) for t in g.texts]
    assert torch.equal(g.kl, torch.zeros(21))


def test_fit_completions_learns_and_logs_with_offset(tmp_path, tokenizer):
    """SFT's loop on a handful of pairs: the loss falls, steps are logged from step_offset, and fewer pairs than
    batch_size still make one step per epoch."""
    from rlhfkit.core.runio import MetricsLog, read_metrics
    from rlhfkit.data.batching import encode_pairs
    from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
    from rlhfkit.models.runtime import Runtime
    from rlhfkit.spine.finetune import completion_nll, fit_completions

    rt = Runtime(torch.device("cpu"), None)
    model = build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tokenizer, seed=0)
    data = encode_pairs(tokenizer, ["1 2 3 4 =", "5 6 7 8 ="], ["5 3 4 5", "9 7 8 9"])
    before = completion_nll(model, *data, rt).item()
    log = MetricsLog(tmp_path / "m.jsonl")
    fit = fit_completions(model, data, epochs=30, batch_size=64, lr=3e-3, rt=rt,
                          generator=torch.Generator().manual_seed(0), log=log, step_offset=100)
    log.close()
    assert fit["steps"] == 30
    assert completion_nll(model, *data, rt).item() < 0.5 * before
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [110, 120, 130]


# ----------------------------------------------------------------------------------------------------
# Tiny end to end: round directories, glossary, resume


TINY_BASE = ["sft.n_demos=8000", "sft.epochs=1", "feedback.n_prompts=800", "reward.epochs=3",
             "eval.n_prompts=200", "eval.dist_samples=200", "device='cpu'", f"threads={THREADS}"]
TINY = {
    "rejection_sampling": ["method='rejection_sampling'", "rejection_sampling.rounds=4", "rejection_sampling.n_prompts=96",
                           "rejection_sampling.k=4", "rejection_sampling.epochs=1", "rejection_sampling.batch_size=32"],
    "rest": ["method='rest'", "rest.iterations=4", "rest.n_prompts=64", "rest.k=4", "rest.quantiles=[0.5, 0.8]",
             "rest.batch_size=32"],
}
PREFIX = {"rejection_sampling": "round", "rest": "iter"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """SFT, feedback and reward model on a tiny budget, shared by both methods."""
    from rlhfkit.pipeline.stages import run_stage

    out = tmp_path_factory.mktemp("selftrain") / "base"
    cfg = load_config(overrides=TINY_BASE)
    for stage in ("sft", "feedback", "reward"):
        run_stage(stage, cfg, out)
    return out


@pytest.fixture(scope="module")
def uninterrupted(base):
    from rlhfkit.pipeline.stages import run_stage

    runs = {}
    for method in TINY:
        out = base.parent / method
        shutil.copytree(base, out)
        result = run_stage(method, load_config(overrides=TINY_BASE + TINY[method]), out)
        runs[method] = (out, result)
    return runs


@pytest.mark.slow
def test_rejection_sampling_rounds_on_disk(uninterrupted):
    out, result = uninterrupted["rejection_sampling"]
    stage = out / "rejection_sampling"
    assert result["rounds"] == 4 and not result["resumed"]
    assert result["passes"]["sampled"] == 4 * 96 * 4 and result["passes"]["forward"] == 3 * result["passes"]["sampled"]
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for n, record in enumerate(records, start=1):
        rows = [json.loads(line) for line in (stage / f"round-{n}" / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 96 * 4 and (stage / f"round-{n}" / "model" / "model.safetensors").is_file()
        kept = [r for r in rows if r["kept"]]
        for r in kept:  # the kept row is its prompt's best ended sample, and it ended
            rivals = [x["score"] for x in rows if x["group"] == r["group"] and x["ended"]]
            assert r["ended"] and r["score"] == max(rivals) and r["prompt"] == rows[4 * r["group"]]["prompt"]
        assert len({r["group"] for r in kept}) == len(kept)  # at most one per prompt
        assert record["selection/kept_fraction"] == len(kept) / 96
        # the winners score above the sampled set, and they carry more of the preferred first digit (gold)
        assert record["selection/kept_scores"] > record["objective/scores"]
    assert records[0]["objective/kl_k1"] == pytest.approx(0.0, abs=1e-5)  # round 1 samples the SFT policy itself
    final = load_file(stage / "model" / "model.safetensors")
    last = load_file(stage / "round-4" / "model" / "model.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)


@pytest.mark.slow
def test_rest_improve_steps_on_disk(uninterrupted):
    out, result = uninterrupted["rest"]
    stage = out / "rest"
    assert result["improve_steps"] == 8 and len(result["thresholds"]) == 4
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    for n in range(1, 5):
        a, b = records[2 * n - 2], records[2 * n - 1]
        assert a["rest/iteration"] == b["rest/iteration"] == n
        assert a["objective/scores"] == b["objective/scores"]  # both Improve steps filter the same Grow set
        rows = [json.loads(line) for line in (stage / f"iter-{n}" / "grow.jsonl").read_text().splitlines()]
        ended = [r["score"] for r in rows if r["ended"]]
        assert sum(ended) / len(ended) - 1e-4 <= a["selection/threshold"] <= b["selection/threshold"]  # rising, >= mean
        assert a["selection/kept_fraction"] >= b["selection/kept_fraction"] and b["selection/kept_scores"] >= a["selection/kept_scores"]
        for r in rows:  # improve_steps counts the thresholds the sample cleared (never one without EOS)
            cleared = sum(r["score"] >= tau for tau in (a["selection/threshold"], b["selection/threshold"]))
            assert r["improve_steps"] == (cleared if r["ended"] else 0)
        assert sum(r["improve_steps"] >= 1 for r in rows) / len(rows) == a["selection/kept_fraction"]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(TINY))
def test_logged_metrics_are_in_the_glossary(uninterrupted, method):
    from rlhfkit.core.runio import read_metrics

    out, _ = uninterrupted[method]
    glossary = set(re.findall(r"^\| `([\w/]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), flags=re.M))
    logged = {k for rec in read_metrics(out / method / "metrics.jsonl") for k in rec}
    logged |= {k for rec in read_metrics(out / method / f"{PREFIX[method]}-1" / "metrics.jsonl") for k in rec}
    assert logged - glossary == set(), f"{method} logs undocumented metrics"


@pytest.mark.slow
@pytest.mark.parametrize("method", list(TINY))
def test_killed_run_resumes_to_identical_model(base, uninterrupted, method, tmp_path, capsys):
    """Kill the stage's process once its first round is complete (in round 2), rerun it: it resumes at the
    round it was in and ends with the same model, samples and metrics as the uninterrupted run."""
    from rlhfkit.pipeline.stages import run_stage

    done, _ = uninterrupted[method]
    resumed = tmp_path / "resumed"
    shutil.copytree(base, resumed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [a for o in TINY_BASE + TINY[method] for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", method, "--out", str(resumed), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = resumed / ".partial" / method / f"{PREFIX[method]}-1" / "COMPLETE.json"  # a running stage lives in .partial
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (resumed / method / "COMPLETE.json").exists(), "killed before round 1 or after the end"
    result = run_stage(method, load_config(overrides=TINY_BASE + TINY[method]), resumed)
    assert result["resumed"] is True, capsys.readouterr().out  # the pipeline's log says why it started afresh
    a = load_file(done / method / "model" / "model.safetensors")
    b = load_file(resumed / method / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"
    assert (resumed / method / "metrics.jsonl").read_text() == (done / method / "metrics.jsonl").read_text()
    samples = "samples.jsonl" if method == "rejection_sampling" else "grow.jsonl"
    for n in range(1, 5):
        d = f"{PREFIX[method]}-{n}"
        assert (resumed / method / d / samples).read_text() == (done / method / d / samples).read_text()
    assert result["passes"] == uninterrupted[method][1]["passes"]


@pytest.mark.slow
def test_rejection_sampling_threshold_end_to_end(base, uninterrupted, tmp_path):
    """Round 1 draws the same samples whatever the threshold (seeds per round): at the median of the prompts'
    best scores, exactly the prompts whose best clears it are kept; above every score, the round is an error
    that names the field."""
    from rlhfkit.core.errors import RlhfkitError
    from rlhfkit.pipeline.stages import run_stage

    done, _ = uninterrupted["rejection_sampling"]
    rows = [json.loads(line) for line in (done / "rejection_sampling" / "round-1" / "samples.jsonl").read_text().splitlines()]
    best = {r["group"]: r for r in rows if r["kept"]}  # threshold -inf: every prompt's best
    threshold = sorted(r["score"] for r in best.values())[len(best) // 2]
    out = tmp_path / "threshold"
    shutil.copytree(base, out)
    run_stage("rejection_sampling", load_config(overrides=TINY_BASE + TINY["rejection_sampling"] + [
        "rejection_sampling.rounds=1", f"rejection_sampling.threshold={threshold!r}"]), out)
    again = [json.loads(line) for line in (out / "rejection_sampling" / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["completion"]) for r in again] == [(r["prompt"], r["completion"]) for r in rows]
    assert {r["group"] for r in again if r["kept"]} == {g for g, r in best.items() if r["score"] >= threshold}
    with pytest.raises(RlhfkitError, match="rejection_sampling.threshold"):
        run_stage("rejection_sampling", load_config(overrides=TINY_BASE + TINY["rejection_sampling"] + [
            "rejection_sampling.rounds=1", "rejection_sampling.threshold=1e9"]), out)


# ----------------------------------------------------------------------------------------------------
# Several processes: each one's share of a round's prompts, and the shares gathered back (fast: the process
# group replaced by its answers; tests/test_engine.py runs the real thing under accelerate launch)


def test_each_process_samples_its_contiguous_share_and_the_shares_gather_in_rank_order(monkeypatch):
    from rlhfkit.spine import self_training as st

    prompts = [f"p{i}" for i in range(6)]
    assert st.my_share(prompts, "rest") == prompts  # one process: all of them
    monkeypatch.setattr(st.dist, "world_size", lambda: 3)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(st.dist, "rank", lambda rank=rank: rank)
        shares.append(st.my_share(prompts, "rest"))
    assert shares == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]
    with pytest.raises(ConfigError, match="rest.n_prompts = 7 does not split evenly over 3 processes"):
        st.my_share(prompts + ["p6"], "rest")

    def grow_of(rank):  # process `rank`'s Grow set: its 2 prompts x k = 2 samples, groups local (0, 0, 1, 1)
        rows = [f"p{2 * rank + g}" for g in (0, 0, 1, 1)]
        return st.GrowSet(rows, [f"{p}-s{j}" for j, p in enumerate(rows)], torch.tensor([0, 0, 1, 1]),
                          torch.arange(4.0) + 10 * rank, torch.tensor([True, False, True, True]),
                          torch.full((4,), float(rank)))

    parts = [grow_of(r) for r in range(3)]
    monkeypatch.setattr(st.dist, "is_distributed", lambda: True)
    monkeypatch.setattr(st, "gather_objects",
                        lambda obj: [(g.prompts, g.texts, g.group, g.scores, g.ended, g.kl) for g in parts])
    whole = st.gather_grow(parts[1], share=2)
    assert whole.prompts == [p for g in parts for p in g.prompts]
    assert whole.group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # global prompt index of every row
    assert [whole.prompts[i] for i in range(0, 12, 2)] == prompts  # row group g holds prompt g
    assert whole.scores.tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    assert whole.ended.tolist() == [True, False, True, True] * 3
    assert whole.kl.tolist() == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
