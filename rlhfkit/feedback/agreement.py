"""Agreement between labelers. Pure functions over tie-group rankings (the consensus rules: rlhfkit.data.consensus).

A ranking is a list of tie groups of completion indices, best first (see rlhfkit.data.contract).
"""

from __future__ import annotations

import math
from itertools import combinations

from rlhfkit.data.consensus import pair_outcome, rank_positions
from rlhfkit.data.contract import Ranking


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
