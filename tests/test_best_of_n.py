"""Best-of-N: the selection against a plain loop, the KL bound's closed form, and the sampler picking what
the scorer prefers."""

import math
import random

import pytest
import torch

from rlhfkit.algorithms.best_of_n import best_of_groups, best_of_n_kl, best_of_n_texts
from rlhfkit.models.runtime import Runtime


def _loop_best(scores, k, ended):
    """Plain loop: per group of k consecutive rows, the first row with the highest score among the rows that
    ended, or among all rows when none ended."""
    out = []
    for g in range(len(scores) // k):
        rows = list(range(g * k, (g + 1) * k))
        pool = [i for i in rows if ended[i]] or rows
        best = pool[0]
        for i in pool:
            if scores[i] > scores[best]:
                best = i
        out.append(best)
    return out


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_best_of_groups_matches_loop(k):
    rng = random.Random(k)
    for _ in range(50):
        n = k * rng.randint(1, 6)
        scores = [float(rng.randint(-3, 3)) for _ in range(n)]  # small integers: many ties
        ended = [rng.random() < 0.7 for _ in range(n)]
        got = best_of_groups(torch.tensor(scores), k, torch.tensor(ended)).tolist()
        assert got == _loop_best(scores, k, ended)
        assert best_of_groups(torch.tensor(scores), k).tolist() == _loop_best(scores, k, [True] * n)


def test_best_of_groups_fixed_cases():
    scores = torch.tensor([1.0, 5.0, 5.0, 0.0,   9.0, 2.0, 3.0, 1.0,   -1.0, -2.0, -3.0, -4.0])
    ended = torch.tensor([True, True, True, True, False, True, True, False, False, False, False, False])
    # ties go to the first; an unended 9.0 loses to an ended 3.0; a group where nothing ended still picks its best
    assert best_of_groups(scores, 4, ended).tolist() == [1, 6, 8]


def test_best_of_n_kl_closed_form():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)
    assert all(best_of_n_kl(n + 1) > best_of_n_kl(n) for n in range(1, 64))


def test_best_of_n_texts_returns_the_scorers_favourite(digits, tokenizer, sharp_policy):
    """With a scorer that prefers completions starting with a given digit, every answer is the highest-scoring
    of the n samples drawn for it: re-drawing the same samples and scoring them by hand agrees."""
    from rlhfkit.spine.rollout import collect_rollouts

    rt = Runtime(torch.device("cpu"), None)
    policy = sharp_policy("gpt2")
    scorer = lambda prompts, texts: torch.tensor([float(len(t)) + (t[:1] == "7") * 10.0 for t in texts])  # noqa: E731
    prompts = digits.prompts(6, random.Random(0))
    texts, scores = best_of_n_texts(policy, tokenizer, scorer, prompts, 4, max_new_tokens=digits.max_new_tokens,
                                    temperature=1.0, generator=torch.Generator().manual_seed(3), rt=rt, batch_size=4)
    r = collect_rollouts(policy, None, scorer, tokenizer, prompts[:4], k=4, max_new_tokens=digits.max_new_tokens,
                         temperature=1.0, generator=torch.Generator().manual_seed(3), rt=rt, with_logprobs=False)
    for g in range(4):
        rows = range(4 * g, 4 * g + 4)
        pool = [i for i in rows if r.ended[i]] or list(rows)
        assert scores[g].item() == max(r.scores[i].item() for i in pool)
        assert texts[g] == r.texts[max(pool, key=lambda i: (r.scores[i].item(), -i))]
    assert len(texts) == len(scores) == 6
