"""Oracle: Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", Sec. C worked example
(4 observers, 12 units, values 1-5, missing data). Published: nominal 0.743, ordinal 0.815,
interval 0.849."""

import pytest

from rlhfkit.feedback.krippendorff import alpha_for_rankings, coincidences, krippendorff_alpha

_ = None
# rows = observers A..D, columns = units 1..12 (the paper's reliability data matrix)
DATA = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, _, _, _],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, _, 3],
    [_, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, _],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, _],
]
UNITS = [[row[u] for row in DATA if row[u] is not None] for u in range(12)]


@pytest.mark.parametrize("metric,published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_published_example(metric, published):
    assert krippendorff_alpha(UNITS, metric) == pytest.approx(published, abs=5e-4)


def test_coincidence_marginals_match_paper():
    # The paper's n_c: value 1 -> 9, 2 -> 13, 3 -> 10, 4 -> 5, 5 -> 3; n = 40 pairable values.
    o = coincidences(UNITS)
    marg = {}
    for (c, _k), w in o.items():
        marg[c] = marg.get(c, 0) + w
    assert {c: round(v, 9) for c, v in marg.items()} == {1: 9, 2: 13, 3: 10, 4: 5, 5: 3}


def test_perfect_agreement_is_one_and_undefined_cases():
    assert krippendorff_alpha([[1, 1], [2, 2], [3, 3, 3]], "ordinal") == pytest.approx(1.0)
    assert krippendorff_alpha([[1], [2]], "ordinal") is None  # nothing pairable
    assert krippendorff_alpha([[2, 2], [2, 2]], "ordinal") is None  # no expected disagreement


def test_rankings_identical_vs_reversed():
    same = {"a": [[[0], [1], [2]], [[0], [1], [2]]], "b": [[[2], [0, 1]], [[2], [0, 1]]]}
    assert alpha_for_rankings(same) == pytest.approx(1.0)
    opposed = {"a": [[[0], [1], [2]], [[2], [1], [0]]], "b": [[[0], [1], [2]], [[2], [1], [0]]]}
    assert alpha_for_rankings(opposed) < 0
    assert alpha_for_rankings({"a": [[[0], [1]]]}) is None  # one labeler: nothing to compare
