"""Gradient accumulation and data parallelism (rlhfkit/models/engine.py) and the offline trainers' loop
(rlhfkit/spine/epochs.py): 1 x 8 = 8 x 1 = 2 processes x 4, exact resume mid-epoch, early stopping, checkpointing.

The invariance tests come first and use a fixed batch with uneven token counts: accelerate's own accumulate()
(each micro-batch's mean divided by the number of micro-batches) fails them, which is the bug they guard against."""

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.core.errors import ConfigError
from rlhfkit.core.runio import read_metrics
from rlhfkit.data.batching import encode_pairs
from rlhfkit.models.engine import is_checkpointing, make_engine
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
from rlhfkit.models.runtime import Runtime
from rlhfkit.spine.epochs import Epochs, LoopOptions
from rlhfkit.spine.finetune import fit_completions

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def token_problem(seed=0):
    """A linear 'model' scoring tokens, rows with 1 to 8 real tokens: a token-mean loss weighs rows unevenly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 8, 3, generator=g)  # (B, T, D)
    y = torch.randn(8, 8, generator=g)
    lengths = torch.tensor([1, 8, 2, 7, 3, 3, 5, 1])
    mask = (torch.arange(8)[None, :] < lengths[:, None]).float()  # (B, T)
    return x, y, mask


def accumulated_step(accumulation, *, units_weighted=True, clip=1.0):
    x, y, mask = token_problem()
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # not Adam: its first step is blind to the gradient scale
    engine = make_engine({"m": model}, opt, None, CPU, accumulation=accumulation, max_grad_norm=clip)

    def loss_fn(rows):
        err = (model(x[rows]).squeeze(-1) - y[rows]) ** 2  # (b, T)
        loss = (err * mask[rows]).sum() / mask[rows].sum()  # mean over the rows' tokens
        return loss, {"tokens": mask[rows].sum()}

    out = engine.step(torch.arange(8), loss_fn, units=(lambda rows: mask[rows].sum()) if units_weighted else None)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), out


@pytest.mark.parametrize("accumulation", [2, 3, 8])
def test_accumulation_equals_one_batch(accumulation):
    """8 x 1 (and uneven splits) makes the update of 1 x 8, loss and stats included, with clipping active."""
    one, out1 = accumulated_step(1)
    many, out = accumulated_step(accumulation)
    torch.testing.assert_close(many, one, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["loss"], out1["loss"], rtol=0, atol=1e-6)


def test_accumulation_needs_token_weights():
    """Weighting micro-batches by rows instead of tokens (accelerate's accumulate(): each by 1/N) is wrong for a
    token-mean loss: the test above would catch it, so this checks that the problem really tells them apart."""
    one, _ = accumulated_step(1, clip=0)
    rows_weighted, _ = accumulated_step(8, units_weighted=False, clip=0)
    assert (rows_weighted - one).abs().max() > 1e-3


def test_single_part_is_a_plain_backward():
    """One process, one micro-batch: the very float operations of loss.backward() + clip + step (bit-equal)."""
    ours, _ = accumulated_step(1)
    x, y, mask = token_problem()
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # not Adam: its first step is blind to the gradient scale
    loss = (((model(x).squeeze(-1) - y) ** 2) * mask).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    opt.step()
    assert torch.equal(ours, torch.cat([p.detach().flatten() for p in model.parameters()]))


def test_whitening_over_parts_equals_whole_batch():
    """masked_whiten(total=...) sums its moments over the parts of a batch split across processes: with the parts
    summed by hand (two halves) it equals the whole batch's whitening, Bessel's correction included."""
    from rlhfkit.ops.advantages import masked_whiten

    x, _, mask = token_problem()
    x = x[..., 0]  # (B, T)
    halves = [slice(0, 4), slice(4, 8)]

    whole = masked_whiten(x, mask)
    # each process's `total` returns the sums over both halves (what the all-reduce gives), in the order asked:
    # the count, the sum, the sum of squared deviations from the whole batch's mean
    n = mask.sum()
    mean = (x * mask).sum() / n
    parts = []
    for h in halves:
        sums = iter([n, (x * mask).sum(), (((x - mean) ** 2) * mask).sum()])
        parts.append(masked_whiten(x[h], mask[h], total=lambda v, s=sums: next(s)))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-6)


def test_batch_smaller_than_parts_is_refused():
    engine = make_engine({"m": torch.nn.Linear(2, 1)}, torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1),
                         None, CPU, accumulation=4)
    with pytest.raises(ConfigError, match="train.gradient_accumulation_steps"):
        engine.check_batch(3, "sft.batch_size")


# ---------------------------------------------------------------- SFT's loop on a tiny transformer

@pytest.fixture(scope="module")
def sft_data(digits, tokenizer):
    import random

    demos, heldout = digits.sft_split(64, random.Random(0))
    enc = lambda pairs: [t for t in encode_pairs(tokenizer, [p for p, _ in pairs], [c for _, c in pairs])]  # noqa: E731
    return enc(demos), enc(heldout[:16])


def fit(tokenizer, data, *, accumulation=1, epochs=2, batch_size=8, **kw):
    torch.manual_seed(0)
    model = build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 64), tokenizer, seed=0)
    rt = Runtime(CPU, None, accumulation=accumulation)
    result = fit_completions(model, data, epochs=epochs, batch_size=batch_size, lr=3e-3, rt=rt,
                             generator=torch.Generator().manual_seed(0), **kw)
    return model, result


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_sft_1x8_equals_8x1(tokenizer, sft_data):
    """The SFT loop's 16 steps at batch 8: one micro-batch vs eight (token-weighted) agree to float rounding."""
    a, ra = fit(tokenizer, sft_data[0])
    b, rb = fit(tokenizer, sft_data[0], accumulation=8)
    assert ra["steps"] == rb["steps"] == 16
    diff = (flat(a) - flat(b)).abs().max().item()
    assert diff < 1e-4, diff
    assert abs(ra["loss"] - rb["loss"]) < 1e-5


def test_gradient_checkpointing_same_update(tokenizer, sft_data):
    """train.gradient_checkpointing recomputes activations in the backward: the same training to float rounding."""
    torch.manual_seed(0)
    plain, _ = fit(tokenizer, sft_data[0], epochs=1)
    model = build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 64), tokenizer, seed=0)
    torch.manual_seed(0)
    fit_completions(model, sft_data[0], epochs=1, batch_size=8, lr=3e-3, rt=Runtime(CPU, None, checkpointing=True),
                    generator=torch.Generator().manual_seed(0))
    assert is_checkpointing(model)
    assert (flat(model) - flat(plain)).abs().max().item() < 1e-5


