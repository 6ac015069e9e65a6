"""Peak resident memory per process of SFT and DPO under 2 processes (`accelerate launch`, gloo on CPU) with
train.sharding = "none" (DDP), "zero2" and "zero3" (torch FSDP2: rlhfkit/models/engine.py), on a digits policy wide
enough for the optimiser state to count (12 layers x 768 by default, GPT-2 small's blocks: 85M parameters, 340 MB in
fp32, AdamW's two moments another 680 MB). Each stage in a fresh `accelerate launch`; two figures, each the larger of
the two workers': the peak over the training steps (ru_maxrss at the last step, through an on_step callback) and over
the whole stage (which adds the final held-out evaluation with the model whole, and the save). Also the wall time,
and how far each sharded run's weights end from the DDP run's (SFT: relative to the weights' norm; DPO: to how far
DPO moved them), since sharding must change the update by float rounding only.

    .venv/bin/python benchmarks/sharding_memory.py [--layers 12] [--width 768] [--stages sft,dpo]
        [--out runs/sharding_memory] [--malloc-mmap-threshold 1048576]

On CPU the default glibc heap keeps freed blocks resident (a step's all-gather and reduce-scatter buffers, the
activations), which hides most of what sharding saves at the peak; --malloc-mmap-threshold shows the live memory.

DPO reads the comparisons of one feedback stage (run once, in one process) and starts from the DDP run's SFT policy,
so the three DPO runs differ only in the sharding.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SHARDINGS = ("none", "zero2", "zero3")


class _TrainingPeak:
    """An rlhfkit callback: this process's ru_maxrss at each training step, written at exit to $PEAK_FILE.rank."""

    def __init__(self):
        self.kib = 0
        atexit.register(self._write)

    def on_step(self, step, metrics):
        self.kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def _write(self):
        Path(f"{os.environ['PEAK_FILE']}.{os.environ.get('RANK', '0')}").write_text(str(self.kib))


def as_stage(argv: list[str]) -> int:
    """`rlhfkit ARGV` in this process, with _TrainingPeak as the loop's callback (what the launcher runs)."""
    from rlhfkit.cli import main as rlhfkit_main
    from rlhfkit.spine.epochs import use_callbacks

    with use_callbacks([_TrainingPeak()]):
        return rlhfkit_main(argv)


def launch(args: list[str], processes: int = 2, peak_file: Path | None = None) -> tuple[float, float, float]:
    """`rlhfkit ARGS` under accelerate launch (or alone); returns (wall s, peak RSS of the largest worker over the
    stage, MiB, and over its training steps, MiB: 0 without peak_file)."""
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", str(processes),
               "--main_process_port", "29541", str(Path(__file__).resolve()), "--as-stage"] + args
    else:
        cmd = [sys.executable, "-m", "rlhfkit"] + args
    # a fresh interpreter of its own, so that RUSAGE_CHILDREN's ru_maxrss (the largest descendant, KiB) is this run's
    probe = ("import json, resource, subprocess, sys, time; t = time.time(); "
             "subprocess.run(json.loads(sys.argv[1]), check=True, stdout=subprocess.DEVNULL); "
             "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PEAK_FILE": str(peak_file or "/dev/null/none")}
    done = subprocess.run([sys.executable, "-c", probe, json.dumps(cmd)], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    wall, kib = done.stdout.split()
    training = max((float(f.read_text()) for f in peak_file.parent.glob(peak_file.name + ".*")), default=0.0) \
        if peak_file is not None else 0.0
    return float(wall), float(kib) / 1024, training / 1024


def _norm(tensors) -> float:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).item()


def _weights(stage_dir: Path) -> dict:
    return load_file(str(stage_dir / "model" / "model.safetensors"))


def moved_gap(a: Path, b: Path, start: Path) -> float:
    """||a - b|| / ||a - start||: how far two runs ended apart, as a share of how far training moved them."""
    wa, wb, ws = _weights(a), _weights(b), _weights(start)
    return _norm(wa[k] - wb[k] for k in wa) / _norm(wa[k] - ws[k] for k in wa)


