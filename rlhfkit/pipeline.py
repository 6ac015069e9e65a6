"""The pipeline: stages, their output directories, skipping finished stages and resuming PPO.

    OUT/config.toml          the resolved config of the run
    OUT/sft/                 model/ (policy, save_pretrained), metrics.jsonl
    OUT/feedback/            comparisons.jsonl, rankings.jsonl (the data contract), stats.json
    OUT/labeling/            the labeling app's project when feedback.labeler = "human" (kept across reruns)
    OUT/reward/              model/ (reward model), metrics.jsonl
    OUT/ppo/                 model/, metrics.jsonl, checkpoint/ (resumable)
    OUT/eval/                eval.json, report.md + plots
    OUT/summary.json         every figure of the report and each stage's wall time

Each stage directory gets COMPLETE.json (its result) last; a stage without it is redone (PPO resumes
from its checkpoint). Every stage is also a plain function call: `run_stage("ppo", cfg, out)`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rlhfkit.config import Config, config_diff, config_to_dict, config_to_toml, load_config
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.runio import is_complete, mark_complete, stage_result, write_json

STAGES = ("sft", "feedback", "reward", "ppo", "eval")


class WaitingForLabels(RlhfkitError):
    """The human feedback stage is waiting for labelers; rerun `rlhfkit run` once they are done."""


def _log(msg: str) -> None:
    print(f"[rlhfkit] {msg}", flush=True)


def prepare_out(cfg: Config, out: Path, *, replace_config: bool = False) -> None:
    """Create OUT and record the config; refuse to mix configs in one directory unless asked."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.toml"
    if path.exists():
        saved = load_config(path)
        diff = config_diff(saved, cfg)
        if diff and not replace_config:
            raise ConfigError(
                f"{out} was made with another config ({'; '.join(diff)}). Use a new --out, or rerun one stage "
                f"with its own command, e.g. `rlhfkit ppo --out {out} --set ... --fresh`"
            )
        if not diff:
            return
    path.write_text(config_to_toml(cfg), encoding="utf-8")


def _require(out: Path, stage: str, needed: str) -> Path:
    d = out / needed
    if not is_complete(d):
        raise RlhfkitError(f"stage '{stage}' needs the '{needed}' stage in {out}; run `rlhfkit {needed} --out {out}` first")
    return d


def _comparisons_path(cfg: Config, out: Path) -> Path:
    if cfg.reward.data:
        return Path(cfg.reward.data)
    return _require(out, "reward", "feedback") / "comparisons.jsonl"


def _run(name: str, cfg: Config, out: Path, stage_dir: Path) -> dict:
    from rlhfkit.models import quiet_transformers
    from rlhfkit.tasks import get_task
    from rlhfkit.training import runtime

    quiet_transformers()
    task, rt = get_task(cfg.task), runtime(cfg)
    if name == "sft":
        from rlhfkit.algorithms.sft import train_sft

        return train_sft(cfg, task, stage_dir, rt)
    if name == "feedback":
        sft_model = _require(out, name, "sft") / "model"
        if cfg.feedback.labeler == "human":
            return _human_feedback(cfg, task, sft_model, stage_dir)
        from rlhfkit.feedback.simulated import run_simulated_feedback

        return run_simulated_feedback(cfg, task, sft_model, stage_dir, rt)
    if name == "reward":
        from rlhfkit.algorithms.reward import train_reward_model

        comparisons = _comparisons_path(cfg, out)
        init = _require(out, name, "sft") / "model" if cfg.reward.init == "sft" else Path(cfg.reward.init)
        return train_reward_model(cfg, comparisons, init, stage_dir, rt)
    if name == "ppo":
        from rlhfkit.algorithms.ppo import train_ppo

        sft_model = _require(out, name, "sft") / "model"
        return train_ppo(cfg, task, sft_model, _require(out, name, "reward") / "model", stage_dir, rt)
    if name == "eval":
        from rlhfkit.evaluation.evaluate import evaluate_run
        from rlhfkit.evaluation.report import write_report

        start = time.time()
        sft_model = _require(out, name, "sft") / "model"
        policies = {"sft": sft_model, "ppo": _require(out, name, "ppo") / "model"}
        result = evaluate_run(cfg, task, sft_model, _require(out, name, "reward") / "model", policies, rt)
        write_json(stage_dir / "eval.json", result)
        summary = build_summary(cfg, out, eval_result=result)
        report = write_report(out, summary, result, out / "ppo" / "metrics.jsonl")
        return {**_eval_figures(result), "report": str(report.relative_to(out)), "wall_time_s": time.time() - start}
    raise RlhfkitError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


