"""The default digits pipeline as one process (1 thread, 2 threads) and as 2 processes of 1 thread each under
`accelerate launch` (configs/accelerate/ddp.yaml: DDP, gloo on CPU): outcomes and wall time per stage, and the
peak resident memory of the processes. One after the other, each in a fresh output directory.

    .venv/bin/python benchmarks/scale_out.py [--out runs/scale_out] [--set KEY=VALUE ...]

Under 2 processes SFT, the reward model, DPO and PPO (RLOO, GRPO) split every batch; the feedback stage and the
evaluation run on the main process while the other waits (README, "Scaling out").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = [("RM held-out accuracy", lambda s: s["reward"]["heldout_accuracy"]),
           ("SFT held-out loss", lambda s: s["sft"]["heldout_loss"]),
           ("PPO first-digit rate", lambda s: s["eval"]["ppo"]["preferred_first_rate"]),
           ("PPO later validity", lambda s: s["eval"]["ppo"]["later_rule_validity"]),
           ("PPO KL (nats)", lambda s: s["eval"]["ppo"]["kl"])]


def launch(processes: int, out: Path, sets: list[str]) -> tuple[float, float]:
    """Run the pipeline; returns (wall seconds, peak resident memory of the largest child process, GiB)."""
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", str(processes),
               "--main_process_port", "29531", "-m", "rlhfkit", "run"]
    else:
        cmd = [sys.executable, "-m", "rlhfkit", "run"]
    cmd += ["--out", str(out)] + [a for s in sets for a in ("--set", s)]
    # in a fresh interpreter of its own, so that its children's peak resident memory (ru_maxrss: the largest
    # process, i.e. one worker; KiB on Linux) is this run's alone
    probe = ("import json, resource, subprocess, sys, time; t = time.time(); "
             "subprocess.run(json.loads(sys.argv[1]), check=True, stdout=subprocess.DEVNULL); "
             "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, json.dumps(cmd)], cwd=ROOT, check=True, capture_output=True,
                          text=True)
    wall, kib = done.stdout.split()
    return float(wall), float(kib) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/scale_out")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    args = ap.parse_args()
    out = Path(args.out)
    runs = [("1 process, 1 thread", 1, ["threads=1"]), ("1 process, 2 threads", 1, ["threads=2"]),
            ("2 processes x 1 thread", 2, ["threads=1"])]
    rows = []
    for name, processes, sets in runs:
        d = out / name.replace(" ", "_").replace(",", "")
        shutil.rmtree(d, ignore_errors=True)
        wall, peak = launch(processes, d, args.sets + sets)
        summary = json.loads((d / "summary.json").read_text())
        stages = {k: v for k, v in summary["wall_time_s"].items() if k != "total_this_invocation"}
        rows.append((name, wall, peak, summary, stages))
        print(f"{name}: {wall:.0f} s", flush=True)
    print("\n| run | " + " | ".join(f for f, _ in FIGURES) + " | stage wall times (s) | total | peak RSS of one process |")
    print("|---" * (len(FIGURES) + 4) + "|")
    for name, wall, peak, summary, stages in rows:
        cells = " | ".join(f"{get(summary):.3f}" for _, get in FIGURES)
        times = ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
        print(f"| {name} | {cells} | {times} | {wall:.0f} s | {peak:.2f} GiB |")


if __name__ == "__main__":
    main()