def test_checkpointing_on_cpu_trims_the_heap_after_each_micro_batch(monkeypatch):
    """With gradient checkpointing on CPU (memory asked for over time) the engine hands the heap's free pages back
    to the OS after every micro-batch; without it, never. The update is the same either way."""
    import rlhfkit.models.engine as engine_module
    from rlhfkit.models.runtime import release_free_memory

    assert release_free_memory() is True  # glibc here: malloc_trim is found and called
    calls = []
    monkeypatch.setattr(engine_module, "release_free_memory", lambda: calls.append(1))
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.randn(8, 1)
    weights = []
    for checkpointing in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        engine = make_engine({"m": model}, torch.optim.SGD(model.parameters(), lr=0.1), None, CPU, accumulation=4,
                             checkpointing=checkpointing)
        assert engine.trim_memory is checkpointing
        engine.step(torch.arange(8), lambda rows: (((model(x[rows]) - y[rows]) ** 2).mean(), {}))
        weights.append(model.weight.detach().clone())
        assert len(calls) == 4  # four micro-batches with checkpointing, then none without
    assert torch.equal(*weights)


class Stop(Exception):
    pass


class KillAt:
    """A callback that 'kills' the run right after step k (before its own checkpoint would be written)."""

    def __init__(self, k):
        self.k, self.steps, self.saves = k, [], []

    def on_step(self, step, metrics):
        self.steps.append(step)
        if step == self.k:
            raise Stop

    def on_save(self, step, path):
        self.saves.append(step)


