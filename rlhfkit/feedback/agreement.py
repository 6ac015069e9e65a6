"""Agreement between labelers and consensus rankings. Pure functions over tie-group rankings.

A ranking is a list of tie groups of completion indices, best first (see rlhfkit.data.contract).
"""

from __future__ import annotations

import math
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


def pairwise_agreement(a: Ranking, b: Ranking) -> float:
    """Share of completion pairs on which two rankings give the same outcome (better / worse / tie)."""
    pa, pb = rank_positions(a), rank_positions(b)
    pairs = list(combinations(sorted(pa), 2))
    return sum(pair_outcome(pa, i, j) == pair_outcome(pb, i, j) for i, j in pairs) / len(pairs)


def kendall_tau_b(a: Ranking, b: Ranking) -> float | None:
    """Kendall's tau-b between two rankings with ties (Kendall 1945); None when either is all ties."""
    pa, pb = rank_positions(a), rank_positions(b)
    concordant = discordant = ties_a = ties_b = 0
    for i, j in combinations(sorted(pa), 2):
        sa, sb = pair_outcome(pa, i, j), pair_outcome(pb, i, j)
        if sa == 0 and sb == 0:
            continue  # tied in both: counts in neither denominator term
        if sa == 0:
            ties_a += 1
        elif sb == 0:
            ties_b += 1
        elif sa == sb:
            concordant += 1
        else:
            discordant += 1
    n_a = concordant + discordant + ties_b  # pairs not tied in a
    n_b = concordant + discordant + ties_a  # pairs not tied in b
    if n_a == 0 or n_b == 0:
        return None
    return (concordant - discordant) / math.sqrt(n_a * n_b)


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


def mean_agreement(rankings_per_item: list[list[Ranking]]) -> dict[str, float | None]:
    """Average pairwise agreement and Kendall tau-b over every pair of labelers on every item."""
    agreements, taus = [], []
    for rankings in rankings_per_item:
        for a, b in combinations(rankings, 2):
            agreements.append(pairwise_agreement(a, b))
            tau = kendall_tau_b(a, b)
            if tau is not None:
                taus.append(tau)
    return {
        "pairwise_agreement": sum(agreements) / len(agreements) if agreements else None,
        "kendall_tau": sum(taus) / len(taus) if taus else None,
    }
