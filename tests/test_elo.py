import random

import pytest

from rlhfkit.feedback.elo import elo_ladder, elo_ratings, expected_score, matches_from_ranking


def test_single_match_closed_form():
    # Equal ratings: expected score 1/2, so the winner gains k/2 and the loser loses k/2.
    r = elo_ratings([("a", "b", 1.0)], k=32)
    assert r == {"a": pytest.approx(1016.0), "b": pytest.approx(984.0)}
    # A 400-point gap means 10:1 odds.
    assert expected_score(1400, 1000) == pytest.approx(10 / 11)


def test_zero_sum_and_tie_between_equals_changes_nothing():
    r = elo_ratings([("a", "b", 0.5)] * 5 + [("a", "c", 1.0), ("c", "b", 0.0)])
    assert sum(r.values()) == pytest.approx(3000.0)
    assert elo_ratings([("a", "b", 0.5)]) == {"a": 1000.0, "b": 1000.0}


def test_ladder_orders_models_by_strength_with_cis():
    rng = random.Random(1)
    strength = {"strong": 1.0, "mid": 0.0, "weak": -1.0}
    matches = []
    for _ in range(600):
        a, b = rng.sample(sorted(strength), 2)
        p = 1 / (1 + 10 ** (-(strength[a] - strength[b])))
        matches.append((a, b, 1.0 if rng.random() < p else 0.0))
    ladder = elo_ladder(matches, rounds=100, seed=0)
    assert [row.model for row in ladder] == ["strong", "mid", "weak"]
    for row in ladder:
        assert row.ci_low <= row.rating <= row.ci_high
    assert ladder[0].ci_low > ladder[2].ci_high  # clearly separated
    assert elo_ladder(matches, rounds=20, seed=3) == elo_ladder(matches, rounds=20, seed=3)
    assert sum(row.matches for row in ladder) == 2 * len(matches)


def test_matches_from_ranking():
    # completions 0,1 from model x, 2 from y; ranking 2 > 0 = 1
    out = matches_from_ranking([[2], [0, 1]], ["x", "x", "y"])
    assert sorted(out) == [("x", "y", 0.0), ("x", "y", 0.0)]
    assert matches_from_ranking([[0, 1]], ["x", "y"]) == [("x", "y", 0.5)]
    assert elo_ladder([]) == []
