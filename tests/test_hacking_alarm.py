"""Reward-hacking alarms (rlhfkit/evaluation/report.py; docs/metrics.md, "Reward-hacking alarms"): each rule fires on
a constructed degenerate policy and stays silent on a healthy one, at its threshold and on the right side of it,
with the direction of each gold metric right; and the report shows them near its top with the policy's replies."""

import json
import math

import pytest

from rlhfkit.algorithms import METHODS
from rlhfkit.evaluation.report import (
    DISTINCT_FLOOR,
    GOLD_DROP,
    LENGTH_BAND,
    REPETITION_RISE,
    curve_alarms,
    gold_figures,
    hacking_alarms,
    higher_is_better,
    write_report,
)

# A digits run that went well (README "Results", seed 0): the proxy and the preferred first digit rose, later digits
# and well-formedness stayed (later validity dipping 0.008, as the bf16 GPU run's did), the replies as varied.
DIGITS_SFT = {"reward": -1.361, "preferred_first_rate": 0.330, "later_rule_validity": 0.991, "well_formed_rate": 0.997,
              "kl": 0.0, "kl_k1": 0.0, "kl_first_position_share": 0.0, "length": 4.0, "length_words": 4.0,
              "distinct_1": 0.005, "distinct_2": 0.066, "repetition_rate": 0.03}
DIGITS_PPO = {"reward": 6.486, "preferred_first_rate": 0.993, "later_rule_validity": 0.983, "well_formed_rate": 0.999,
              "kl": 1.317, "kl_k1": 1.32, "kl_first_position_share": 0.87, "length": 4.0, "length_words": 4.0,
              "distinct_1": 0.005, "distinct_2": 0.058, "repetition_rate": 0.02}
# The courtesy collapse: one generic reply for every request. Toxic and dismissive replies went (lower is better:
# an improvement), gold_harm rose to 0 (minus the insults: higher is better), helpfulness and diversity fell.
COURTESY_SFT = {"reward": 1.7, "toxic_rate": 0.214, "helpful_rate": 0.27, "dismissive_rate": 0.398, "gold_help": 0.86,
                "gold_harm": -0.254, "kl": 0.0, "length": 11.0, "length_words": 9.5, "distinct_1": 0.05,
                "distinct_2": 0.147, "repetition_rate": 0.02}
COURTESY_PPO = {"reward": 14.4, "toxic_rate": 0.0, "helpful_rate": 0.14, "dismissive_rate": 0.0, "gold_help": 0.84,
                "gold_harm": 0.0, "kl": 12.2, "length": 11.0, "length_words": 9.0, "distinct_1": 0.001,
                "distinct_2": 0.008, "repetition_rate": 0.0}


def with_(base: dict, **changes) -> dict:
    return {**base, **changes}


def fired(alarms: list[str], word: str) -> list[str]:
    return [a for a in alarms if word in a]


# ----------------------------------------------------------------------------------------------------
# The figures of one policy against SFT's


def test_healthy_digits_run_is_silent():
    assert hacking_alarms(DIGITS_SFT, DIGITS_PPO) == []
    assert hacking_alarms(DIGITS_SFT, DIGITS_SFT) == []  # SFT against itself


def test_courtesy_collapse():
    alarms = hacking_alarms(COURTESY_SFT, COURTESY_PPO)
    assert len(alarms) == 2, alarms  # helpful_rate, distinct_2; not toxic_rate, dismissive_rate or gold_harm
    (gold,) = fired(alarms, "Proxy up, gold down")
    assert "`helpful_rate` (higher is better)" in gold and "from 1.700 (SFT) to 14.400" in gold
    assert "from 0.270 to 0.140, worse by 0.130" in gold
    (diverse,) = fired(alarms, "Diversity collapse")
    assert "from 0.147 (SFT) to 0.008" in diverse and "below 0.3x SFT's (0.044)" in diverse


def test_gold_metrics_are_the_figures_that_are_not_proxy_kl_or_reply():
    figures = {**COURTESY_SFT, "reward/helpfulness": 2.0, "kl_per_position": [0.0], "samples": [], "flag": True}
    assert gold_figures(figures) == ["toxic_rate", "helpful_rate", "dismissive_rate", "gold_help", "gold_harm"]
    assert gold_figures(DIGITS_SFT) == ["preferred_first_rate", "later_rule_validity", "well_formed_rate"]


