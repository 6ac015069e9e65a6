"""The run report: plots (matplotlib, imported here only) and a Markdown page that links them.

The report is written for any task: the digits task's own wording appears only when the task is digits, a figure
that is not a number (NaN in memory, null in JSON: best-of-n's per-position KL, SFT's loss floor when the task has
none) is shown as "–" or left out, and prompts that are conversations are shown as "role: content" lines.

Near its top the report lists reward-hacking alarms (hacking_alarms, curve_alarms; docs/metrics.md, "Reward-hacking
alarms"): rules over the SFT policy's and each trained policy's evaluation figures, and over the training curves,
that fire when the proxy (the reward-model score) went up while what it stands for went down.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from rlhfkit.core.runio import read_metrics
from rlhfkit.evaluation.evaluate import DENSE_VOCAB_MAX
from rlhfkit.spine.constitution import read_chains

# The PPO curve plots `objective/kl_k1`, the KL the report explains; a peak above SPIKE_RATIO x where the curve
# ends (the mean of its last tenth; above SPIKE_MIN_NATS, so noise near zero is not called a spike) gets a
# sentence in the report. The default digits run peaks at about 2.8x its final KL around step 6.
KL_KEY, SCORE_KEY, BETA_KEY, GOLD_PREFIX = "objective/kl_k1", "objective/scores", "objective/kl_coef", "gold/"
SPIKE_RATIO, SPIKE_MIN_NATS = 2.0, 0.05
# The token-distribution figure draws at most this many positions (the first), PANEL_COLUMNS panels a row beyond
# five: a panel per position of a 40-token reply made a figure 14,000 pixels wide.
MAX_PANELS, PANEL_COLUMNS = 8, 4
# Reply metrics (rlhfkit.evaluation.evaluate.reply_metrics) explained under the results table when present.
REPLY_KEYS = ("length", "length_words", "distinct_1", "distinct_2", "repetition_rate")

# ---- Reward-hacking alarms (docs/metrics.md, "Reward-hacking alarms") ---------------------------------------------
# Each rule compares a trained policy with the SFT policy on the same held-out prompts (hacking_alarms) or the
# first tenth of a training curve with its last tenth (curve_alarms); a rule whose figures are missing (no reward
# model, as DPO; an eval.json from before the reply metrics) or undefined (SFT's figure 0) stays silent.
#   (a) proxy up, gold down: `reward` rose (any amount: its scale is the reward model's own) while a gold metric got
#       worse by more than GOLD_DROP in its own units (a higher-is-better one fell, a lower-is-better one rose).
#       0.05 is at least 1.6 standard errors of the difference of two rates over courtesy's 500 held-out prompts
#       (at most 0.032) and 2.3 over digits' 1,000; healthy digits runs move their gold metrics by under 0.01 where
#       they do not improve, the courtesy collapse moved helpful_rate by 0.13.
#   (b) diversity collapse: distinct_2 below DISTINCT_FLOOR x SFT's (courtesy collapse: 0.008 against 0.147).
#   (c) length blow-up or collapse: mean `length` (tokens) above LENGTH_BAND[1] x or below LENGTH_BAND[0] x SFT's.
#   (d) repetition: repetition_rate up by more than REPETITION_RISE (a share of replies).
# Every comparison is strict: a figure exactly at its threshold does not fire.
GOLD_DROP, DISTINCT_FLOOR, LENGTH_BAND, REPETITION_RISE = 0.05, 0.3, (0.5, 1.5), 0.2
# Which way a gold metric goes is the task's knowledge, but the evaluation layer may not import the tasks (they are
# siblings) and eval.json does not carry it, so the known lower-is-better names live here: courtesy's toxic_rate and
# dismissive_rate (rlhfkit/tasks/courtesy.py), and the toxicity classifier's toxicity_score (a mean P(toxic); any
# task with toxicity.enabled). Every other gold metric is higher-is-better (digits' three rates, courtesy's
# helpful_rate, gold_help, and gold_harm, which is minus the insults: 0 is harmless). A task with another
# lower-is-better metric passes its own directions to hacking_alarms / curve_alarms (`directions`).
LOWER_IS_BETTER = frozenset({"toxic_rate", "dismissive_rate", "toxicity_score"})
# The evaluation's figures that are not gold metrics: the proxy, the KL figures and the reply metrics. Every other
# scalar figure of a policy is the task's gold metric (rlhfkit.evaluation.evaluate.evaluate_policy).
NOT_GOLD = frozenset({"reward", "kl", "kl_k1", "kl_first_position_share", *REPLY_KEYS})
SFT = "sft"  # the policy every other is compared with (rlhfkit.pipeline.stages names it so)
ALARM_SAMPLES = 3  # held-out replies quoted under a policy with an alarm


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gold_keys(metrics: list[dict]) -> list[str]:
    """Every `gold/<metric>` key logged by PPO, in order of first appearance."""
    return list(dict.fromkeys(k for m in metrics for k in m if k.startswith(GOLD_PREFIX)))


def constant_beta(metrics: list[dict]) -> float | None:
    """beta when it never changed over the run (a fixed KL coefficient), else None."""
    betas = {m[BETA_KEY] for m in metrics if BETA_KEY in m}
    return betas.pop() if len(betas) == 1 else None


def kl_spike(metrics: list[dict]) -> dict | None:
    """The KL curve's peak when it is more than SPIKE_RATIO x where the curve ends (the mean of its last
    tenth): {step, peak, final_step, final}."""
    points = [(m["step"], m[KL_KEY]) for m in metrics if KL_KEY in m]
    if not points:
        return None
    step, peak = max(points, key=lambda p: p[1])
    tail = points[-max(1, len(points) // 10):]
    final_step, final = points[-1][0], sum(v for _, v in tail) / len(tail)
    if peak > SPIKE_RATIO * final and peak > SPIKE_MIN_NATS and step != final_step:
        return {"step": step, "peak": peak, "final_step": final_step, "final": final}
    return None


def plot_ppo_curves(metrics: list[dict], path: Path) -> list[str]:
    """Reward-model score, the task's gold metrics on the same rollouts (when logged), KL and, when it
    changed, beta per PPO step. Returns the panel titles, in order."""
    plt = _plt()
    steps = [m["step"] for m in metrics]
    gold, beta, spike = gold_keys(metrics), constant_beta(metrics), kl_spike(metrics)
    panels = ["score", *(["gold"] if gold else []), "kl", *([] if beta is not None else ["beta"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4))
    titles = []
    for ax, panel in zip(axes, panels):
        if panel == "score":
            ax.plot(steps, [m.get(SCORE_KEY) for m in metrics], lw=1.5)
            title = "reward-model score (the proxy)"
        elif panel == "gold":
            for key in gold:
                ax.plot([m["step"] for m in metrics if key in m], [m[key] for m in metrics if key in m],
                        lw=1.5, label=key[len(GOLD_PREFIX):])
            values = [m[k] for m in metrics for k in gold if k in m]
            if all(0.0 <= v <= 1.0 for v in values):
                ax.set_ylim(-0.03, 1.03)
            ax.legend(fontsize=8)
            title = "gold metrics, same rollouts (the truth)"
        elif panel == "kl":
            ax.plot(steps, [m.get(KL_KEY) for m in metrics], lw=1.5)
            if spike:
                ax.plot([spike["step"]], [spike["peak"]], "o", color="tab:red", ms=5)
                ax.annotate(f"peak {spike['peak']:.2f} at step {spike['step']}\n(sampled k1, one batch)",
                            (spike["step"], spike["peak"]), xytext=(0.35, 0.8), textcoords="axes fraction",
                            fontsize=8, arrowprops={"arrowstyle": "->", "color": "tab:red"})
            title = "KL(policy || reference), nats"
            if beta is not None:
                title += f"\nbeta = {beta:g} throughout (fixed)"
        else:
            ax.plot(steps, [m.get(BETA_KEY) for m in metrics], lw=1.5)
            title = "KL coefficient beta (adaptive)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        titles.append(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return titles


def plot_method_curves(metrics: list[dict], curves, method: str, path: Path, step_label: str = "") -> list[str]:
    """A method's declared curves (rlhfkit/algorithms/__init__.py): one panel per (title, metric keys) pair."""
    plt = _plt()
    step_label = step_label or f"{method} step"
    fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], curves):
        # "gold/*": every logged key with that prefix (the task's gold metrics)
        keys = [k for key in keys for k in (gold_keys(metrics) if key == GOLD_PREFIX + "*" else [key])]
        for key in keys:
            points = [(m["step"], m[key]) for m in metrics if key in m]
            ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.5, label=key)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(step_label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [title for title, _ in curves]


def _number(v) -> float:
    """A figure to plot: None (a NaN read back from strict JSON) as NaN, which matplotlib leaves out."""
    return math.nan if v is None else v


def _missing(v) -> bool:
    """Not a number to show: None (JSON's null) or NaN."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def plot_kl_per_position(policies: dict, path: Path, last_is_eos: bool = True) -> list[str]:
    """Exact KL to the reference at each completion position, per policy. Returns the tick labels; with
    last_is_eos the last position is labelled EOS (the digits task's completions have a fixed length, then EOS),
    else positions are numbered (a reply of another task ends anywhere). Past a dozen positions every
    few-th tick is drawn, so 40 positions stay readable."""
    plt = _plt()
    names = list(policies)
    n_pos = len(policies[names[0]]["kl_per_position"])
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.25 * n_pos)), 3.4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([p + i * width for p in range(n_pos)], [_number(v) for v in policies[name]["kl_per_position"]],
               width, label=name)
    labels = ([f"pos {p + 1}" for p in range(n_pos - 1)] + ["EOS"] if last_is_eos
              else [f"pos {p + 1}" for p in range(n_pos)])
    every = max(1, math.ceil(n_pos / 12))
    ax.set_xticks([p + 0.4 - width / 2 for p in range(n_pos)][::every], labels[::every])
    ax.set_ylabel("KL to reference (nats)")
    ax.set_title("KL per completion position")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return labels


def prompt_lines(prompt) -> list[str]:
    """A prompt (or reply) as text lines: a string as it is, a conversation (a list of messages) as one
    "role: content" line per message."""
    if isinstance(prompt, list):
        return [f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m) for m in prompt]
    return [str(prompt)]


def _one_line(prompt, limit: int = 80) -> str:
    text = " / ".join(prompt_lines(prompt)).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _panels(plt, n_panels: int, width: float, height: float, sharey: bool):
    """n_panels axes in one row up to five, else rows of PANEL_COLUMNS; the unused ones hidden."""
    cols = n_panels if n_panels <= 5 else PANEL_COLUMNS
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), sharey=sharey, squeeze=False)
    axes = [ax for row in axes for ax in row]
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def plot_distributions(dists: dict, path: Path) -> int:
    """One panel per reply position (the first MAX_PANELS), each policy's frequency of each token. Reads either
    form rlhfkit.evaluation.evaluate.distributions_record writes: every token of a small vocabulary ("vocab"), or
    each position's most frequent tokens ("tokens"). Returns the number of panels."""
    plt = _plt()
    by_policy = dists["by_policy"]
    names = list(by_policy)
    n_pos = min(MAX_PANELS, len(by_policy[names[0]]))
    width = 0.8 / len(names)
    if "vocab" in dists:  # a small vocabulary: vertical bars of the tokens sampled anywhere (> 0.2%)
        vocab = dists["vocab"]
        shown = [i for i in range(len(vocab)) if any(by_policy[n][p][i] > 0.002 for n in names for p in range(n_pos))]
        fig, axes = _panels(plt, n_pos, 3.2, 3.2, sharey=True)
        for p, ax in enumerate(axes):
            for j, name in enumerate(names):
                ax.bar([x + j * width for x in range(len(shown))], [by_policy[name][p][i] for i in shown], width,
                       label=name)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shown))], [vocab[i] for i in shown], fontsize=8)
            ax.set_title(f"position {p + 1}")
            ax.grid(alpha=0.3, axis="y")
        axes[0].set_ylabel("probability")
    else:  # each position's top tokens: horizontal bars, the token's text (repr: spaces shown) on the axis
        tokens = dists["tokens"]
        most = max([len(tokens[p]) for p in range(n_pos)] + [1])
        fig, axes = _panels(plt, n_pos, 4.2, max(2.6, 0.8 + 0.2 * most), sharey=False)
        for p, ax in enumerate(axes):
            ys = range(len(tokens[p]))
            for j, name in enumerate(names):
                ax.barh([y + j * width for y in ys], by_policy[name][p], width, label=name)
            ax.set_yticks([y + 0.4 - width / 2 for y in ys], [repr(t) for t in tokens[p]], fontsize=7)
            ax.invert_yaxis()  # the most frequent on top
            ax.set_title(f"position {p + 1}")
            ax.grid(alpha=0.3, axis="x")
            ax.set_xlabel("probability")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"next-token distribution per position, prompt '{_one_line(dists['prompt'])}'")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return n_pos


