"""Where and how tensors are computed: device, precision (autocast), CPU threads, and a note when the machine is
busy. Every stage starts with `rt = runtime(cfg)`.

Layer: models (imports core only).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.core import dist
from rlhfkit.core.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU. Anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device = {name!r} is not a device torch knows ({e}); use 'auto', 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but CUDA is not available here; use device = 'auto' or 'cpu'")
    return device


def resolve_precision(precision: str, device: torch.device, model_dir: str | Path | None = None) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. 'auto' = bf16 on CUDA with bf16 support; on a CPU with bf16
    matrix instructions, bf16 for a model of your own (`model_dir`) at least CPU_BF16_MIN_WIDTH wide
    (cpu_bf16_pays); else fp32."""
    if precision == "fp32":
        return None
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if bf16_ok or (device.type == "cpu" and cpu_bf16_pays(model_dir)) else None
    if precision == "bf16":
        if device.type == "cuda" and not bf16_ok:
            raise ConfigError("precision = 'bf16' but this GPU does not support bf16; use 'fp32' or 'auto'")
        return torch.bfloat16
    raise ConfigError(f"precision = {precision!r}; choose 'auto', 'fp32' or 'bf16'")


# bf16 autocast against fp32, one training step (forward and backward) of a 4-layer GPT-2 at 16 x 128 tokens, 2
# threads, AMD EPYC with AVX512-BF16: 1.22x at width 64, 1.67x at 128, 1.95x at 256, 2.03x at 512 (bf16 matmul
# 2.6x fp32's). From 256 the gain is about the matmul's; the tiny built-in models (64 wide) stay exact in fp32.
CPU_BF16_MIN_WIDTH = 256


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16; Linux's /proc/cpuinfo flags). Without
    them bf16 is emulated and slower than fp32."""
    try:
        return flags_have_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def flags_have_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's text lists AVX512-BF16 or AMX-BF16 among the CPU's flags."""
    flags = set(cpuinfo.split())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def model_width(model_dir: str | Path) -> int | None:
    """The hidden width in a model directory's config.json (hidden_size, n_embd or d_model), None when it has none
    or it cannot be read."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def cpu_bf16_pays(model_dir: str | Path | None) -> bool:
    """precision = 'auto' on CPU: bf16 for a model of your own (not the built-in tiny ones) on a CPU with native
    bf16 whose config.json says it is at least CPU_BF16_MIN_WIDTH wide; fp32 when the width cannot be read."""
    if not model_dir or not cpu_has_bf16():
        return False
    width = model_width(model_dir)
    return width is not None and width >= CPU_BF16_MIN_WIDTH


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for the forward passes (a no-op in fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice (cores or OMP_NUM_THREADS), for threads = 0


@dataclass
class Runtime:
    """Where and how tensors are computed for this run."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    accumulation: int = 1  # micro-batches per optimiser step (train.gradient_accumulation_steps)
    checkpointing: bool = False  # gradient checkpointing (train.gradient_checkpointing)
    sharding: str = "none"  # train.sharding: DDP or FSDP2 sharding under several processes (models/engine.py)
    padding_free: bool = False  # train.padding_free: batches packed without padding (models/forward.py)
    shared_prefix: bool = False  # train.shared_prefix: rows' common beginnings forwarded once (models/forward.py)

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A batch's tensor, cut from a dataset held on the host, on the run's device. The offline trainers keep
        their tokenised data in host memory and move each (micro-)batch as it is used, as a DataLoader does (a
        GPU holds the model and the step, not the dataset: 10,000 pairs of 1,024 tokens are 0.5 GB of ids and
        masks). Indices into host data stay on the host; a model's outputs are on the device, so whatever of the
        data meets them in a loss goes through here too (tests/test_host_data.py runs every offline trainer on a
        stand-in device that fails where a tensor was not moved)."""
        return t.to(self.device)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another OS)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim(0)); False where there is none to call.

    Why: on CPU, torch's tensors below glibc's mmap threshold (which grows to 32 MB as big blocks are freed) live
    in the heap, and a training step's short-lived activations, interleaved with long-lived ones (checkpointed
    layer inputs), leave it fragmented: freed memory stays resident. On the SmolLM2 DPO step with gradient
    checkpointing, trimming after each micro-batch took the peak from 1,918 to 1,626 MiB at no measurable time
    (benchmarks/logprob_memory.py; docs/methods/dpo.md, "Memory")."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def runtime(cfg) -> Runtime:
    """Device, precision and CPU threads of a run. The thread count is set explicitly (the `threads` field,
    1 by default) because CPU results depend on it: float sums are split across threads, so 1 and 2
    threads give different last bits, which a long run amplifies into different models."""
    torch.set_num_threads(torch_threads(cfg))
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None and dist.is_distributed():
        device = torch.device("cuda", dist.local_rank())  # one GPU a process under `accelerate launch`
    train = getattr(cfg, "train", None)
    policy = getattr(cfg, "policy", None)
    return Runtime(device, resolve_precision(cfg.precision, device, policy.path if policy is not None else None),
                   train.gradient_accumulation_steps if train is not None else 1,
                   train.gradient_checkpointing if train is not None else False,
                   train.sharding if train is not None else "none",
                   train.padding_free if train is not None else False,
                   train.shared_prefix if train is not None else False)


def torch_threads(cfg) -> int:
    """The CPU threads a run uses: `threads`, or torch's own default when it is 0."""
    return cfg.threads if cfg.threads > 0 else TORCH_DEFAULT_THREADS


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_machine_note(threads: int) -> str | None:
    """A warning when other work already keeps the cores busy (1-minute load average), else None.
    Oversubscribed CPU threads slow a run far more than 2x, because threads wait for each other."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], usable_cores()
    if load + threads <= cores + 0.5:
        return None
    return (f"the machine is busy: load average {load:.1f} on {cores} cores, and this run uses {threads} "
            f"thread{'s' if threads > 1 else ''}; it will run slower than usual (results do not change). "
            "Lower `threads` or let the other jobs finish first.")


_load_checked = False


@contextlib.contextmanager
def cpu_watch(cfg, name: str, warn, min_seconds: float = 10.0):
    """On CPU, tell the user when the machine is oversubscribed: before the first stage of a process, when
    other jobs already load the cores; after each stage, when it got less than 60% of the CPU its threads
    ask for. Either way the run only gets slower: results do not depend on load."""
    threads = torch_threads(cfg)
    if resolve_device(cfg.device).type != "cpu":
        yield
        return
    global _load_checked
    if not _load_checked:  # once per process: later, the load average counts this run's own work too
        _load_checked = True
        if (note := busy_machine_note(threads)) is not None:
            warn(note)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    yield
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if wall >= min_seconds and cpu / (wall * threads) < 0.6:
        warn(f"{name} got {cpu / (wall * threads):.0%} of the {threads} CPU thread{'s' if threads > 1 else ''} it "
             f"asked for over {wall:.0f} s: the machine is oversubscribed, so the run is slower than usual "
             "(results do not change)")
