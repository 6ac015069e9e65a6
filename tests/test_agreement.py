import pytest

from rlhfkit.data.consensus import borda_consensus, majority_pairs, rank_positions
from rlhfkit.feedback.agreement import kendall_tau_b, mean_agreement, pairwise_agreement


def test_rank_positions_ties_share_mean_rank():
    assert rank_positions([[2], [0, 3], [1]]) == {2: 1.0, 0: 2.5, 3: 2.5, 1: 4.0}


def test_kendall_tau_b_known_values():
    a = [[0], [1], [2], [3]]
    assert kendall_tau_b(a, a) == pytest.approx(1.0)
    assert kendall_tau_b(a, [[3], [2], [1], [0]]) == pytest.approx(-1.0)
    # one swapped adjacent pair of 4: (C - D) / 6 = (5 - 1) / 6
    assert kendall_tau_b(a, [[1], [0], [2], [3]]) == pytest.approx(4 / 6)
    # tau-b with ties: x = 1,2,3,4 ; y = 1,1,2,3 (items 0,1 tied in y): C=5, D=0, n0=6, ties_y=1
    assert kendall_tau_b(a, [[0, 1], [2], [3]]) == pytest.approx(5 / ((6 * 5) ** 0.5))
    assert kendall_tau_b(a, [[0, 1, 2, 3]]) is None


def test_pairwise_agreement():
    assert pairwise_agreement([[0], [1], [2]], [[0], [1], [2]]) == 1.0
    assert pairwise_agreement([[0], [1], [2]], [[0], [2], [1]]) == pytest.approx(2 / 3)
    assert pairwise_agreement([[0, 1]], [[0], [1]]) == 0.0


def test_borda_and_majority():
    rankings = [[[0], [1], [2]], [[0], [2], [1]], [[1], [0], [2]]]
    assert borda_consensus(rankings)[0] == [0]
    pairs = {(i, j): s for i, j, s in majority_pairs(rankings)}
    assert set(pairs) == {(0, 1), (0, 2), (1, 2)}
    assert pairs[(0, 2)] == [0, 1, 2]
    # one labeler's preference against two ties: no majority, no pair
    assert majority_pairs([[[0, 1]], [[0, 1]], [[0], [1]]]) == []


def test_mean_agreement():
    r = [[0], [1]]
    out = mean_agreement([[r, r], [r, [[1], [0]]]])
    assert out["pairwise_agreement"] == 0.5
    assert out["kendall_tau"] == 0.0
