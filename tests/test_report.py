"""The run report from small fake metrics and evaluation results (no training): plots and what they say."""

import json

import pytest

from rlhfkit.algorithms import METHODS
from rlhfkit.evaluation.report import kl_spike, plot_kl_per_position, plot_ppo_curves, write_report

GOLD = ("gold/preferred_first_rate", "gold/later_rule_validity", "gold/well_formed_rate")


def ppo_metrics(n=30, spike=True, gold=True, adaptive=False) -> list[dict]:
    """A PPO run: the score rises; KL spikes at step 3 (when asked) and settles at 0.4; beta fixed or adaptive."""
    rows = []
    for step in range(1, n + 1):
        kl = 0.4 * step / n + (2.0 if spike and step == 3 else 0.0)
        row = {"step": step, "objective/scores": -1.0 + 6.0 * step / n, "objective/kl": kl, "objective/kl_k1": kl,
               "objective/kl_coef": 0.4 * (1 + 0.01 * step) if adaptive else 0.4}
        if gold:
            row |= {GOLD[0]: 0.3 + 0.6 * step / n, GOLD[1]: 0.99 - 0.1 * step / n, GOLD[2]: 1.0}
        rows.append(row)
    return rows


def policy(first_rate, kl, per_position):
    return {"reward": 5.0 * first_rate, "preferred_first_rate": first_rate, "later_rule_validity": 0.98,
            "well_formed_rate": 0.995, "kl": kl, "kl_k1": kl, "kl_per_position": per_position,
            "kl_first_position_share": per_position[0] / max(sum(per_position), 1e-12),
            "samples": [{"prompt": "4 5 9 1 =", "completion": "2 6 7 8"}]}


def write(tmp_path, metrics, adaptive=False):
    (tmp_path / "eval").mkdir(exist_ok=True)
    metrics_path = tmp_path / "ppo" / "metrics.jsonl"
    metrics_path.parent.mkdir(exist_ok=True)
    metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>", "="] + [str(d) for d in range(10)]
    dist = [[1.0 if i == 5 + p else 0.0 for i in range(len(vocab))] for p in range(5)]
    eval_result = {
        "policies": {"sft": policy(0.33, 0.0, [0.0] * 5), "ppo": policy(0.99, 1.436, [1.15, 0.15, 0.09, 0.05, 0.0])},
        "distributions": {"prompt": "4 5 9 1 =", "vocab": vocab, "by_policy": {"sft": dist, "ppo": dist}},
    }
    summary = {"config": {"task": "digits", "seed": 0,
                          "ppo": {"kl_coef": 0.4, "adaptive_kl": adaptive, "rollout_batch_size": 128}},
               "reward": {"heldout_accuracy": 0.967}}
    report = write_report(tmp_path, summary, eval_result, METHODS["ppo"], metrics_path)
    return report.read_text()


