"""`rlhfkit compare`: every method from the same SFT model, feedback and reward model, judged on the same
held-out prompts, in one report.

    OUT/<method>/            each method's stage, as `rlhfkit run --set method=...` makes it (reused when up to date)
    OUT/compare/report.md    the table, each method's curves, head-to-head win rates, Elo ladders
    OUT/compare/compare.json every figure of the report, and each policy's held-out completions

Phases:
    1. run the shared stages (SFT, feedback, reward model) and each method's stage; up-to-date ones are skipped,
       so the methods share one SFT model, one set of comparisons and one reward model
    2. evaluate SFT and every method's policy on the same held-out prompts (rlhfkit.evaluation)
    3. head to head: for every pair of policies and every prompt, whose completion wins by each judge: the reward
       model's score, the task's gold score where the task has one, and the AI judge's verdict on the two replies
       with eval.judge (ties count one half). With task = 'none' there is no gold scorer: the reward model (and
       the AI judge) judge alone, as said before anything trains
    4. Elo ladders from those matches (rlhfkit.feedback.elo), the table and the report

The reward model judges every policy, DPO's too (it is trained whether or not a method needs it), which favours
the methods that optimised against it; the gold judge is the check on that.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from itertools import combinations
from pathlib import Path

from rlhfkit.algorithms import METHODS
from rlhfkit.core.errors import RlhfkitError
from rlhfkit.core.runio import mark_complete, stage_result, write_json
from rlhfkit.evaluation.compare_report import write_compare_report
from rlhfkit.evaluation.evaluate import evaluate_run, judge_head_to_head, policy_of, win_outcome
from rlhfkit.feedback.elo import elo_ladder
from rlhfkit.models.load import quiet_transformers
from rlhfkit.models.runtime import runtime
from rlhfkit.pipeline import stages as pipeline
from rlhfkit.pipeline.config import Config
from rlhfkit.spine.judging import judge_cache_path, open_judge
from rlhfkit.spine.reward_sources import build_scorer
from rlhfkit.tasks import task_for


def head_to_head(scores: dict[str, list[float]]) -> tuple[dict[str, dict[str, float]], list[tuple[str, str, float]]]:
    """From each policy's per-prompt scores (the same prompts in the same order): the win rate of every policy
    against every other (ties count 1/2) and the matches, one per pair of policies and prompt, for Elo."""
    return tally({(a, b): [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(scores[a], scores[b], strict=True)]
                  for a, b in combinations(scores, 2)}, list(scores))


def tally(outcomes: dict[tuple[str, str], list[float]], names: list[str]):
    """Win rates and Elo matches from each pair (a, b)'s per-prompt outcomes for a (1 win, 0 loss, 1/2 tie)."""
    rates: dict[str, dict[str, float]] = {n: {} for n in names}
    matches = []
    for (a, b), results in outcomes.items():
        matches += [(a, b, o) for o in results]
        rates[a][b] = sum(results) / len(results)
        rates[b][a] = 1.0 - rates[a][b]
    return rates, matches


def compare_methods(cfg: Config) -> list[str]:
    """The methods to compare: compare.methods (Config.validate checks the names), or every registered method but
    those that need a chat model (SL-CAI: named in compare.methods, it runs)."""
    return list(cfg.compare.methods) or [m for m in METHODS if not METHODS[m].needs_chat]


def compare_judges(cfg: Config) -> list[str]:
    """Who judges the head-to-head matches: the reward model always (compare trains one), the task's gold
    score where the task has one (not with task = 'none'), and the AI judge of [judge] with eval.judge. Decided
    from the config, before anything trains."""
    return ["reward model"] + (["gold"] if cfg.task != "none" else []) + (["ai judge"] if cfg.eval.judge else [])


