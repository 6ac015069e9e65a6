"""The run's CPU threads are fixed by the config, an oversubscribed machine is reported, not hidden, and
precision = "auto" picks bf16 on a CPU only where it pays (bf16 instructions, a wide model of your own)."""

import pytest
import torch

import rlhfkit.models.runtime as training
from rlhfkit.pipeline.config import load_config


def test_threads_default_is_fixed_and_applied():
    before = torch.get_num_threads()
    try:
        cfg = load_config(overrides=["device='cpu'"])
        assert cfg.threads == 1  # documented default: not "whatever torch picks on this machine"
        training.runtime(cfg)
        assert torch.get_num_threads() == 1
        training.runtime(load_config(overrides=["device='cpu'", "threads=2"]))
        assert torch.get_num_threads() == 2
        training.runtime(load_config(overrides=["device='cpu'", "threads=0"]))
        assert torch.get_num_threads() == training.TORCH_DEFAULT_THREADS
    finally:
        torch.set_num_threads(before)


def test_busy_machine_note(monkeypatch):
    monkeypatch.setattr(training, "usable_cores", lambda: 2)
    monkeypatch.setattr(training.os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    note = training.busy_machine_note(threads=1)
    assert note is not None and "load average 1.9 on 2 cores" in note and "results do not change" in note
    assert training.busy_machine_note(threads=2) is not None
    monkeypatch.setattr(training.os, "getloadavg", lambda: (0.3, 1.0, 1.0))
    assert training.busy_machine_note(threads=1) is None
    assert training.busy_machine_note(threads=2) is None  # a little background load is not a warning
    monkeypatch.setattr(training.os, "getloadavg", lambda: (0.9, 1.0, 1.0))
    assert training.busy_machine_note(threads=2) is not None  # 2 threads + 0.9 load > 2 cores + 0.5


class FakeClocks:
    """Wall and CPU clocks that advance by set amounts per stage, so the test does not depend on the load."""

    def __init__(self, wall, cpu):
        self.wall, self.cpu, self.calls = wall, cpu, {"wall": 0, "cpu": 0}

    def perf_counter(self):
        self.calls["wall"] += 1
        return 0.0 if self.calls["wall"] == 1 else self.wall

    def process_time(self):
        self.calls["cpu"] += 1
        return 0.0 if self.calls["cpu"] == 1 else self.cpu


@pytest.mark.parametrize("threads,cpu_seconds,warned", [(1, 9.0, False), (1, 4.0, True), (2, 14.0, False), (2, 8.0, True)])
def test_cpu_watch_reports_a_stage_starved_of_cpu(monkeypatch, threads, cpu_seconds, warned):
    """A stage that got less than 60% of the CPU its threads ask for (over 10 s of wall time) is reported."""
    monkeypatch.setattr(training, "_load_checked", True)
    clocks = FakeClocks(wall=10.0, cpu=cpu_seconds)
    monkeypatch.setattr(training.time, "perf_counter", clocks.perf_counter)
    monkeypatch.setattr(training.time, "process_time", clocks.process_time)
    cfg = load_config(overrides=["device='cpu'", f"threads={threads}"])
    notes = []
    with training.cpu_watch(cfg, "sft", notes.append, min_seconds=5.0):
        pass
    assert bool(notes) == warned
    if warned:
        assert notes[0].startswith(f"sft got {cpu_seconds / (10 * threads):.0%} of the {threads} CPU thread")
        assert "oversubscribed" in notes[0]


def test_load_is_checked_once_per_process(monkeypatch):
    monkeypatch.setattr(training, "_load_checked", False)
    monkeypatch.setattr(training, "busy_machine_note", lambda threads: "busy")
    cfg = load_config(overrides=["device='cpu'"])
    notes = []
    for _ in range(2):
        with training.cpu_watch(cfg, "stage", notes.append):
            pass
    assert notes == ["busy"]


def model_dir(tmp_path, name, **config):
    d = tmp_path / name
    d.mkdir()
    if config:
        (d / "config.json").write_text(__import__("json").dumps(config))
    return str(d)


def test_cpu_flags_with_bf16():
    assert training.flags_have_bf16("flags : fpu avx2 avx512f avx512_bf16 avx512_vnni")
    assert training.flags_have_bf16("flags : fpu avx512f amx_bf16 amx_tile")
    assert not training.flags_have_bf16("flags : fpu avx2 avx512f avx512bw avx512_vnni")
    assert not training.flags_have_bf16("flags : avx512_bf16x")  # a whole flag, not a prefix


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_on_cpu_picks_bf16_where_it_pays(monkeypatch, tmp_path, has_bf16):
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: has_bf16)
    cpu = torch.device("cpu")
    wide = model_dir(tmp_path, "wide", n_embd=training.CPU_BF16_MIN_WIDTH)  # GPT-2's name
    llama = model_dir(tmp_path, "llama", hidden_size=576)
    narrow = model_dir(tmp_path, "narrow", n_embd=training.CPU_BF16_MIN_WIDTH - 1)
    unknown = model_dir(tmp_path, "unknown")  # no config.json
    expected = torch.bfloat16 if has_bf16 else None
    assert training.resolve_precision("auto", cpu, wide) is expected
    assert training.resolve_precision("auto", cpu, llama) is expected
    for d in (narrow, unknown, None, ""):
        assert training.resolve_precision("auto", cpu, d) is None, d
    assert training.resolve_precision("fp32", cpu, wide) is None  # an explicit choice wins
    assert training.resolve_precision("bf16", cpu, narrow) is torch.bfloat16

    before = torch.get_num_threads()
    try:
        rt = training.runtime(load_config(overrides=["device='cpu'", f"policy.path='{wide}'"]))
        assert rt.dtype is expected
        assert training.runtime(load_config(overrides=["device='cpu'"])).dtype is None  # the built-in tiny model
    finally:
        torch.set_num_threads(before)