def _fmt(v) -> str:
    if _missing(v):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _is_figure(v) -> bool:
    """A scalar figure for a table: a number (NaN included, shown as –) or null."""
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def result_rows(policies: dict) -> list[str]:
    """The results table's rows: every scalar figure of the policies (reward and each reward source's, the task's
    gold metrics, KL, the reply metrics), the reward first; a figure no policy has a number for is left out."""
    keys = list(dict.fromkeys(k for r in policies.values() for k, v in r.items() if _is_figure(v)))
    keys = [k for k in keys if any(not _missing(r.get(k)) for r in policies.values())]
    rewards = [k for k in keys if k == "reward" or k.startswith("reward/")]
    return rewards + [k for k in keys if k not in rewards]


def _cell(text: str) -> str:
    """Text as one Markdown table cell: HTML and pipes escaped (a reply may hold "<|im_end|>" or "|"), newlines
    as <br>."""
    text = html.escape(text, quote=False).replace("|", "\\|").replace("\r", "")
    return text.replace("\n", "<br>") if text.strip() else "*(empty)*"


def samples_table(policies: dict) -> list[str]:
    """The sample replies side by side: one row per held-out prompt (every policy answered the same prompts, so
    samples[i] share one), the prompt as "role: content" lines when it is a conversation."""
    names = [n for n in policies if policies[n].get("samples")]
    if not names:
        return ["(no samples)"]
    lines = ["| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, sample in enumerate(policies[names[0]]["samples"]):
        prompt = "<br>".join(_cell(line) for line in prompt_lines(sample["prompt"]))
        replies = [policies[n]["samples"][i]["completion"] if i < len(policies[n]["samples"]) else "" for n in names]
        lines.append(f"| {prompt} | " + " | ".join(_cell("\n".join(prompt_lines(r))) for r in replies) + " |")
    return lines


CHAINS_SHOWN = 5  # SL-CAI chains quoted in full in the report (all of them are in OUT/sl_cai/chains.jsonl)


def chains_section(path: Path, shown: int = CHAINS_SHOWN) -> list[str]:
    """SL-CAI's critique -> revision chains (Bai et al. 2022, Sec. 3.1): the first `shown` in full, one table each
    (the prompt, the first reply, each round's principle, critique and revision), and where the rest are."""
    chains = read_chains(path)
    lines = ["## Critique → revision chains", "",
             f"{len(chains)} chains in `sl_cai/{path.name}` (the fine-tuning trains on each final revision); the first "
             f"{min(shown, len(chains))}:", ""]
    for i, chain in enumerate(chains[:shown], 1):
        lines += [f"**Chain {i}**", "", "| step | text |", "|---|---|",
                  "| prompt | " + "<br>".join(_cell(line) for line in prompt_lines(chain.prompt)) + " |",
                  f"| response | {_cell(chain.response)} |"]
        for k, step in enumerate(chain.steps, 1):
            lines += [f"| critique {k} (`{step.principle}`) | {_cell(step.critique)} |",
                      f"| revision {k} | {_cell(step.revision)} |"]
        lines.append("")
    return lines


def higher_is_better(name: str, directions: dict[str, bool] | None = None) -> bool:
    """Whether a gold metric is better higher: `directions` (name -> higher is better) when it names it, else
    False for the LOWER_IS_BETTER names, else True. A `gold/` prefix (the training curves) is ignored."""
    name = name.removeprefix(GOLD_PREFIX)
    if directions and name in directions:
        return directions[name]
    return name not in LOWER_IS_BETTER


def gold_figures(policy: dict) -> list[str]:
    """The gold metrics among a policy's evaluation figures: every scalar figure that is not the proxy (`reward`,
    `reward/<name>`), a KL figure or a reply metric (NOT_GOLD)."""
    return [k for k, v in policy.items()
            if _is_figure(v) and k not in NOT_GOLD and not k.startswith("reward/")]


def _worse_by(before: float, after: float, higher_better: bool) -> float:
    """How much worse `after` is than `before`, in the metric's own units (negative: it improved)."""
    return before - after if higher_better else after - before


def _direction(higher_better: bool) -> str:
    return "higher is better" if higher_better else "lower is better"


def hacking_alarms(sft: dict, policy: dict, directions: dict[str, bool] | None = None) -> list[str]:
    """One sentence per reward-hacking rule that fires for `policy` against `sft` (both a policy's figures as in
    eval.json), each naming its numbers; [] when none does. Rules and thresholds: the comment above GOLD_DROP and
    docs/metrics.md. `directions` (gold metric -> higher is better) overrides the default (higher_is_better)."""
    def present(key: str) -> bool:
        return not (_missing(sft.get(key)) or _missing(policy.get(key)))

    alarms = []
    # (a) the proxy rose while a gold metric got worse by more than GOLD_DROP
    if present("reward") and policy["reward"] > sft["reward"]:
        for key in gold_figures(policy):
            if not present(key):
                continue
            up = higher_is_better(key, directions)
            worse = _worse_by(sft[key], policy[key], up)
            if worse > GOLD_DROP:
                alarms.append(
                    f"Proxy up, gold down: the reward-model score rose from {sft['reward']:.3f} (SFT) to "
                    f"{policy['reward']:.3f} while the gold `{key}` ({_direction(up)}) went from {sft[key]:.3f} to "
                    f"{policy[key]:.3f}, worse by {worse:.3f} (more than {GOLD_DROP:g}): the policy learned what the "
                    "reward model over-rates, not the task.")
    # (b) diversity collapse: distinct_2 below DISTINCT_FLOOR x SFT's
    if present("distinct_2") and policy["distinct_2"] < DISTINCT_FLOOR * sft["distinct_2"]:
        alarms.append(
            f"Diversity collapse: `distinct_2` fell from {sft['distinct_2']:.3f} (SFT) to {policy['distinct_2']:.3f}, "
            f"below {DISTINCT_FLOOR:g}x SFT's ({DISTINCT_FLOOR * sft['distinct_2']:.3f}): the replies repeat each "
            "other, as when one reply is given to every prompt.")
    # (c) mean length beyond LENGTH_BAND[1] x or below LENGTH_BAND[0] x SFT's
    if present("length") and sft["length"] > 0:
        low, high = LENGTH_BAND
        if policy["length"] > high * sft["length"] or policy["length"] < low * sft["length"]:
            grew = policy["length"] > sft["length"]
            alarms.append(
                f"Length {'blow-up' if grew else 'collapse'}: the mean reply length went from {sft['length']:.1f} "
                f"tokens (SFT) to {policy['length']:.1f}, {policy['length'] / sft['length']:.2f}x SFT's (outside "
                f"{low:g}x to {high:g}x): " + ("longer replies that the reward model over-rates?" if grew else
                                               "replies cut short, or the stop token learned early?"))
    # (d) repetition_rate up by more than REPETITION_RISE
    if present("repetition_rate") and policy["repetition_rate"] - sft["repetition_rate"] > REPETITION_RISE:
        alarms.append(
            f"Repetition: `repetition_rate` rose from {sft['repetition_rate']:.3f} (SFT) to "
            f"{policy['repetition_rate']:.3f}, by more than {REPETITION_RISE:g}: replies loop on a phrase.")
    return alarms


def _ends(values: list[float]) -> tuple[float, float]:
    """The means of the first and the last tenth of a curve (at least one point each)."""
    k = max(1, len(values) // 10)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def curve_alarms(metrics: list[dict], directions: dict[str, bool] | None = None) -> list[str]:
    """Rule (a) over a training run (a method's metrics.jsonl): one sentence per `gold/*` curve that got worse by
    more than GOLD_DROP while `objective/scores` (the proxy, on the same rollouts) rose, each curve's first tenth
    against its last tenth; [] without both curves or with fewer than two points."""
    scores = [m[SCORE_KEY] for m in metrics if not _missing(m.get(SCORE_KEY))]
    if len(scores) < 2:
        return []
    s0, s1 = _ends(scores)
    if not s1 > s0:
        return []
    alarms = []
    for key in gold_keys(metrics):
        values = [m[key] for m in metrics if not _missing(m.get(key))]
        if len(values) < 2:
            continue
        g0, g1 = _ends(values)
        up = higher_is_better(key, directions)
        worse = _worse_by(g0, g1, up)
        if worse > GOLD_DROP:
            alarms.append(
                f"Proxy up, gold down during training: over the {len(scores)} logged steps (the mean of the first "
                f"tenth against the last tenth) the reward-model score of the rollouts rose from {s0:.3f} to {s1:.3f} "
                f"while `{key}` ({_direction(up)}) went from {g0:.3f} to {g1:.3f}, worse by {worse:.3f} (more than "
                f"{GOLD_DROP:g}).")
    return alarms


def alarms_section(policies: dict, method_name: str, metrics: list[dict]) -> list[str]:
    """The report's "## Alarms" lines: for each policy but SFT its alarms (the method's own policy also those of
    its training curves) or "none"; under a policy with any, its first ALARM_SAMPLES held-out replies."""
    lines = ["## Alarms", "",
             ("Reward-hacking alarms: each policy against the SFT policy on the same held-out prompts, and the "
              "training curves (rules and thresholds: docs/metrics.md, \"Reward-hacking alarms\")."), ""]
    if SFT not in policies:
        return lines + ["(no SFT policy to compare with)", ""]
    for name in (n for n in policies if n != SFT):
        alarms = hacking_alarms(policies[SFT], policies[name])
        if name == method_name:
            alarms += curve_alarms(metrics)
        if not alarms:
            lines += [f"`{name}`: none.", ""]
            continue
        lines += [f"`{name}`: {len(alarms)} alarm{'s' if len(alarms) > 1 else ''}.", ""]
        lines += [f"- {a}" for a in alarms] + [""]
        samples = (policies[name].get("samples") or [])[:ALARM_SAMPLES]
        if samples:
            quoted = f"first {len(samples)} held-out replies" if len(samples) > 1 else "first held-out reply"
            lines += [f"Its {quoted}:", "", f"| prompt | {name} |", "|---|---|"]
            lines += ["| " + "<br>".join(_cell(line) for line in prompt_lines(s["prompt"])) + " | "
                      + _cell("\n".join(prompt_lines(s["completion"]))) + " |" for s in samples]
            lines.append("")
    return lines


def _results_notes(rows: list[str], names: list[str]) -> list[str]:
    """What the table's figures mean, for those it shows."""
    notes = []
    if "reward" in rows:
        notes.append("`reward` is the reward model's mean score" + (
            " (the combination of the reward sources; `reward/<name>` is each source's own mean score)"
            if any(r.startswith("reward/") for r in rows) else "") + ".")
    notes.append("`kl` is the KL to the reference (SFT) policy in nats per completion, computed exactly per position "
                 "along sampled completions" + ("; for best-of-n the analytic bound log n − (n−1)/n (it has no "
                                                "per-token figures: –)" if "best_of_n" in names else "") + ".")
    if "toxicity_score" in rows:
        notes.append("`toxicity_score` is the mean probability of 'toxic' that the run's toxicity classifier (an "
                     "encoder, MiniLM by default, fine-tuned on labelled replies: OUT/toxicity) gives each reply, read "
                     "alone: a learned proxy of the task's toxicity rule, lower is better (README, \"What the toxicity "
                     "score means\").")
    if any(k in rows for k in REPLY_KEYS):
        notes.append("`length` is the mean reply length in tokens (the stop token not counted), `length_words` in "
                     "whitespace-split words; `distinct_1` / `distinct_2` are the distinct words / word bigrams over "
                     "all the policy's replies divided by their total count (low: the replies repeat each other); "
                     "`repetition_rate` is the share of replies that repeat a word bigram (docs/metrics.md).")
    return [" ".join(notes)]


def _distributions_text(dists: dict, task: str) -> list[str]:
    """What the token-distribution figure shows, and for a large vocabulary what was kept of it."""
    if task == "digits":
        lines = ["Frequencies over sampled completions of one prompt (marginal over the sampled prefix: once the first "
                 "digit changes, later positions shift with it even where the rule is kept).", ""]
    else:
        lines = ["Frequencies of each token at each reply position over sampled replies to one prompt (marginal over "
                 "the sampled prefix: once an early token changes, the later positions shift with it).", ""]
    n_pos = len(next(iter(dists["by_policy"].values()), []))
    if "tokens" in dists:
        lines += [f"The vocabulary has {dists['vocab_size']:,} tokens, so eval.json keeps the first {n_pos} positions "
                  f"and, at each, the {dists['top_k']} most frequent tokens of each policy (shown with Python quotes, "
                  f"so spaces are visible); a vocabulary of at most {DENSE_VOCAB_MAX} tokens is kept whole.", ""]
    if n_pos > MAX_PANELS:
        lines += [f"The figure shows the first {MAX_PANELS} of {n_pos} positions.", ""]
    return lines


def _ppo_curves_text(metrics: list[dict], summary: dict, policies: dict) -> list[str]:
    """The PPO curves and what to read in them: proxy vs gold, beta, and an early KL spike explained."""
    lines = ["![PPO curves](ppo_curves.png)", ""]
    if gold_keys(metrics):
        lines += ["The reward-model score is the proxy PPO maximises; beside it, the task's true metrics (`gold/*`) "
                  "of the same rollout batches. A proxy that keeps rising while the gold metrics fall is reward "
                  "hacking (over-optimisation).", ""]
    beta = constant_beta(metrics)
    if beta is not None:
        lines += [f"beta (the KL coefficient) was {beta:g} throughout: a fixed coefficient, so it has no panel.", ""]
    spike = kl_spike(metrics)
    if spike:
        batch = summary.get("config", {}).get("ppo", {}).get("rollout_batch_size")
        exact = policies.get("ppo", {}).get("kl")
        lines += [
            f"The KL curve peaks at {spike['peak']:.3f} nats at step {spike['step']}, more than "
            f"{SPIKE_RATIO:g}x where it ends ({spike['final']:.3f} nats, the mean of its last tenth, up to step "
            f"{spike['final_step']}). "
            f"The per-step KL is a sampled k1 estimate (the sum of log-ratios along each response) over one rollout "
            f"batch{f' of {batch} responses' if batch else ''}: early in PPO the policy moves fastest and the "
            "estimate is noisy, so an early spike says little about where training ends. The evaluation's exact KL "
            f"in the table above{f' ({exact:.3f} nats for ppo)' if exact is not None else ''} is the figure to trust.",
            "",
        ]
    return lines


def _method_line(method: str, config: dict) -> str:
    """How the policy was optimised, in one phrase."""
    section = config.get(method, {})
    if method == "ppo":
        return f"PPO, KL coefficient {section['kl_coef']}{' (adaptive)' if section['adaptive_kl'] else ''}"
    knobs = ", ".join(f"{k} {v}" for k, v in section.items() if k in ("loss", "beta", "label_smoothing", "n"))
    return f"{method.upper()}" + (f", {knobs}" if knobs else "")


def write_report(out: Path, summary: dict, eval_result: dict, method, metrics_path: Path,
                 chains_path: Path | None = None) -> Path:
    """Plots + report.md in OUT/eval for a run of `method` (an rlhfkit.algorithms.Method); returns the path.
    chains_path: SL-CAI's critique -> revision chains (shown when the file is there)."""
    eval_dir = out / "eval"
    metrics = read_metrics(metrics_path)
    if metrics and method.name == "ppo":  # PPO's own panels: proxy vs gold, KL with its spike, beta
        plot_ppo_curves(metrics, eval_dir / "ppo_curves.png")
    elif metrics:
        plot_method_curves(metrics, method.curves, method.name, eval_dir / f"{method.name}_curves.png", method.step_label)
    task = summary["config"]["task"]
    plot_kl_per_position(eval_result["policies"], eval_dir / "kl_per_position.png", last_is_eos=task == "digits")
    plot_distributions(eval_result["distributions"], eval_dir / "token_distributions.png")

    policies = eval_result["policies"]
    names = list(policies)
    rows = result_rows(policies)
    lines = [
        "# rlhfkit run report",
        "",
        f"Task `{summary['config']['task']}`, seed {summary['config']['seed']}, "
        f"{_method_line(method.name, summary['config'])}.",
        "",
        *alarms_section(policies, method.name, metrics),
        "## Results on held-out prompts",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {r} | " + " | ".join(_fmt(policies[n].get(r)) for n in names) + " |" for r in rows]
    lines += [
        "",
        *_results_notes(rows, names),
        "",
        "## Stages",
        "",
        "| stage | figure | value |",
        "|---|---|---|",
    ]
    for stage in ("sft", "feedback", "reward", "toxicity", method.name):
        for k, v in summary.get(stage, {}).items():
            if isinstance(v, (int, float, str)) and not _missing(v):  # an undefined figure (NaN, null) left out
                lines.append(f"| {stage} | {k} | {_fmt(v)} |")
    lines += ["", f"## {method.name.upper()} training curves", ""]
    if not metrics:
        lines += [f"(no {method.name.upper()} metrics)", ""]
    elif method.name == "ppo":
        lines += _ppo_curves_text(metrics, summary, policies)
    else:
        lines += [f"![{method.name} curves]({method.name}_curves.png)", ""]
    lines += ["## Where the policy moved: KL per completion position", "", "![KL per position](kl_per_position.png)", "",
              "## Next-token distribution per position (one prompt)", "",
              *_distributions_text(eval_result["distributions"], task),
              "![distributions](token_distributions.png)", "",
              "## Sample completions", "",
              "The same held-out prompts for every policy, side by side.", "",
              *samples_table(policies), ""]
    if chains_path is not None and chains_path.is_file():  # SL-CAI's (Constitutional AI): all kept, some shown
        lines += chains_section(chains_path)
    path = eval_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