def _human_feedback(cfg: Config, task, sft_model: Path, stage_dir: Path) -> dict:
    """Labels from people through the labeling app (rlhfkit.labelapp); waits until enough items are done."""
    import random

    from rlhfkit.labelapp.hook import human_feedback

    fb = cfg.feedback
    # Outside the stage directory: an unfinished stage is wiped on rerun, the labels must never be.
    project = Path(fb.project_dir) if fb.project_dir else stage_dir.parent / "labeling"
    exported = human_feedback(
        project, policy_dir=sft_model, prompts=task.prompts(fb.n_prompts, random.Random(f"{cfg.seed}-feedback")),
        k=fb.k, overlap=fb.labelers_per_item, items_required=fb.n_prompts, criteria=["overall"], seed=cfg.seed,
        max_new_tokens=task.max_new_tokens,
    )
    if exported is None:
        raise WaitingForLabels(
            f"waiting for human labels in {project}; start the app with `rlhfkit label serve {project}`, "
            "and rerun `rlhfkit run` once the items are labeled"
        )
    for name in ("comparisons.jsonl", "rankings.jsonl"):
        shutil.copyfile(Path(exported) / name, stage_dir / name)
    from rlhfkit.data.contract import read_comparisons

    return {"n_items": fb.n_prompts, "n_comparisons": len(read_comparisons(stage_dir / "comparisons.jsonl")), "labeler": "human"}


def run_stage(name: str, cfg: Config, out: str | Path, *, fresh: bool = False, replace_config: bool = False) -> dict:
    """Run one stage into OUT/name and return its result; a complete stage is skipped unless `fresh`.
    `replace_config` lets a stage run with a config that differs from OUT/config.toml (and records it)."""
    if name not in STAGES:
        raise RlhfkitError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    out = Path(out)
    prepare_out(cfg, out, replace_config=replace_config)
    stage_dir = out / name
    if is_complete(stage_dir) and not fresh:
        _log(f"{name}: already complete in {stage_dir}, skipping (pass --fresh to redo it)")
        return stage_result(stage_dir)
    if fresh or name != "ppo":  # only PPO resumes; other stages restart from scratch
        shutil.rmtree(stage_dir, ignore_errors=True)
    for later in STAGES[STAGES.index(name) + 1 :]:  # their inputs are about to change
        (out / later / "COMPLETE.json").unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    _log(f"{name}: running -> {stage_dir}")
    result = _run(name, cfg, out, stage_dir)
    mark_complete(stage_dir, result)
    write_json(out / "summary.json", build_summary(cfg, out))
    return result


def _eval_figures(eval_result: dict) -> dict:
    """Each policy's evaluation figures (the sample completions stay in eval.json)."""
    return {n: {k: v for k, v in r.items() if k != "samples"} for n, r in eval_result["policies"].items()}


def build_summary(cfg: Config, out: Path, eval_result: dict | None = None) -> dict:
    """Every stage's figures, keyed by stage (and by policy under 'eval'), plus the config."""
    summary: dict = {"config": config_to_dict(cfg)}
    for stage in STAGES:
        if is_complete(out / stage):
            summary[stage] = {k: v for k, v in stage_result(out / stage).items()}
    if eval_result is not None:
        summary["eval"] = _eval_figures(eval_result)
    summary["wall_time_s"] = {s: summary[s].get("wall_time_s") for s in STAGES if s in summary}
    return summary


def run_pipeline(cfg: Config, out: str | Path) -> dict:
    """All stages in order, skipping complete ones and resuming PPO. Returns summary.json's content."""
    out = Path(out)
    prepare_out(cfg, out)
    start = time.time()
    for name in STAGES:
        run_stage(name, cfg, out)
    summary = build_summary(cfg, out)
    summary["wall_time_s"]["total_this_invocation"] = time.time() - start
    write_json(out / "summary.json", summary)
    return summary


def format_results_table(summary: dict) -> str:
    """The short table printed at the end of `rlhfkit run`."""
    ev = summary.get("eval", {})
    names = [n for n in ("sft", "ppo") if n in ev]
    rows = [("reward (RM)", "reward"), ("preferred_first_rate", "preferred_first_rate"),
            ("later_rule_validity", "later_rule_validity"), ("KL to reference", "kl"),
            ("KL share at position 1", "kl_first_position_share")]
    lines = [f"{'metric':<24}" + "".join(f"{n:>10}" for n in names)]
    for label, key in rows:
        if names and key in ev[names[0]]:
            lines.append(f"{label:<24}" + "".join(f"{ev[n][key]:>10.3f}" for n in names))
    if "reward" in summary:
        lines.append(f"{'RM held-out accuracy':<24}{summary['reward']['heldout_accuracy']:>10.3f}")
    wt = summary.get("wall_time_s", {})
    lines.append("wall time: " + ", ".join(f"{s} {wt[s]:.0f}s" for s in STAGES if wt.get(s) is not None))
    return "\n".join(lines)
