"""Consensus of several labelers' rankings: tie-group rankings -> positions, pairwise majority, Borda. Pure
functions; the data layer turns rankings into comparisons with them, the feedback stage and the labeling app
form their consensus with them (agreement statistics: rlhfkit/feedback/agreement.py).

A ranking is a list of tie groups of completion indices, best first (see rlhfkit.data.contract).

Layer: data.
"""

from __future__ import annotations

from itertools import combinations

from rlhfkit.data.contract import Ranking, ranking_from_scores


def rank_positions(ranking: Ranking) -> dict[int, float]:
    """Completion index -> average rank (1 = best); tied completions share the mean of their ranks."""
    pos: dict[int, float] = {}
    start = 1
    for group in ranking:
        mean = start + (len(group) - 1) / 2
        for i in group:
            pos[i] = mean
        start += len(group)
    return pos


def pair_outcome(pos: dict[int, float], i: int, j: int) -> int:
    """+1 if i ranked above j, -1 if below, 0 if tied."""
    return (pos[i] < pos[j]) - (pos[i] > pos[j])


def borda_consensus(rankings: list[Ranking]) -> Ranking:
    """Consensus ranking by Borda count: order by mean rank over labelers; exact ties stay tied."""
    k = sum(len(g) for g in rankings[0])
    positions = [rank_positions(r) for r in rankings]
    mean_rank = [sum(p[i] for p in positions) / len(positions) for i in range(k)]
    return ranking_from_scores([-m for m in mean_rank])


def majority_pairs(rankings: list[Ranking]) -> list[tuple[int, int, list[int]]]:
    """Consensus comparisons by pairwise majority (Condorcet): i beats j when more than half of the
    labelers rank i strictly above j. Returns (better, worse, indices of supporting labelers).

    Unlike Borda, a pair two labelers call a tie and one labeler calls a preference yields no pair, so
    one labeler's slip cannot create a comparison on its own.
    """
    k = sum(len(g) for g in rankings[0])
    positions = [rank_positions(r) for r in rankings]
    out = []
    for i, j in combinations(range(k), 2):
        for better, worse in ((i, j), (j, i)):
            support = [n for n, p in enumerate(positions) if pair_outcome(p, better, worse) == 1]
            if 2 * len(support) > len(rankings):
                out.append((better, worse, support))
    return out
