"""Rankings or thumbs at the same labelling budget (issue 19): DPO on the simulated labelers' rankings against KTO on
their thumbs up/down, on digits, from one default run's SFT model.

    .venv/bin/python benchmarks/thumbs_vs_rankings.py --base runs/acceptance/seed0-t1 --out runs/thumbs \
        [--prompts 250 1000 4000] [--seed 0] [--threads 1]

The budget is completions judged, summed over labelers: a K-way ranking of K completions costs K, a thumb costs 1.
At feedback.n_prompts = N, k = 4 and 3 labelers per item both kinds cost N * 4 * 3 judgements, on the same sampled
completions (the feedback stage draws the same items at a seed whatever the kind). Each budget runs the feedback
stage twice (rankings, then thumbs), DPO on the rankings' consensus comparisons and KTO on the thumbs, each at the
task's defaults, and evaluates both policies on the same held-out prompts. docs/methods/kto.md records the numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ARMS = {  # method -> the --set that gives it its labels
    "dpo": ["method='dpo'", "feedback.kind='rankings'"],
    "kto": ["method='kto'", "feedback.kind='thumbs'"],
}


def run_arm(base: Path, out: Path, sets: list[str]) -> tuple[dict, float]:
    """A copy of `base`'s SFT stage, then `rlhfkit run --update` with `sets`: its summary and wall time."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(base / "sft", out / "sft")
    shutil.copy(base / "config.toml", out / "config.toml")
    start = time.time()
    args = [a for s in sets for a in ("--set", s)]
    subprocess.run([sys.executable, "-m", "rlhfkit", "run", "--out", str(out), "--update", *args], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text()), time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="a default digits run (its sft/ and config.toml are used)")
    parser.add_argument("--out", default="runs/thumbs")
    parser.add_argument("--prompts", type=int, nargs="+", default=[250, 1000, 4000], help="feedback.n_prompts values")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for every run")
    args = parser.parse_args()
    base, out = Path(args.base), Path(args.out)
    rows, results = [], []
    for n in args.prompts:
        for method, arm in ARMS.items():
            sets = [f"seed={args.seed}", f"threads={args.threads}", f"feedback.n_prompts={n}", *arm, *args.overrides]
            summary, wall = run_arm(base, out / f"{method}-n{n}", sets)
            ev, fb = summary["eval"][method], summary["feedback"]
            labels = fb["n_thumbs"] if method == "kto" else fb["n_comparisons"]
            results.append({"n_prompts": n, "method": method, "judgements": fb["judgements"], "labels": labels,
                            "preferred_first_rate": ev["preferred_first_rate"],
                            "later_rule_validity": ev["later_rule_validity"], "kl": ev["kl"],
                            "sft_preferred_first_rate": summary["eval"]["sft"]["preferred_first_rate"],
                            "stage_wall_s": summary[method]["wall_time_s"], "run_wall_s": wall})
            r = results[-1]
            rows.append(f"| {r['judgements']} | {n} | {method} | {labels} | {r['preferred_first_rate']:.3f} | "
                        f"{r['later_rule_validity']:.3f} | {r['kl']:.2f} | {r['stage_wall_s']:.0f} s |")
            print(rows[-1], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nseed {args.seed}, {args.threads} thread(s); SFT preferred_first_rate "
          f"{results[0]['sft_preferred_first_rate']:.3f}")
    print("| judgements | n_prompts | method | labels | first | later | KL | stage wall |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