def relative(a: Path, b: Path) -> float:
    """||a - b|| / ||a||: SFT's runs start from the same seeded random weights, which are not saved."""
    wa, wb = _weights(a), _weights(b)
    return _norm(wa[k] - wb[k] for k in wa) / _norm(wa.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--out", default="runs/sharding_memory")
    ap.add_argument("--stages", default="sft,dpo", help="sft, or sft,dpo")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=0,
                    help="set glibc's MALLOC_MMAP_THRESHOLD_ for the runs (e.g. 1048576): every block over it is its "
                         "own mapping, returned to the OS when freed, so the peak is live memory rather than a "
                         "fragmented heap (slower); 0 = glibc's default")
    args = ap.parse_args()
    if args.malloc_mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)  # inherited by every launched run
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"policy.n_layer={args.layers}", f"policy.n_embd={args.width}", f"policy.n_head={max(args.width // 64, 1)}",
            "sft.n_demos=512", "sft.epochs=1", "sft.batch_size=32", "sft.lr=3e-4", "feedback.n_prompts=128",
            "dpo.epochs=1", "dpo.batch_size=16", "device='cpu'", "threads=1"]
    flags = lambda extra: [a for s in sets + extra for a in ("--set", s)]  # noqa: E731
    rows = {}
    for sharding in SHARDINGS:
        d = out / sharding
        rows[("sft", sharding)] = launch(["sft", "--out", str(d)] + flags([f"train.sharding='{sharding}'"]),
                                         peak_file=out / f"peak-sft-{sharding}")
        print(f"sft {sharding}: {rows[('sft', sharding)]}", flush=True)
    gaps = {("sft", sh): relative(out / "none" / "sft", out / sh / "sft") for sh in SHARDINGS[1:]}
    stages = args.stages.split(",")
    if "dpo" in stages:
        dpo(out, flags, rows, gaps)
    report(out, args, rows, gaps, stages)


def dpo(out: Path, flags, rows: dict, gaps: dict) -> None:
    launch(["feedback", "--out", str(out / "none")] + flags([]), processes=1)
    for sharding in SHARDINGS[1:]:
        shutil.rmtree(out / sharding / "sft")
        shutil.copytree(out / "none" / "sft", out / sharding / "sft")
        shutil.copytree(out / "none" / "feedback", out / sharding / "feedback")
    for sharding in SHARDINGS:
        d = out / sharding
        rows[("dpo", sharding)] = launch(["dpo", "--out", str(d)] + flags([f"train.sharding='{sharding}'"]),
                                         peak_file=out / f"peak-dpo-{sharding}")
        print(f"dpo {sharding}: {rows[('dpo', sharding)]}", flush=True)
    gaps |= {("dpo", sh): moved_gap(out / "none" / "dpo", out / sh / "dpo", out / "none" / "sft") for sh in SHARDINGS[1:]}


def report(out: Path, args, rows: dict, gaps: dict, stages: list[str]) -> None:
    params = sum(t.numel() for t in load_file(str(out / "none" / "sft" / "model" / "model.safetensors")).values())
    allocator = f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold else "glibc default"
    print(f"\n2 processes x 1 thread, CPU (gloo); policy {args.layers} x {args.width}, {params / 1e6:.1f}M parameters; "
          f"allocator: {allocator}")
    print("| stage | sharding | peak RSS per process, training steps (MiB) | vs DDP | whole stage (MiB) | vs DDP "
          "| wall (s) | weights' gap to DDP |")
    print("|---|---|---|---|---|---|---|---|")
    for stage in stages:
        _, base, base_train = rows[(stage, "none")]
        for sharding in SHARDINGS:
            wall, mib, train = rows[(stage, sharding)]
            g = "-" if sharding == "none" else f"{gaps[(stage, sharding)]:.1e}"
            print(f"| {stage} | {sharding} | {train:,.0f} | {train - base_train:+,.0f} | {mib:,.0f} | {mib - base:+,.0f} "
                  f"| {wall:.1f} | {g} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--as-stage":
        sys.exit(as_stage(sys.argv[2:]))
    main()