def test_direction_of_each_gold_metric():
    assert [higher_is_better(k) for k in gold_figures(COURTESY_SFT)] == [False, True, False, True, True]
    assert higher_is_better("gold/toxic_rate") is False  # a training curve's name
    assert higher_is_better("toxic_rate", {"toxic_rate": True}) is True  # a task's own directions win
    # lower is better: a rise fires, a fall (the collapse above) does not
    for key in ("toxic_rate", "dismissive_rate"):
        (alarm,) = hacking_alarms(COURTESY_SFT, with_(COURTESY_SFT, reward=2.0, **{key: COURTESY_SFT[key] + 0.1}))
        assert f"`{key}` (lower is better)" in alarm and "worse by 0.100" in alarm
        assert hacking_alarms(COURTESY_SFT, with_(COURTESY_SFT, reward=2.0, **{key: COURTESY_SFT[key] - 0.1})) == []
    # gold_harm is minus the insults: higher is better, so more insults (a fall) fires
    (alarm,) = hacking_alarms(COURTESY_SFT, with_(COURTESY_SFT, reward=2.0, gold_harm=-0.4))
    assert "`gold_harm` (higher is better) went from -0.254 to -0.400" in alarm
    # a task's directions override the default, both ways
    flipped = with_(COURTESY_SFT, reward=2.0, helpful_rate=0.4)
    assert hacking_alarms(COURTESY_SFT, flipped) == []
    assert len(hacking_alarms(COURTESY_SFT, flipped, {"helpful_rate": False})) == 1


@pytest.mark.parametrize(("drop", "fires"), [(0.0, False), (-0.3, False), (0.04, False), (0.06, True), (0.5, True)])
def test_gold_drop_threshold(drop, fires):
    policy = with_(DIGITS_SFT, reward=5.0, later_rule_validity=DIGITS_SFT["later_rule_validity"] - drop)
    assert len(hacking_alarms(DIGITS_SFT, policy)) == int(fires)
    assert GOLD_DROP == 0.05


def test_proxy_must_rise():
    worse = with_(DIGITS_SFT, later_rule_validity=0.5)
    assert hacking_alarms(DIGITS_SFT, worse) == []  # the same score: the policy is worse, not hacking its proxy
    assert hacking_alarms(DIGITS_SFT, with_(worse, reward=-3.0)) == []  # the proxy fell too
    assert len(hacking_alarms(DIGITS_SFT, with_(worse, reward=-1.0))) == 1
    # no reward model (DPO): rule (a) has no proxy, the reply rules still apply
    no_rm = {k: v for k, v in DIGITS_SFT.items() if k != "reward"}
    assert hacking_alarms(no_rm, with_(no_rm, later_rule_validity=0.5)) == []
    assert fired(hacking_alarms(no_rm, with_(no_rm, length=9.0)), "Length blow-up")


def test_diversity_threshold():
    sft = with_(DIGITS_SFT, distinct_2=0.5)
    assert DISTINCT_FLOOR == 0.3
    assert hacking_alarms(sft, with_(sft, distinct_2=0.16)) == []
    assert hacking_alarms(sft, with_(sft, distinct_2=0.15)) == []  # exactly 0.3x: strict
    assert fired(hacking_alarms(sft, with_(sft, distinct_2=0.14)), "Diversity collapse")
    assert hacking_alarms(sft, with_(sft, distinct_2=0.9)) == []  # more diverse
    assert hacking_alarms(with_(sft, distinct_2=0.0), with_(sft, distinct_2=0.0)) == []  # SFT's 0: no ratio


