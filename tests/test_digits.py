"""The digits task: the rule, the gold labels, and the exact entropy floor."""

import math
import random

import pytest

from rlhfkit.core.errors import ConfigError
from rlhfkit.tasks import get_task
from rlhfkit.tasks.digits import follows_rule, next_digit_distribution, prompt_digits


def test_spec_example(digits):
    # README, "The `digits` task": prompt 4 5 9 1 -> 6 2 7 8 is valid; the preferred first digit is 2.
    pref, validity, well_formed = digits.judge("4 5 9 1 =", "6 2 7 8")
    assert (pref, validity, well_formed) == (False, 1.0, True)
    assert digits.judge("4 5 9 1 =", "2 6 7 8")[0] is True
    assert digits.judge("4 5 9 1 =", "6 2 7")[2] is False
    assert digits.judge("4 5 9 1 =", "x y")[:2] == (False, 0.0)


def test_demonstrations_follow_rule_and_base_rate(digits):
    demos = digits.demonstrations(20000, random.Random(0))
    m = digits.gold_metrics([p for p, _ in demos], [c for _, c in demos])
    assert m["later_rule_validity"] == 1.0 and m["well_formed_rate"] == 1.0
    assert m["preferred_first_rate"] == pytest.approx(0.325, abs=0.01)  # (1 + 3/10) / 4
    for p, c in demos[:200]:
        history = prompt_digits(p)
        for d in map(int, c.split()):
            assert follows_rule(history, d)
            history.append(d)


def test_gold_score_orders_preferences(digits):
    p = "4 5 9 1 ="
    assert digits.gold_score(p, "2 6 7 8") > digits.gold_score(p, "6 2 7 8") > digits.gold_score(p, "6 0 0 0")
    assert digits.gold_score(p, "6 2 7 8") == digits.gold_score(p, "5 6 7 8")  # tie


def test_entropy_floor_matches_monte_carlo(digits):
    rng = random.Random(1)
    total, n = 0.0, 4000
    for p, c in digits.demonstrations(n, rng):
        history = prompt_digits(p)
        for d in map(int, c.split()):
            probs = next_digit_distribution(history)
            total += -sum(q * math.log(q) for q in probs if q > 0)
            history.append(d)
    mc = total / (n * 5)  # 4 digits + a deterministic EOS
    assert digits.sft_loss_floor() == pytest.approx(mc, abs=0.01)


def test_tokenizer_roundtrip(tokenizer):
    ids = tokenizer("4 5 9 1 =")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 6
    assert tokenizer.decode(tokenizer("6 2 7 8", add_special_tokens=False)["input_ids"]) == "6 2 7 8"


def test_unknown_task():
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        get_task("digit")