def run_compare(cfg: Config, out: str | Path, *, update: bool = False) -> dict:
    """Phases 1-4 into OUT; returns compare.json's figures."""
    out = Path(out)
    methods = compare_methods(cfg)
    configs = {m: dataclasses.replace(cfg, method=m) for m in methods}
    stages = {name: configs[m] for m in methods for name in pipeline.pipeline_stages(configs[m]) if name != "eval"}
    if "reward" not in stages:  # the judge of the head-to-head matches, even when no method needs it
        stages["reward"] = cfg
    stages = {name: stages[name] for name in pipeline.STAGES if name in stages}  # in pipeline order
    stale = {n: c for n, c_ in stages.items() if (c := pipeline.stage_changes(out, n, c_))}
    if stale and not update:
        raise RlhfkitError(
            f"{out} holds outputs made with another config "
            f"({'; '.join(f'{n}: {chr(44).join(c)}' for n, c in stale.items())}); rerun with --update to redo them, "
            "or use a new --out")
    for name, stage_cfg in stages.items():
        pipeline.preflight(stage_cfg, out, [name])
    judges = compare_judges(cfg)
    pipeline._log(f"compare: the head-to-head judges will be {' and '.join(judges)}"
                  + ("" if "gold" in judges else " (task = 'none' has no gold scorer)"))
    start = time.time()
    with pipeline.locked(out):
        # 1. Shared stages once, then each method's stage.
        for name, stage_cfg in stages.items():
            pipeline._stage(name, stage_cfg, out, fresh=False, skip_hint=f"`rlhfkit {name} --out {out} --fresh` redoes it")
        pipeline._log(f"compare: evaluating sft, {', '.join(methods)} on the same held-out prompts")
        partial = out / ".partial" / "compare"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        result = _compare(cfg, out, methods, partial)
        result["wall_time_s"] = time.time() - start
        mark_complete(partial, {k: v for k, v in result.items() if k in ("report", "wall_time_s")})
        pipeline._install(out, "compare", partial, cfg)
    return result


def _compare(cfg: Config, out: Path, methods: list[str], compare_dir: Path) -> dict:
    """Phases 2-4 into compare_dir."""
    quiet_transformers()
    task, rt = task_for(cfg), runtime(cfg)
    sft_dir, rm_dir = out / "sft" / "model", out / "reward" / "model"

    # 2. Every policy on the same held-out prompts.
    policies = {"sft": sft_dir, **{m: policy_of(METHODS[m], out / m) for m in methods}}
    toxicity = out / "toxicity" / "model" if cfg.toxicity.enabled else None  # each policy's toxicity_score
    judge = open_judge(cfg.judge, rt, judge_cache_path(cfg.judge, out)) if cfg.eval.judge else None
    ev = evaluate_run(cfg, task, sft_dir, rm_dir, policies, rt, keep_completions=True, toxicity_dir=toxicity,
                      judge=judge)
    prompts, completions = ev["completions"]["prompts"], ev["completions"]["by_policy"]

    # 3. Head to head, judged by the reward model and by the task's gold score (where there is one).
    scorer = build_scorer(cfg, task, rm_dir, rt)
    scores = {"reward model": {n: scorer(prompts, texts).tolist() for n, texts in completions.items()}}
    if "gold" in compare_judges(cfg):
        scores["gold"] = {n: [task.gold_score(p, c) for p, c in zip(prompts, texts)] for n, texts in completions.items()}
    matches = {name: head_to_head(by_policy) for name, by_policy in scores.items()}  # judge -> (rates, matches)
    if judge is not None:  # the AI judge compares the two replies themselves (rlhfkit.evaluation.evaluate)
        pairs = list(combinations(completions, 2))
        verdicts = judge_head_to_head(judge, cfg.judge, prompts, completions, pairs)
        matches["ai judge"] = tally({ab: [win_outcome(p) for p in ps] for ab, ps in verdicts.items()}, list(completions))

    # 4. Elo ladders, the table, the report.
    ladders = {judge: [dataclasses.asdict(r) for r in elo_ladder(m, rounds=100, seed=cfg.seed)]
               for judge, (_, m) in matches.items()}
    stages = {m: stage_result(out / m) for m in methods}
    result = {
        "methods": methods,
        "policies": {n: {k: v for k, v in r.items() if k != "samples"} for n, r in ev["policies"].items()},
        "stages": {m: {"wall_time_s": s.get("wall_time_s"), "passes": s.get("passes")} for m, s in stages.items()},
        "win_rates": {judge: rates for judge, (rates, _) in matches.items()},
        "elo": ladders,
        "report": "compare/report.md",
    }
    write_json(compare_dir / "compare.json", {**result, "completions": ev["completions"]})

    write_compare_report(compare_dir, result, cfg, out, task.gold_metric_names)
    return result