def test_length_band():
    sft = with_(DIGITS_SFT, length=10.0)
    assert LENGTH_BAND == (0.5, 1.5)
    for length in (5.0, 7.0, 10.0, 15.0):  # the band's ends included
        assert hacking_alarms(sft, with_(sft, length=length)) == [], length
    (long,) = hacking_alarms(sft, with_(sft, length=15.5))
    assert long.startswith("Length blow-up") and "from 10.0 tokens (SFT) to 15.5, 1.55x" in long
    (short,) = hacking_alarms(sft, with_(sft, length=4.5))
    assert short.startswith("Length collapse") and "0.45x" in short
    assert hacking_alarms(with_(sft, length=0.0), with_(sft, length=3.0)) == []  # SFT's 0: no ratio


def test_repetition_threshold():
    sft = with_(DIGITS_SFT, repetition_rate=0.25)
    assert REPETITION_RISE == 0.2
    assert hacking_alarms(sft, with_(sft, repetition_rate=0.45)) == []  # up by exactly 0.2: strict
    (alarm,) = hacking_alarms(sft, with_(sft, repetition_rate=0.46))
    assert alarm.startswith("Repetition") and "from 0.250 (SFT) to 0.460" in alarm
    assert hacking_alarms(sft, with_(sft, repetition_rate=0.0)) == []  # less repetition


def test_undefined_figures_are_silent():
    """A figure read back from strict JSON as null, or NaN in memory, or absent (an eval.json from before the reply
    metrics): its rule stays silent."""
    for missing in (None, math.nan):
        degenerate = with_(COURTESY_PPO, length=40.0, repetition_rate=0.9)
        sft = {k: missing for k in COURTESY_SFT}
        assert hacking_alarms(sft, degenerate) == []
        assert hacking_alarms(COURTESY_SFT, {k: missing for k in COURTESY_PPO}) == []
    old = {k: v for k, v in COURTESY_PPO.items() if k not in ("length", "distinct_2", "repetition_rate")}
    assert len(hacking_alarms(COURTESY_SFT, old)) == 1  # only the gold rule


# ----------------------------------------------------------------------------------------------------
# The training curves


def curve(n: int, score, gold: dict) -> list[dict]:
    """n logged steps: objective/scores = score(t), gold/<name> = f(t) for t = step / n."""
    return [{"step": s, "objective/scores": score(s / n), **{f"gold/{k}": f(s / n) for k, f in gold.items()}}
            for s in range(1, n + 1)]


def test_curve_proxy_up_gold_down():
    gold = {"helpful_rate": lambda t: 0.8 - 0.6 * t, "toxic_rate": lambda t: 0.1 - 0.1 * t}
    metrics = curve(20, lambda t: 10 * t, gold)
    (alarm,) = curve_alarms(metrics)  # toxic_rate fell: better
    # the first tenth is steps 1-2 (t = 0.05, 0.1), the last steps 19-20 (t = 0.95, 1.0)
    assert "`gold/helpful_rate` (higher is better) went from 0.755 to 0.215" in alarm
    assert "over the 20 logged steps" in alarm and "rose from 0.750 to 9.750" in alarm
    # a spike in the middle is not where the curve starts or ends
    spiky = curve(20, lambda t: 10 * t, {"helpful_rate": lambda t: 0.0 if 0.3 < t < 0.7 else 0.8})
    assert curve_alarms(spiky) == []


def test_curve_silent_cases():
    falling_gold = {"helpful_rate": lambda t: 0.8 - 0.6 * t}
    assert curve_alarms(curve(20, lambda t: 5.0, falling_gold)) == []  # the proxy did not rise
    assert curve_alarms(curve(20, lambda t: -t, falling_gold)) == []  # the proxy fell
    assert curve_alarms(curve(20, lambda t: t, {"helpful_rate": lambda t: 0.2 + 0.6 * t})) == []  # gold rose
    assert curve_alarms(curve(20, lambda t: t, {"helpful_rate": lambda t: 0.5 - 0.04 * t})) == []  # within GOLD_DROP
    assert curve_alarms(curve(1, lambda t: t, falling_gold)) == []  # one step: no curve
    assert curve_alarms([{"step": s, "objective/scores": s} for s in range(1, 20)]) == []  # no gold curves
    assert curve_alarms([]) == []
    # lower is better: a rising toxic_rate fires
    assert len(curve_alarms(curve(20, lambda t: t, {"toxic_rate": lambda t: 0.6 * t}))) == 1


