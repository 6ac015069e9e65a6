"""Elo ratings of models from head-to-head outcomes, with bootstrap confidence intervals.

Outcomes come from human rankings: whenever one labeler ranked completions of two different models on
the same prompt, that is a match (win, loss or tie). Ratings use the classic online Elo update (Elo 1978)

    E_a = 1 / (1 + 10^((R_b - R_a) / scale)),     R_a += k * (S_a - E_a),    S_a in {1, 0.5, 0}

Online Elo depends on the order of matches, and labeling data has no meaningful order. Following the
Chatbot Arena practice (Zheng et al., 2023; Chiang et al., 2024), the ladder's point estimate is the
median over bootstrap rounds, each of which resamples the matches with replacement in a random order,
and the confidence interval is the percentile interval over the same rounds. Deviation from classic
chess Elo: a small k (4) because every round replays all matches, which would otherwise let the last few
matches dominate.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

Match = tuple[str, str, float]  # (model_a, model_b, score of a: 1 win, 0.5 tie, 0 loss)


def expected_score(r_a: float, r_b: float, scale: float = 400.0) -> float:
    return 1.0 / (1.0 + 10.0 ** ((r_b - r_a) / scale))


def elo_ratings(matches: list[Match], *, k: float = 4.0, scale: float = 400.0, initial: float = 1000.0) -> dict[str, float]:
    """Replay matches in the given order and return each model's final rating."""
    ratings: dict[str, float] = {}
    for a, b, score in matches:
        r_a, r_b = ratings.setdefault(a, initial), ratings.setdefault(b, initial)
        e_a = expected_score(r_a, r_b, scale)
        ratings[a] = r_a + k * (score - e_a)
        ratings[b] = r_b - k * (score - e_a)  # zero-sum: b gains what a loses
    return ratings


@dataclass(frozen=True)
class LadderRow:
    model: str
    rating: float  # median over bootstrap rounds
    ci_low: float
    ci_high: float
    matches: int
    wins: float  # ties count one half


def elo_ladder(
    matches: list[Match], *, rounds: int = 200, confidence: float = 0.95, seed: int = 0, k: float = 4.0
) -> list[LadderRow]:
    """Bootstrap Elo ladder, best first. Deterministic for a given seed."""
    if not matches:
        return []
    rng = random.Random(seed)
    models = sorted({m for a, b, _ in matches for m in (a, b)})
    samples: dict[str, list[float]] = {m: [] for m in models}
    for _ in range(rounds):
        resampled = [matches[rng.randrange(len(matches))] for _ in matches]  # with replacement, random order
        ratings = elo_ratings(resampled, k=k)
        for m in models:
            samples[m].append(ratings.get(m, 1000.0))  # a model absent from this resample stays at the start
    played = {m: 0 for m in models}
    wins = {m: 0.0 for m in models}
    for a, b, score in matches:
        played[a] += 1
        played[b] += 1
        wins[a] += score
        wins[b] += 1.0 - score
    tail = (1.0 - confidence) / 2.0
    rows = []
    for m in models:
        s = sorted(samples[m])
        rows.append(
            LadderRow(m, _quantile(s, 0.5), _quantile(s, tail), _quantile(s, 1.0 - tail), played[m], wins[m])
        )
    return sorted(rows, key=lambda r: -r.rating)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def matches_from_ranking(ranking: list[list[int]], model_ids: list[str]) -> list[Match]:
    """Head-to-head outcomes implied by one ranking of completions labelled with their models.
    Completions from the same model are not a match."""
    pos = {i: g for g, group in enumerate(ranking) for i in group}
    out = []
    n = len(model_ids)
    for i in range(n):
        for j in range(i + 1, n):
            if model_ids[i] == model_ids[j]:
                continue
            score = 1.0 if pos[i] < pos[j] else 0.0 if pos[i] > pos[j] else 0.5
            out.append((model_ids[i], model_ids[j], score))
    return out
