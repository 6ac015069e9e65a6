"""GRPO on a reward written as a Python function: the `digits` rule check of examples/digits_reward.py as the only
reward source (no feedback, no reward model), for several seeds and thread counts; prints the outcome table and the
grpo targets of benchmarks/acceptance.py (the same bounds as GRPO from a reward model).

    .venv/bin/python benchmarks/python_reward.py [--out runs/python-reward] [--seeds 0 1 2] [--threads 1 2]
        [--set grpo.total_steps=200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acceptance import check_targets, method_targets, print_targets, rlhfkit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = f'reward.sources=[{{kind="python", function="{ROOT / "examples" / "digits_reward.py"}:rule_reward", name="rule"}}]'


def main() -> int:
    from rlhfkit.core.runio import read_json

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/python-reward")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    targets = method_targets("grpo")
    rows, margins = [], {}
    for threads in args.threads:
        for seed in args.seeds:
            run = Path(args.out) / f"seed{seed}-t{threads}"
            sets = [a for o in [f"seed={seed}", f"threads={threads}", "method='grpo'", SOURCE, *args.overrides]
                    for a in ("--set", o)]
            start = time.time()
            rlhfkit("run", "--out", str(run), *sets)
            summary = read_json(run / "summary.json")
            sft, ev = summary["eval"]["sft"], summary["eval"]["grpo"]
            assert "reward" not in summary or not summary["reward"], "no reward model is trained"
            rows.append(f"| {seed} | {threads} | {sft['preferred_first_rate']:.3f} | {ev['preferred_first_rate']:.3f} | "
                        f"{ev['later_rule_validity']:.3f} | {ev['well_formed_rate']:.3f} | {ev['reward']:.3f} | "
                        f"{ev['kl']:.2f} | {ev['kl_first_position_share']:.2f} | {summary['grpo']['wall_time_s']:.0f} s "
                        f"| {time.time() - start:.0f} s |")
            print(rows[-1], flush=True)
            for name, value, margin in check_targets(summary, None, targets):
                margins.setdefault(name, []).append((value, margin))
    print("\n| seed | threads | SFT first | GRPO first | later | well-formed | rule reward | KL | KL share pos 1 | "
          "GRPO stage | run |\n|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return print_targets(targets, margins)

if __name__ == "__main__":
    sys.exit(main())
