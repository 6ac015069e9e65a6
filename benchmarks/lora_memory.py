"""Peak memory of one PPO (or DPO) stage with and without LoRA, on the same SFT model, comparisons and reward
model. Each stage runs in its own process; the figure is that process's peak resident memory (ru_maxrss).

    .venv/bin/python benchmarks/lora_memory.py [--out runs/lora-memory] [--method ppo] [--n-embd 512] \
        [--set ppo.value_init=shared]

The shared stages use a wider tiny model than the default (n_embd, 4 layers) so the weights, not the Python
runtime, dominate memory. Without LoRA a run holds the policy, a frozen copy as reference and AdamW's two
moments of every weight; with LoRA one set of weights serves policy and reference, and AdamW keeps moments of
the adapters only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STAGE = """
import json, resource, sys, time
from rlhfkit.pipeline.config import load_config
from rlhfkit.pipeline.stages import run_stage
cfg = load_config(overrides=json.loads(sys.argv[1]))
start = time.time()
result = run_stage(cfg.method, cfg, sys.argv[2], fresh=True)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "wall_time_s": time.time() - start}))
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/lora-memory")
    parser.add_argument("--method", default="ppo")
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a further config override for every stage, e.g. ppo.value_init=shared")
    args = parser.parse_args()
    base = [f"policy.n_embd={args.n_embd}", "policy.n_layer=4", "policy.n_head=8", "sft.n_demos=4000", "sft.epochs=1",
            "sft.lr=0.001", "feedback.n_prompts=400", "reward.epochs=1", "ppo.total_steps=4",
            "ppo.rollout_batch_size=64", "dpo.epochs=1", "eval.n_prompts=100", "device='cpu'",
            f"method='{args.method}'", *args.overrides]
    out = Path(args.out)
    subprocess.run([sys.executable, "-m", "rlhfkit", "run", "--out", str(out),
                    *[a for o in base for a in ("--set", o)]], check=True, stdout=subprocess.DEVNULL)
    rows = {}
    for label, extra in (("full fine-tuning", ["lora.r=0"]), (f"LoRA r={args.rank}", [f"lora.r={args.rank}"])):
        proc = subprocess.run([sys.executable, "-c", STAGE, json.dumps(base + extra), str(out)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{label}: the stage failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"| {args.method} stage, n_embd {args.n_embd}, 4 layers | peak RSS | wall time |\n|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['peak_rss_mib']:.0f} MiB | {r['wall_time_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