def test_report_plots_and_table(tmp_path):
    text = write(tmp_path, ppo_metrics())
    for png in ("ppo_curves.png", "kl_per_position.png", "token_distributions.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 10_000, png
        assert f"]({png})" in text
    assert "| well_formed_rate | 0.995 | 0.995 |" in text
    assert "| reward | heldout_accuracy | 0.967 |" in text


def test_kl_per_position_labels_eos(tmp_path):
    labels = plot_kl_per_position({"ppo": policy(0.9, 1.0, [0.5, 0.2, 0.1, 0.1, 0.0])}, tmp_path / "kl.png")
    assert labels == ["pos 1", "pos 2", "pos 3", "pos 4", "EOS"]


def test_constant_beta_has_no_panel_but_is_stated(tmp_path):
    titles = plot_ppo_curves(ppo_metrics(), tmp_path / "c.png")
    assert not any("beta (adaptive)" in t for t in titles)
    assert any(t.startswith("KL(") and "beta = 0.4 throughout" in t for t in titles)
    assert "was 0.4 throughout" in write(tmp_path, ppo_metrics())
    titles = plot_ppo_curves(ppo_metrics(adaptive=True), tmp_path / "a.png")
    assert titles[-1] == "KL coefficient beta (adaptive)" and not any("throughout" in t for t in titles)
    assert "throughout" not in write(tmp_path, ppo_metrics(adaptive=True), adaptive=True)


def test_gold_metrics_panel_beside_the_score(tmp_path):
    titles = plot_ppo_curves(ppo_metrics(), tmp_path / "c.png")
    assert titles[0].startswith("reward-model score") and titles[1].startswith("gold metrics")
    assert "`gold/*`" in write(tmp_path, ppo_metrics())
    titles = plot_ppo_curves(ppo_metrics(gold=False), tmp_path / "n.png")  # none logged: no panel, no error
    assert not any(t.startswith("gold") for t in titles) and len(titles) == 2
    assert "`gold/*`" not in write(tmp_path, ppo_metrics(gold=False))


def test_early_kl_spike_is_explained(tmp_path):
    end = (0.4 * 28 / 30 + 0.4 * 29 / 30 + 0.4) / 3  # where the curve ends: the mean of its last tenth
    assert kl_spike(ppo_metrics()) == {"step": 3, "peak": pytest.approx(2.04), "final_step": 30, "final": pytest.approx(end)}
    text = write(tmp_path, ppo_metrics())
    sentence = next(line for line in text.splitlines() if line.startswith("The KL curve peaks"))
    assert "2.040 nats at step 3" in sentence and f"{end:.3f} nats, the mean of its last tenth, up to step 30" in sentence
    assert "sampled k1 estimate" in sentence and "one rollout batch of 128 responses" in sentence
    assert "exact KL" in sentence and "1.436 nats for ppo" in sentence
    assert kl_spike(ppo_metrics(spike=False)) is None  # a curve that rises to its final value
    assert "The KL curve peaks" not in write(tmp_path, ppo_metrics(spike=False))


def test_no_ppo_metrics(tmp_path):
    assert "(no PPO metrics)" in write(tmp_path, [])


def test_samples_side_by_side(tmp_path):
    """Every policy answered the same held-out prompts: one row per prompt, the policies' replies beside it."""
    text = write(tmp_path, ppo_metrics())
    assert "| prompt | sft | ppo |\n|---|---|---|\n| 4 5 9 1 = | 2 6 7 8 | 2 6 7 8 |" in text
    assert "even where the rule is kept" in text  # the digits task keeps its own wording


def test_undefined_figures_are_not_nan(tmp_path):
    """best-of-n has no per-token KL (NaN, null once read back from eval.json); a task without a known entropy has
    no SFT loss floor: shown as "–" or left out, never "nan"."""
    (tmp_path / "eval").mkdir()
    bon = {**policy(0.5, 0.3, [0.0] * 5), "kl_per_position": [None] * 5, "kl_k1": None,
           "kl_first_position_share": float("nan")}
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>", "="] + [str(d) for d in range(10)]
    dist = [[1.0 / len(vocab)] * len(vocab) for _ in range(5)]
    eval_result = {"policies": {"sft": policy(0.33, 0.0, [0.0] * 5), "best_of_n": bon},
                   "distributions": {"prompt": "4 5 9 1 =", "vocab": vocab, "by_policy": {"sft": dist}}}
    summary = {"config": {"task": "digits", "seed": 0, "best_of_n": {"n": 8}},
               "sft": {"heldout_loss": 1.2, "loss_floor": float("nan"), "excess_loss": None}}
    text = write_report(tmp_path, summary, eval_result, METHODS["best_of_n"], tmp_path / "none.jsonl").read_text()
    assert "| kl_k1 | 0.000 | – |" in text and "| kl_first_position_share | 0.000 | – |" in text
    assert "nan" not in text and "loss_floor" not in text and "| sft | heldout_loss | 1.200 |" in text


def test_alarms_section_near_the_top(tmp_path):
    """The report opens with the reward-hacking alarms (tests/test_hacking_alarm.py has the rules): here the training
    curve's later_rule_validity falls by 0.09 while the score rises; without gold curves PPO's figures raise none."""
    text = write(tmp_path, ppo_metrics())
    assert text.index("## Alarms") < text.index("## Results on held-out prompts")
    assert "`ppo`: 1 alarm." in text and "`gold/later_rule_validity` (higher is better)" in text
    assert "Its first held-out reply:\n\n| prompt | ppo |\n|---|---|\n| 4 5 9 1 = | 2 6 7 8 |" in text
    assert "`ppo`: none." in write(tmp_path, ppo_metrics(gold=False))
