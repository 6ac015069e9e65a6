"""Every method's default run on a GPU (`device = "cuda"`, `precision = "auto"`: bf16 autocast where supported),
stage by stage, with a time limit: the same pipeline as the CPU acceptance runs, to record the GPU figures.

    python benchmarks/gpu_methods.py --out /tmp/gpu [--limit-s 420] [--methods ppo dpo ...] [--json results.json]

Prints, per method, the evaluation's figures and each stage's wall time, and writes them as JSON. Stops
starting new methods once `--limit-s` has passed (what ran is kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from rlhfkit.algorithms import REGISTRY
    from rlhfkit.pipeline.config import load_config
    from rlhfkit.pipeline.stages import run_pipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit-s", type=float, default=420.0)
    parser.add_argument("--methods", nargs="+", default=list(REGISTRY))
    parser.add_argument("--json", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    start, results = time.time(), {}
    for method in args.methods:
        if time.time() - start > args.limit_s:
            print(f"[gpu] time limit: {method} not started", flush=True)
            break
        cfg = load_config(overrides=["device='cuda'", f"method='{method}'", *args.overrides])
        t0 = time.time()
        summary = run_pipeline(cfg, Path(args.out), update=True)
        ev = summary["eval"]
        results[method] = {"eval": {name: {k: v for k, v in fig.items() if isinstance(v, (int, float))}
                                    for name, fig in ev.items() if isinstance(fig, dict)},
                           "wall_time_s": summary["wall_time_s"], "this_run_s": time.time() - t0}
        if "reward" in summary:
            results[method]["rm_heldout_accuracy"] = summary["reward"].get("heldout_accuracy")
        print(f"[gpu] {method}: {json.dumps(results[method]['eval'][method])} in {time.time() - t0:.0f} s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