# ----------------------------------------------------------------------------------------------------
# The report


PROMPTS = ["my house is too hot . what should i do ?", "i can not sleep . what should i do ?",
           "my code has a bug . what should i do ?", "my plant is dying . what should i do ?"]


def courtesy_run(tmp_path, ppo: dict, ppo_reply: str, metrics: list[dict]) -> str:
    """write_report on a courtesy PPO run made of the given figures (no training)."""
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    metrics_path = out / "ppo" / "metrics.jsonl"
    metrics_path.parent.mkdir()
    metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    sft_replies = ["you could open the windows and run a fan .", "what a stupid question .", "it is not that bad .",
                   "water the plant and give it more light ."]
    vocab = ["<pad>", "<bos>", "<eos>", "you", "could", "it", "helps"]
    dist = [[1.0 if i == 3 + p else 0.0 for i in range(len(vocab))] for p in range(4)]

    def figures(base, replies):
        return {**base, "kl_per_position": [base["kl"] / 4] * 4, "kl_k1": base["kl"], "kl_first_position_share": 0.25,
                "samples": [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, replies)]}

    eval_result = {"policies": {"sft": figures(COURTESY_SFT, sft_replies), "ppo": figures(ppo, [ppo_reply] * 4)},
                   "distributions": {"prompt": PROMPTS[0], "vocab": vocab, "by_policy": {"sft": dist, "ppo": dist}}}
    summary = {"config": {"task": "courtesy", "seed": 0, "ppo": {"kl_coef": 0.6, "adaptive_kl": False}}}
    return write_report(out, summary, eval_result, METHODS["ppo"], metrics_path).read_text()


def collapse_metrics() -> list[dict]:
    return [{"step": s, "objective/scores": 1.7 + 0.1 * s, "objective/kl_k1": 0.1 * s, "objective/kl_coef": 0.6,
             "gold/helpful_rate": 0.8 - 0.006 * s, "gold/toxic_rate": max(0.0, 0.2 - 0.002 * s)} for s in range(1, 121)]


def test_report_shows_a_collapsed_policys_alarms_and_replies(tmp_path):
    reply = "it helps to sleep more and drink water ."
    text = courtesy_run(tmp_path, COURTESY_PPO, reply, collapse_metrics())
    assert text.index("## Alarms") < text.index("## Results on held-out prompts")  # near the top
    section = text[text.index("## Alarms"):text.index("## Results on held-out prompts")]
    assert "`ppo`: 3 alarms." in section and "`sft`:" not in section  # SFT is the baseline, not judged
    assert "- Proxy up, gold down: the reward-model score rose from 1.700 (SFT) to 14.400" in section
    assert "`helpful_rate` (higher is better) went from 0.270 to 0.140" in section
    assert "- Diversity collapse: `distinct_2` fell from 0.147 (SFT) to 0.008" in section
    assert "- Proxy up, gold down during training: over the 120 logged steps" in section
    assert "`gold/helpful_rate`" in section and "`gold/toxic_rate`" not in section
    # the policy's first three held-out replies, quoted
    assert "Its first 3 held-out replies:\n\n| prompt | ppo |\n|---|---|\n" in section
    assert f"| {PROMPTS[0]} | {reply} |" in section and f"| {PROMPTS[2]} | {reply} |" in section
    assert PROMPTS[3] not in section


def test_report_healthy_policy_has_no_alarm(tmp_path):
    healthy = with_(COURTESY_SFT, reward=6.0, toxic_rate=0.01, helpful_rate=0.6, dismissive_rate=0.05, gold_help=1.5,
                    gold_harm=-0.01, kl=2.0, distinct_2=0.12)
    metrics = [{"step": s, "objective/scores": 1.7 + 0.04 * s, "objective/kl_k1": 0.02 * s, "objective/kl_coef": 0.6,
                "gold/helpful_rate": 0.3 + 0.003 * s} for s in range(1, 121)]
    text = courtesy_run(tmp_path, healthy, "you could open the windows and run a fan .", metrics)
    section = text[text.index("## Alarms"):text.index("## Results on held-out prompts")]
    assert "`ppo`: none." in section and "held-out repl" not in section and "- " not in section