@pytest.mark.parametrize("every,kill,saves", [(3, 11, [3, 6, 9]), (4, 10, [4, 8])])
def test_sft_resumes_mid_epoch_exactly(tmp_path, tokenizer, sft_data, every, kill, saves):
    """Killed at step 11 of 16 (checkpoints every 3 steps: the last at 9, mid-epoch 2), or at step 10 with the last
    checkpoint at 8 (the end of epoch 1: the next epoch's order is still to draw), the run goes on from that
    checkpoint and ends bit-identical to an uninterrupted one, its metrics log too (no step twice)."""
    opts = lambda cbs=(): LoopOptions(checkpoint_every=every, callbacks=list(cbs))  # noqa: E731
    whole, r_whole = fit(tokenizer, sft_data[0], log=tmp_path / "whole.jsonl", log_every=1, options=opts(),
                         checkpoint=tmp_path / "whole")
    killer = KillAt(kill)
    with pytest.raises(Stop):
        fit(tokenizer, sft_data[0], log=tmp_path / "run.jsonl", log_every=1, options=opts([killer]),
            checkpoint=tmp_path / "run")
    assert killer.saves == saves and (tmp_path / "run" / "checkpoint.pt").is_file()
    again = KillAt(-1)
    resumed, r_resumed = fit(tokenizer, sft_data[0], log=tmp_path / "run.jsonl", log_every=1,
                             options=opts([again]), checkpoint=tmp_path / "run")
    assert again.steps == list(range(saves[-1] + 1, 17))  # went on after the last checkpoint
    assert torch.equal(flat(resumed), flat(whole))
    assert r_resumed["loss"] == r_whole["loss"]
    assert read_metrics(tmp_path / "run.jsonl") == read_metrics(tmp_path / "whole.jsonl")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # finished: no stale checkpoint left behind


def test_a_checkpoint_resumes_only_under_the_sharding_that_wrote_it(tmp_path, tokenizer, sft_data):
    """A checkpoint written under train.sharding (optimiser state gathered from the shards) is refused by a run
    without it, with the setting named; an unknown sharding is refused by make_engine; alone it means plain steps."""
    opts = LoopOptions(checkpoint_every=4, callbacks=[KillAt(5)])
    with pytest.raises(Stop):
        fit(tokenizer, sft_data[0], options=opts, checkpoint=tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["sharding"] == "none"
    torch.save({**state, "sharding": "zero2"}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ConfigError, match="written with train.sharding = 'zero2'"):
        fit(tokenizer, sft_data[0], options=LoopOptions(checkpoint_every=4), checkpoint=tmp_path / "run")
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ConfigError, match="train.sharding = 'zero4'"):
        make_engine({"m": model}, torch.optim.SGD(model.parameters(), lr=0.1), None, CPU, sharding="zero4")
    assert make_engine({"m": model}, torch.optim.SGD(model.parameters(), lr=0.1), None, CPU,
                       sharding="zero3").sharding == "none"  # one process: nothing to shard
    from rlhfkit.pipeline.config import load_config

    with pytest.raises(ConfigError, match="train.sharding = 'zero1': 'zero1' is not a sharding; choose 'none'"):
        load_config(overrides=["train.sharding='zero1'"])

def test_periodic_eval_logged_under_eval_names(tmp_path, tokenizer, sft_data):
    train, heldout = sft_data
    _, result = fit(tokenizer, train, log=tmp_path / "m.jsonl", options=LoopOptions(eval_every=4), heldout=heldout)
    evals = [r for r in read_metrics(tmp_path / "m.jsonl") if "eval/loss/sft" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]  # not at the last step: the trainer's own evaluation is final
    assert evals[-1]["eval/loss/sft"] < evals[0]["eval/loss/sft"]  # it learns the held-out demonstrations too
    assert result["best_eval_loss"] == min(r["eval/loss/sft"] for r in evals)


