"""The comparison report (`rlhfkit compare`): one table, each method's curves, win rates, Elo ladders."""

from __future__ import annotations

from pathlib import Path

from rlhfkit.algorithms import METHODS
from rlhfkit.core.runio import read_metrics
from rlhfkit.evaluation.report import plot_method_curves, plot_ppo_curves


def _f(v, spec: str = ".3f") -> str:
    return "–" if v is None or v != v else format(v, spec)  # None or NaN


def _table(result: dict, gold_names) -> list[str]:
    """One row per policy: gold metrics, RM reward (and each reward source's), KL, reply length and distinct-2, the
    stage's wall time and passes."""
    sources = list(dict.fromkeys(k for f in result["policies"].values() for k in f if k.startswith("reward/")))
    toxicity = ["toxicity_score"] if any("toxicity_score" in f for f in result["policies"].values()) else []
    cols = [*gold_names, *toxicity, "reward", *sources, "kl", "length", "distinct_2"]
    lines = ["| policy | " + " | ".join(cols) + " | stage wall time | sampled | forward | backward |",
             "|---|" + "---|" * (len(cols) + 4)]
    for name, figures in result["policies"].items():
        stage = result["stages"].get(name, {})
        passes = stage.get("passes") or {}
        wall = stage.get("wall_time_s")
        lines.append(f"| {name} | " + " | ".join(_f(figures.get(c)) for c in cols)
                     + f" | {_f(wall, '.0f') + ' s' if wall is not None else '–'} | "
                     + " | ".join(f"{passes[k]:,}" if k in passes else "–" for k in ("sampled", "forward", "backward"))
                     + " |")
    return lines


def _matrix(rates: dict) -> list[str]:
    names = list(rates)
    lines = ["| row beats column | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {a} | " + " | ".join("·" if a == b else f"{rates[a][b]:.2f}" for b in names) + " |" for a in names]
    return lines


JUDGES = {"reward model": "By the reward model (the proxy every RM-trained method optimised):",
          "gold": "By the task's gold score (the truth):"}


def _judged_matrices(win_rates: dict) -> list[str]:
    """One win-rate matrix per judge; without a gold judge (task = 'none') the report says so."""
    lines = []
    for judge, rates in win_rates.items():
        lines += [JUDGES.get(judge, f"By the {judge}:"), "", *_matrix(rates), ""]
    if "gold" not in win_rates:
        lines += ["No gold judge: this run's task (`task = 'none'`) has no gold scorer, so the reward model, which "
                  "the RM-trained methods optimised, is the only judge here; read its wins with that in mind.", ""]
    return lines


def _ladder(rows: list[dict]) -> list[str]:
    lines = ["| rank | policy | Elo | 95% interval | matches | wins |", "|---|---|---|---|---|---|"]
    lines += [f"| {i} | {r['model']} | {r['rating']:.0f} | {r['ci_low']:.0f} – {r['ci_high']:.0f} | {r['matches']} | "
              f"{r['wins']:g} |" for i, r in enumerate(rows, start=1)]
    return lines


def write_compare_report(compare_dir: Path, result: dict, cfg, out: Path, gold_names) -> Path:
    """compare_dir/report.md and one curves figure per method."""
    lines = [
        "# rlhfkit comparison", "",
        f"Task `{cfg.task}`, seed {cfg.seed}, threads {cfg.threads}: {', '.join(result['methods'])} from the same SFT "
        "model, comparisons and reward model, each at its own configured budget, evaluated on the same "
        f"{cfg.eval.n_prompts} held-out prompts.", "",
        "## Results", "",
        *_table(result, gold_names), "",
        "`reward`: the reward model's mean score (`reward/<name>`: each reward source's). `kl`: KL to the SFT policy "
        "in nats per completion, exact per position along sampled completions; for best-of-n the analytic bound "
        "log n − (n−1)/n. `length`: mean reply length in tokens; `distinct_2`: distinct word bigrams over all the "
        "policy's replies / their count (docs/metrics.md). Passes count "
        "sequences through a model (one sequence through one model = 1): `sampled` generated, `forward` without "
        "gradient (reward model, reference, old log-probs), `backward` with one. Best-of-n's passes are its "
        "stage's curve; each of its answers costs n samples and n reward-model scores more.", "",
        "## Head to head", "",
        "Each cell: the share of held-out prompts on which the row policy's completion beat the column policy's "
        "(ties count one half).", "",
        *_judged_matrices(result["win_rates"]),
        "## Elo", "",
        "From the same matches (every pair of policies on every prompt), bootstrap median and 95% interval "
        "(rlhfkit.feedback.elo).", "",
    ]
    for judge, rows in result["elo"].items():
        lines += [f"Judged by the {judge}:", "", *_ladder(rows), ""]
    lines += ["## Training curves", ""]
    for m in result["methods"]:
        metrics = read_metrics(out / m / "metrics.jsonl")
        if not metrics:
            continue
        path = compare_dir / f"{m}_curves.png"
        if m == "ppo":
            plot_ppo_curves(metrics, path)
        else:
            plot_method_curves(metrics, METHODS[m].curves, m, path, METHODS[m].step_label)
        lines += [f"### {m}", "", f"![{m} curves]({path.name})", ""]
    path = compare_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
