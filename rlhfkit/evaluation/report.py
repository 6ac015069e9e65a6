"""The run report: plots (matplotlib, imported here only) and a Markdown page that links them."""

from __future__ import annotations

from pathlib import Path

from rlhfkit.runio import read_metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppo_curves(metrics: list[dict], path: Path) -> None:
    plt = _plt()
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, title in zip(axes, ("objective/scores", "objective/kl_k1", "objective/kl_coef"),
                              ("reward-model score", "KL(policy || reference), nats", "KL coefficient beta")):
        ax.plot(steps, [m[key] for m in metrics], lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kl_per_position(policies: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = list(policies)
    n_pos = len(policies[names[0]]["kl_per_position"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([p + i * width for p in range(n_pos)], policies[name]["kl_per_position"], width, label=name)
    ax.set_xticks([p + 0.4 - width / 2 for p in range(n_pos)], [f"pos {p + 1}" for p in range(n_pos)])
    ax.set_ylabel("KL to reference (nats)")
    ax.set_title("KL per completion position")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_distributions(dists: dict, path: Path) -> None:
    plt = _plt()
    vocab, by_policy = dists["vocab"], dists["by_policy"]
    names = list(by_policy)
    n_pos = len(by_policy[names[0]])
    shown = [i for i, tok in enumerate(vocab) if any(by_policy[n][p][i] > 0.002 for n in names for p in range(n_pos))]
    fig, axes = plt.subplots(1, n_pos, figsize=(3.2 * n_pos, 3.2), sharey=True)
    width = 0.8 / len(names)
    for p, ax in enumerate(axes):
        for j, name in enumerate(names):
            ax.bar([x + j * width for x in range(len(shown))], [by_policy[name][p][i] for i in shown], width, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shown))], [vocab[i] for i in shown], fontsize=8)
        ax.set_title(f"position {p + 1}")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("probability")
    axes[0].legend()
    fig.suptitle(f"next-token distribution per position, prompt '{dists['prompt']}'")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(out: Path, summary: dict, eval_result: dict, ppo_metrics_path: Path) -> Path:
    """Plots + report.md in OUT/eval; returns the report path."""
    eval_dir = out / "eval"
    metrics = read_metrics(ppo_metrics_path)
    if metrics:
        plot_ppo_curves(metrics, eval_dir / "ppo_curves.png")
    plot_kl_per_position(eval_result["policies"], eval_dir / "kl_per_position.png")
    plot_distributions(eval_result["distributions"], eval_dir / "token_distributions.png")

    policies = eval_result["policies"]
    names = list(policies)
    rows = ["reward", "preferred_first_rate", "later_rule_validity", "well_formed_rate", "kl", "kl_first_position_share"]
    rows = [r for r in rows if r in policies[names[0]]]
    lines = [
        "# rlhfkit run report",
        "",
        f"Task `{summary['config']['task']}`, seed {summary['config']['seed']}, "
        f"KL coefficient {summary['config']['ppo']['kl_coef']}"
        f"{' (adaptive)' if summary['config']['ppo']['adaptive_kl'] else ''}.",
        "",
        "## Results on held-out prompts",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {r} | " + " | ".join(_fmt(policies[n][r]) for n in names) + " |" for r in rows]
    lines += [
        "",
        "`reward` is the reward model's mean score; `kl` the KL to the reference (SFT) policy in nats per "
        "completion, computed exactly per position along sampled completions.",
        "",
        "## Stages",
        "",
        "| stage | figure | value |",
        "|---|---|---|",
    ]
    for stage in ("sft", "feedback", "reward", "ppo"):
        for k, v in summary.get(stage, {}).items():
            if isinstance(v, (int, float)):
                lines.append(f"| {stage} | {k} | {_fmt(v)} |")
    lines += ["", "## PPO training curves", "", "![PPO curves](ppo_curves.png)" if metrics else "(no PPO metrics)", "",
              "## Where the policy moved: KL per completion position", "", "![KL per position](kl_per_position.png)", "",
              "## Next-token distribution per position (one prompt)", "",
              "Frequencies over sampled completions of one prompt (marginal over the sampled prefix: once the first "
              "digit changes, later positions shift with it even where the rule is kept).", "",
              "![distributions](token_distributions.png)", "",
              "## Sample completions", ""]
    for name in names:
        lines.append(f"**{name}:** " + ", ".join(f"`{s['prompt']} {s['completion']}`" for s in policies[name]["samples"]))
        lines.append("")
    path = eval_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