def test_early_stopping_keeps_the_best_weights():
    """Scripted held-out losses 3, 2, 2.5, 2.6: with patience 2 training stops after the fourth evaluation and the
    weights of the second (step 2) are put back."""
    model = torch.nn.Linear(2, 1)
    engine = make_engine({"m": model}, torch.optim.SGD(model.parameters(), lr=0.5), None, CPU)
    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    weights = {}
    loop = Epochs(engine, n=8, batch_size=1, epochs=1, generator=torch.Generator().manual_seed(0),
                  desc="t", options=LoopOptions(eval_every=1, early_stopping_patience=2),
                  evaluate=lambda: {"loss": next(scripted)}, eval_loss="loss")
    x = torch.randn(8, 2)
    for idx in loop:
        out = engine.step(idx, lambda rows: (model(x[rows]).pow(2).mean(), {}))
        weights[loop.step + 1] = flat(model).clone()
        loop.done(out, {"loss": out["loss"]})
    result = loop.finish()
    assert result["stopped_early"] and result["steps"] == 4 and result["best_step"] == 2
    assert torch.equal(flat(model), weights[2])


# ---------------------------------------------------------------- several processes (gloo on CPU)

TINY = ["sft.n_demos=512", "sft.epochs=1", "sft.batch_size=16", "feedback.n_prompts=96", "reward.epochs=1",
        "reward.batch_size=16", "dpo.epochs=1", "dpo.batch_size=16", "device='cpu'", "threads=1"]


def launcher(processes):
    return ([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", str(processes),
             "--main_process_port", "29517", "-m", "rlhfkit"] if processes > 1 else [sys.executable, "-m", "rlhfkit"])


