"""Krippendorff's alpha: chance-corrected agreement of several coders on the same units.

Follows Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability" (Annenberg School for
Communication, Departmental Papers 43), Sec. C: values are paired within each unit into a coincidence
matrix o_ck (each pairable value contributes 1/(m_u - 1) per partner, units with fewer than two values
are dropped), and

    alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_{c,k} o_ck d2(c,k) / sum_{c,k} n_c n_k d2(c,k)

with n_c the marginal totals and n their sum. The difference function d2 depends on the metric:
nominal (0/1), interval ((c - k)^2), and ordinal

    d2(c, k) = ( sum_{g=c}^{k} n_g  -  (n_c + n_k) / 2 )^2    for c <= k,

which uses only the order of the values and their marginal frequencies, so rank positions (with the
mean rank for ties, e.g. 1.5) are valid ordinal values.

For labeling, a unit is one (item, completion) pair and each labeler's value is the rank position they
gave that completion (see `alpha_for_rankings`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence

from rlhfkit.data.consensus import rank_positions

METRICS = ("nominal", "ordinal", "interval")


def coincidences(units: Iterable[Sequence[float]]) -> dict[tuple[float, float], float]:
    """Coincidence matrix o_ck from the values given to each unit (missing values left out)."""
    o: dict[tuple[float, float], float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue  # a value with no partner in its unit is not pairable
        for a in range(m):
            for b in range(m):
                if a != b:
                    o[(values[a], values[b])] += 1.0 / (m - 1)
    return dict(o)


def _squared_difference(metric: str, marginals: dict[float, float]):
    values = sorted(marginals)
    if metric == "nominal":
        return lambda c, k: 0.0 if c == k else 1.0
    if metric == "interval":
        return lambda c, k: float(c - k) ** 2
    if metric == "ordinal":
        index = {v: i for i, v in enumerate(values)}
        cumulative = [0.0]  # cumulative[i] = sum of n_g for the first i values
        for v in values:
            cumulative.append(cumulative[-1] + marginals[v])

        def ordinal(c: float, k: float) -> float:
            lo, hi = sorted((index[c], index[k]))
            between = cumulative[hi + 1] - cumulative[lo]  # sum_{g=c}^{k} n_g
            return (between - (marginals[values[lo]] + marginals[values[hi]]) / 2.0) ** 2

        return ordinal
    raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def krippendorff_alpha(units: Iterable[Sequence[float]], metric: str = "ordinal") -> float | None:
    """Alpha over units, each given as the list of values the coders assigned to it.

    Returns None when alpha is undefined: no pairable values, or a single value used throughout
    (no expected disagreement).
    """
    o = coincidences(units)
    marginals: dict[float, float] = defaultdict(float)
    for (c, _k), w in o.items():
        marginals[c] += w
    n = sum(marginals.values())
    if n <= 1:
        return None
    d2 = _squared_difference(metric, marginals)
    observed = sum(w * d2(c, k) for (c, k), w in o.items())
    expected = sum(marginals[c] * marginals[k] * d2(c, k) for c in marginals for k in marginals)
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


def alpha_for_rankings(rankings_per_item: dict[Hashable, list[list[list[int]]]], metric: str = "ordinal") -> float | None:
    """Alpha over ranked items: unit = (item, completion index), value = its rank position (ties share
    the mean rank) in each labeler's ranking. Items ranked by one labeler only contribute nothing."""
    units = []
    for rankings in rankings_per_item.values():
        if len(rankings) < 2:
            continue
        positions = [rank_positions(r) for r in rankings]
        for i in positions[0]:
            units.append([p[i] for p in positions])
    return krippendorff_alpha(units, metric)
