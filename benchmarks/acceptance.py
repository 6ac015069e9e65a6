"""Issue 2's acceptance runs: the default pipeline for three seeds, and the same runs with ppo.kl_coef=0.

    .venv/bin/python benchmarks/acceptance.py [--out runs/acceptance] [--seeds 0 1 2]

The kl_coef=0 run reuses each default run's SFT, feedback and reward stages (copied) and redoes PPO and
evaluation, so the two differ only in the KL penalty. Prints one line per run and checks the targets.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rlhfkit.runio import read_json


def rlhfkit(*args: str) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "rlhfkit", *args], check=True, stdout=subprocess.DEVNULL)
    return time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/acceptance")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    out = Path(args.out)
    ok = True
    for seed in args.seeds:
        run = out / f"seed{seed}"
        wall = rlhfkit("run", "--out", str(run), "--set", f"seed={seed}")
        beta0 = out / f"seed{seed}-kl0"
        shutil.rmtree(beta0, ignore_errors=True)
        shutil.copytree(run, beta0, ignore=shutil.ignore_patterns("ppo", "eval", "summary.json"))
        rlhfkit("ppo", "--out", str(beta0), "--set", "ppo.kl_coef=0")
        rlhfkit("eval", "--out", str(beta0))
        for name, path in ((f"seed{seed}", run), (f"seed{seed} kl_coef=0", beta0)):
            s = read_json(path / "summary.json")
            sft, ppo = s["eval"]["sft"], s["eval"]["ppo"]
            print(f"{name:<18} sft: first={sft['preferred_first_rate']:.3f} later={sft['later_rule_validity']:.3f} | "
                  f"RM acc={s['reward']['heldout_accuracy']:.3f} | ppo: first={ppo['preferred_first_rate']:.3f} "
                  f"later={ppo['later_rule_validity']:.3f} KL={ppo['kl']:.2f} (share at pos 1 "
                  f"{ppo['kl_first_position_share']:.2f})" + (f" | whole run {wall:.0f}s" if path == run else ""))
        default, free = read_json(run / "summary.json"), read_json(beta0 / "summary.json")
        d, f = default["eval"], free["eval"]
        checks = {
            "sft later >= 0.98": d["sft"]["later_rule_validity"] >= 0.98,
            "sft first in [0.25, 0.40]": 0.25 <= d["sft"]["preferred_first_rate"] <= 0.40,
            "RM accuracy >= 0.95": default["reward"]["heldout_accuracy"] >= 0.95,
            "ppo first >= 0.95": d["ppo"]["preferred_first_rate"] >= 0.95,
            "ppo later >= 0.95": d["ppo"]["later_rule_validity"] >= 0.95,
            "most KL at position 1": d["ppo"]["kl_first_position_share"] > 0.5,
            "kl_coef=0 KL clearly larger": f["ppo"]["kl"] > 2 * d["ppo"]["kl"],
            "whole run <= 300 s": wall <= 300,
        }
        failed = [k for k, v in checks.items() if not v]
        ok &= not failed
        print(f"seed{seed}: " + ("all targets met" if not failed else "FAILED: " + ", ".join(failed)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