def rlhfkit(args, *, processes=1, env=None):
    """`rlhfkit ARGS` in a fresh process, or under `accelerate launch` with the shipped DDP config and N processes
    (gloo on CPU)."""
    sets = [a for s in TINY for a in ("--set", s)]
    run = subprocess.run(launcher(processes) + args + sets, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def tiny_start(out):
    """The weights SFT started from (the tiny policy TINY's config builds)."""
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.pipeline.config import load_config

    cfg = load_config(overrides=TINY)
    p = cfg.policy
    model = build_tiny_policy(TinyModelSpec(p.arch, p.n_layer, p.n_embd, p.n_head, p.n_ctx),
                              load_tokenizer(out / "sft" / "model", "sft"), cfg.seed)
    return {k: v.detach() for k, v in model.state_dict().items()}


def relative_gap(a, b, start):
    """||a - b|| / ||a - start|| over the weights `start` has too: how far apart the two runs ended, as a share of
    how far training moved. (A max elementwise difference says little under Adam: a weight whose gradient is ~0
    moves by +-lr on the sign of float noise.)"""
    norm = lambda ts: torch.sqrt(sum((t.double() ** 2).sum() for t in ts)).item()  # noqa: E731
    shared = [k for k in a if k in start and start[k].shape == a[k].shape]
    return norm(a[k] - b[k] for k in a) / norm(a[k] - start[k] for k in shared)


def kill_at_first_checkpoint_and_resume(out, sets):
    """A 2-process SFT into `out`, SIGKILLed (all its processes) once its first checkpoint is written, then the same
    command again: it must resume. Returns the resumed run's final weights."""
    args = ["sft", "--out", str(out)] + [a for s in TINY + sets for a in ("--set", s)]
    proc = subprocess.Popen(launcher(2) + args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = out / ".partial" / "sft" / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    import psutil  # accelerate's own dependency

    launched = psutil.Process(proc.pid)  # torchrun starts each worker in a session of its own: kill them by ancestry
    family = [launched, *launched.children(recursive=True)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()  # SIGKILL
    psutil.wait_procs(family, timeout=30)
    proc.wait()
    assert checkpoint.exists() and not (out / "sft").exists(), "the run ended before it could be killed"
    run = rlhfkit(["sft", "--out", str(out)] + [a for s in sets for a in ("--set", s)], processes=2)
    assert "resuming the interrupted run" in run.stdout
    return weights(out / "sft" / "model")


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """SFT, the reward model and DPO under 2 processes (each half of every batch, gradients all-reduced) end where
    one process ends at the same global batch, to float rounding; the 2-process run writes each output once."""
    one, two = tmp_path / "one", tmp_path / "two"
    for stage in ("sft", "feedback", "reward", "dpo"):
        rlhfkit([stage, "--out", str(one)])
    rlhfkit(["sft", "--out", str(two), "--set", "train.checkpoint_every=4"], processes=2)
    start = tiny_start(one)
    gaps = {"sft": relative_gap(weights(two / "sft" / "model"), weights(one / "sft" / "model"), start)}

    # SIGKILL the 2-process SFT once its first checkpoint is written; the same command then resumes it, and it
    # ends bit-identical to the uninterrupted 2-process run
    killed = tmp_path / "killed"
    resumed = kill_at_first_checkpoint_and_resume(killed, ["train.checkpoint_every=4"])
    whole = weights(two / "sft" / "model")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    shutil.rmtree(two)  # the reward model and DPO from the same SFT policy and comparisons as the 1-process run
    two.mkdir()
    for stage in ("sft", "feedback", "config.toml"):
        (shutil.copytree if (one / stage).is_dir() else shutil.copyfile)(one / stage, two / stage)
    for stage in ("reward", "dpo"):
        run = rlhfkit([stage, "--out", str(two)], processes=2)
        assert run.stdout.count(f"{stage}: running") == 1  # the main process logs, once
        gaps[stage] = relative_gap(weights(two / stage / "model"), weights(one / stage / "model"),
                                   weights(one / "sft" / "model"))
        lines = [r["step"] for r in read_metrics(two / stage / "metrics.jsonl")]
        assert lines == [r["step"] for r in read_metrics(one / stage / "metrics.jsonl")]  # once each, not twice
        a, b = (json.loads((d / stage / "COMPLETE.json").read_text()) for d in (one, two))
        assert abs(a["heldout_accuracy"] - b["heldout_accuracy"]) <= 1 / a["n_heldout"] + 1e-9, (a, b)
        assert abs(a["heldout_loss"] - b["heldout_loss"]) < 1e-3, (a, b)
    print("relative gap 2 processes vs 1:", gaps)
    assert max(gaps.values()) < 1e-2, gaps

    # PPO under 2 processes: each samples half of every rollout batch from its own stream (so the samples, unlike
    # the updates, are not one process's), the whitening and the logged figures are the whole batch's
    ppo = ["--set", "ppo.total_steps=2", "--set", "ppo.rollout_batch_size=16", "--set", "ppo.minibatch_size=8"]
    run = rlhfkit(["ppo", "--out", str(two)] + ppo, processes=2)
    assert run.stdout.count("ppo.steps = 2") == 1
    lines = read_metrics(two / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2]
    assert lines[0]["objective/kl"] == 0.0  # the first rollouts: policy = reference in both processes
    assert (two / "ppo" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sharded_processes_equal_one_and_resume(tmp_path):
    """train.sharding = "zero2" / "zero3" (FSDP2: each process keeps 1/2 of the optimiser state and gradients, and
    under zero3 of the weights): SFT, the reward model and DPO under 2 processes end where one process ends, to
    float rounding; the saved models are whole (tied weights written once); a SIGKILLed sharded SFT resumes
    bit-identical; PPO's checkpoint (optimiser state gathered from the shards) continues a run exactly."""
    one = tmp_path / "one"
    for stage in ("sft", "feedback", "reward", "dpo"):
        rlhfkit([stage, "--out", str(one)])
    start = tiny_start(one)
    gaps = {}
    for sharding in ("zero2", "zero3"):
        d = tmp_path / sharding
        rlhfkit(["sft", "--out", str(d), "--set", f"train.sharding='{sharding}'"], processes=2)
        got = weights(d / "sft" / "model")
        assert sorted(got) == sorted(weights(one / "sft" / "model"))  # no extra copy of the tied head
        gaps[f"sft {sharding}"] = relative_gap(got, weights(one / "sft" / "model"), start)
    resumed = kill_at_first_checkpoint_and_resume(tmp_path / "killed", ["train.checkpoint_every=4",
                                                                        "train.sharding='zero2'"])
    whole = weights(tmp_path / "zero2" / "sft" / "model")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)

    two = tmp_path / "two"  # the reward model and DPO from the same SFT policy and comparisons as one process
    two.mkdir()
    for stage in ("sft", "feedback", "config.toml"):
        (shutil.copytree if (one / stage).is_dir() else shutil.copyfile)(one / stage, two / stage)
    for stage in ("reward", "dpo"):
        rlhfkit([stage, "--out", str(two), "--set", "train.sharding='zero2'"], processes=2)
        gaps[stage] = relative_gap(weights(two / stage / "model"), weights(one / stage / "model"),
                                   weights(one / "sft" / "model"))
        a, b = (json.loads((d / stage / "COMPLETE.json").read_text()) for d in (one, two))
        assert abs(a["heldout_loss"] - b["heldout_loss"]) < 1e-3, (a, b)
    print("relative gap, 2 sharded processes vs 1:", gaps)
    assert max(gaps.values()) < 1e-2, gaps

    # PPO under zero3: 2 steps with a checkpoint each, continued to 3, equals 3 steps in one go, bit for bit; with a
    # value model of its own, and with a value head on the policy (ppo.value_init = 'shared': the head's weights
    # gathered from the shards into the checkpoint)
    for value_init in ("reward", "shared"):
        ppo = ["--set", "ppo.rollout_batch_size=16", "--set", "ppo.minibatch_size=8", "--set", "ppo.checkpoint_every=1",
               "--set", "train.sharding='zero3'", "--set", f"ppo.value_init='{value_init}'"]
        continued, straight = tmp_path / f"continued_{value_init}", tmp_path / f"straight_{value_init}"
        for d in (continued, straight):
            d.mkdir()
            for stage in ("sft", "feedback", "reward", "config.toml"):
                (shutil.copytree if (two / stage).is_dir() else shutil.copyfile)(two / stage, d / stage)
        rlhfkit(["ppo", "--out", str(continued), "--set", "ppo.total_steps=2"] + ppo, processes=2)
        run = rlhfkit(["ppo", "--out", str(continued), "--set", "ppo.total_steps=3"] + ppo, processes=2)
        assert "ppo.resumed = True" in run.stdout
        rlhfkit(["ppo", "--out", str(straight), "--set", "ppo.total_steps=3"] + ppo, processes=2)
        a, b = weights(continued / "ppo" / "model"), weights(straight / "ppo" / "model")
        assert all(torch.equal(a[k], b[k]) for k in a), value_init
        assert not all(torch.equal(a[k], weights(two / "sft" / "model")[k]) for k in a)  # PPO moved the policy
        critics = [weights(d / "ppo" / "checkpoint" / "value") if value_init == "reward" else
                   load_file(d / "ppo" / "checkpoint" / "value" / "value_head.safetensors") for d in (continued, straight)]
        assert all(torch.equal(critics[0][k], critics[1][k]) for k in critics[0]), value_init

@pytest.mark.slow
def test_self_training_under_two_processes(tmp_path):
    """Rejection sampling, ReST and online DPO under 2 processes: each samples half of a round's prompts, the sets
    are gathered in rank order (the prompts and their groups are one process's), every process selects the same
    rows, the fine-tuning / DPO is split over both, and the main process writes each file once; best-of-N's stage
    likewise."""
    one = tmp_path / "one"
    for stage in ("sft", "feedback", "reward"):
        rlhfkit([stage, "--out", str(one)])
    sets = {"rejection_sampling": ["rejection_sampling.rounds=2", "rejection_sampling.n_prompts=32",
                                   "rejection_sampling.k=4", "rejection_sampling.epochs=1",
                                   "rejection_sampling.batch_size=16"],
            "rest": ["rest.iterations=1", "rest.n_prompts=32", "rest.k=4", "rest.quantiles=[0.5, 0.8]",
                     "rest.batch_size=16"],
            "online_dpo": ["online_dpo.iterations=1", "online_dpo.n_prompts=32", "online_dpo.k=4",
                           "online_dpo.batch_size=8"]}
    files = {"rejection_sampling": "round-1/samples.jsonl", "rest": "iter-1/grow.jsonl",
             "online_dpo": "iter-1/samples.jsonl"}
    two = tmp_path / "two"
    shutil.copytree(one, two)
    for method, extra in sets.items():
        flags = [a for s in extra for a in ("--set", s)]
        rlhfkit([method, "--out", str(one)] + flags)
        run = rlhfkit([method, "--out", str(two)] + flags, processes=2)
        assert run.stdout.count(f"{method}: running") == 1
        rows = [json.loads(line) for line in (two / method / files[method]).read_text().splitlines()]
        single = [json.loads(line) for line in (one / method / files[method]).read_text().splitlines()]
        assert len(rows) == 32 * 4
        # the gathered set in the one-process layout: the same prompts in the same order, a prompt's 4 samples
        # consecutive under its group index; the samples themselves differ (process 1 draws from its own stream)
        assert [r["prompt"] for r in rows] == [r["prompt"] for r in single]
        assert [r["group"] for r in rows] == [i // 4 for i in range(32 * 4)]
        assert [r["completion"] for r in rows[:64]] != [r["completion"] for r in rows[64:]]
        records = read_metrics(two / method / "metrics.jsonl")
        assert [r["step"] for r in records] == [r["step"] for r in read_metrics(one / method / "metrics.jsonl")]
        assert records[0]["objective/kl_k1"] == pytest.approx(0.0, abs=1e-5)  # both halves sampled the SFT policy
        assert (two / method / "model" / "model.safetensors").is_file()
        if method == "rejection_sampling":
            for r in (r for r in rows if r["kept"]):  # every process kept the same rows: each prompt's best ended
                assert r["score"] == max(x["score"] for x in rows if x["group"] == r["group"] and x["ended"])
            assert records[0]["selection/kept_fraction"] == sum(r["kept"] for r in rows) / 32
        if method == "online_dpo":  # DPO's first loss, averaged over both processes' halves: ln 2 (policy = reference)
            assert records[0]["loss/dpo_initial"] == pytest.approx(math.log(2), abs=1e-4)

    # best-of-N's curve: half the prompts sampled by each process, gathered: the same lines as one process, the
    # sampled count the whole set's, the sampler written once
    bon = [a for s in ["best_of_n.n=4", "best_of_n.n_prompts=32"] for a in ("--set", s)]
    rlhfkit(["best_of_n", "--out", str(one)] + bon)
    run = rlhfkit(["best_of_n", "--out", str(two)] + bon, processes=2)
    assert run.stdout.count("best_of_n: running") == 1
    assert [r["step"] for r in read_metrics(two / "best_of_n" / "metrics.jsonl")] == [1, 2, 4]
    assert json.loads((two / "best_of_n" / "COMPLETE.json").read_text())["passes"]["sampled"] == 32 * 4
    assert (json.loads((two / "best_of_n" / "sampler.json").read_text())
            == json.loads((one / "best_of_n" / "sampler.json").read_text()))

    uneven = subprocess.run(launcher(2) + ["rejection_sampling", "--out", str(two)]
                            + [a for s in TINY + sets["rejection_sampling"][:1] + ["rejection_sampling.n_prompts=33"]
                               for a in ("--set", s)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert uneven.returncode != 0
    assert "rejection_sampling.n_prompts = 33 does not split evenly over 2 processes" in uneven.stdout + uneven.stderr

@pytest.mark.slow
def test_reward_dpo_kto_accumulation_equals_one_batch(tmp_path):
    """In one process, the reward model, DPO and KTO at batch 16 as 1 x 16 and as 4 micro-batches x 4 end at the
    same weights to float rounding (KTO's z0 taken over the whole batch, not each micro-batch)."""
    from rlhfkit.pipeline.config import load_config
    from rlhfkit.pipeline.stages import run_stage

    base = tmp_path / "one"
    cfg1 = load_config(overrides=TINY + ["kto.epochs=1", "kto.batch_size=16"])
    for stage in ("sft", "feedback"):
        run_stage(stage, cfg1, base)
    acc = tmp_path / "acc"
    acc.mkdir()
    for stage in ("sft", "feedback"):
        shutil.copytree(base / stage, acc / stage)
    cfg4 = load_config(overrides=TINY + ["kto.epochs=1", "kto.batch_size=16", "train.gradient_accumulation_steps=4"])
    gaps = {}
    for stage in ("reward", "dpo", "kto"):
        a, b = run_stage(stage, cfg1, base), run_stage(stage, cfg4, acc)
        gaps[stage] = relative_gap(weights(acc / stage / "model"), weights(base / stage / "model"),
                                   weights(base / "sft" / "model"))
        assert abs(a["heldout_loss"] - b["heldout_loss"]) < 1e-3, (stage, a, b)
    print("relative gap 4 micro-batches vs 1:", gaps)
    assert max(gaps.values()) < 1e-2, gaps


@pytest.mark.slow
def test_online_methods_accumulation_equals_one_batch(tmp_path):
    """PPO (token-weighted micro-batches), RLOO and GRPO (row-weighted): 2 iterations with minibatches as one
    micro-batch and as 4 end at the same policy to float rounding (the samples of iteration 2 are the same ones)."""
    from rlhfkit.pipeline.config import load_config
    from rlhfkit.pipeline.stages import run_stage

    online = ["ppo.total_steps=2", "ppo.rollout_batch_size=16", "ppo.minibatch_size=16", "ppo.ppo_epochs=2",
              "rloo.total_steps=2", "rloo.prompts_per_step=4", "rloo.k=4", "rloo.minibatch_size=16",
              "grpo.total_steps=2", "grpo.prompts_per_step=4", "grpo.k=4", "grpo.minibatch_size=16"]
    base, acc = tmp_path / "one", tmp_path / "acc"
    cfg1 = load_config(overrides=TINY + online)
    cfg4 = load_config(overrides=TINY + online + ["train.gradient_accumulation_steps=4"])
    for stage in ("sft", "feedback", "reward"):
        run_stage(stage, cfg1, base)
    acc.mkdir()
    for stage in ("sft", "feedback", "reward"):
        shutil.copytree(base / stage, acc / stage)
    gaps = {}
    for method in ("ppo", "rloo", "grpo"):
        a, b = run_stage(method, cfg1, base), run_stage(method, cfg4, acc)
        gaps[method] = relative_gap(weights(acc / method / "model"), weights(base / method / "model"),
                                    weights(base / "sft" / "model"))
        assert a["final_scores"] == pytest.approx(b["final_scores"], abs=1e-4), (method, a, b)
    print("relative gap 4 micro-batches vs 1:", gaps)
    assert max(gaps.values()) < 1e-2, gaps


@pytest.mark.slow
def test_online_pieces_under_two_processes(tmp_path):
    """A fixed batch split over 2 processes (tests/scripts/dist_oracle.py): PPO's whitening and reward
    normalisation over the whole batch, and a local-rows engine step with token-weighted micro-batches, equal what
    one process computes on the whole batch."""
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    try:
        import dist_oracle
    finally:
        sys.path.pop(0)
    engine_of = lambda m, clip=0.0: make_engine({"m": m}, torch.optim.SGD(m.parameters(), lr=0.1), None, CPU,  # noqa: E731
                                                max_grad_norm=clip)
    one = dist_oracle.compute(1, 0, engine_of)
    assert one["params_clipped"] != one["params_global"]  # the clipping norm bites
    for sharding in ("none", "zero2", "zero3"):  # DDP, and FSDP2 sharding the model (train.sharding)
        out = tmp_path / f"{sharding}.json"
        run = subprocess.run(launcher(2)[:-2] + [str(ROOT / "tests" / "scripts" / "dist_oracle.py"), str(out), sharding],
                             cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        two = json.loads(out.read_text())
        for key in ("whitened", "advantages", "scores", "params", "params_global", "params_clipped"):
            torch.testing.assert_close(torch.tensor(two[key]), torch.tensor(one[key]), rtol=0, atol=1e-6,
                                       msg=f"{sharding}: {key}")
