"""Whole K-way rankings as training data: items with their completions and every labeler's ranking of them.

The listwise losses (a Plackett-Luce reward model, `reward.loss = "plackett_luce"`; DPO over rankings,
`dpo.loss = "plackett_luce"`) batch by *item*: an item's K completions go through the model in ONE forward,
and each ranking of the item is one term of the loss over those K scores. Rules (docs/methods/reward.md):

- Several labelers: each labeler's ranking is its own term (the likelihood of every observed ranking, the
  labelers independent given the scores), so an item ranked by three labelers counts three times, as its
  pairs do in the comparisons when all three agree. Raw rankings, not a consensus: disagreement between
  labelers stays in the data, as the soft target of the likelihood.
- Identical completion texts in one item are one alternative (a text cannot be better than itself, and the
  model scores both copies alike): the first copy (lowest index) stands for them, later copies leave every
  ranking. The comparisons drop pairs of identical texts for the same reason.
- A ranking left with a single tie group implies no preference: it is not a term (as it gives no
  comparison). An item keeps its completions even when none of its rankings is left (held-out comparisons
  may still name them).
- Ties inside a ranking: the Plackett-Luce tie rule of rlhfkit/ops/losses.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from rlhfkit.core.errors import DataError
from rlhfkit.data.batching import encode_pairs
from rlhfkit.data.contract import Comparison, Ranking, RankingRecord, Text
from rlhfkit.ops.losses import ranks_from_tie_groups


@dataclass(frozen=True)
class RankedItem:
    """One prompt, its distinct completions and the rankings of them that imply a preference."""

    item_id: str
    prompt: Text
    completions: list[Text]  # distinct texts, in first-seen order
    rankings: list[Ranking]  # one per labeler (with >= 2 tie groups), indices into `completions`
    criterion: str


def text_key(text: Text) -> str:
    """A hashable key of a text or conversation (equal keys = equal texts)."""
    return text if isinstance(text, str) else json.dumps(text, ensure_ascii=False, sort_keys=True)


def group_rankings(records: list[RankingRecord]) -> list[RankedItem]:
    """The records (one criterion) as items, in first-seen order, by the rules at the top of this module."""
    by_item: dict[str, list[RankingRecord]] = {}
    for r in records:
        by_item.setdefault(r.item_id, []).append(r)
    items = []
    for item_id, recs in by_item.items():
        first = recs[0]
        distinct: dict[str, int] = {}  # text_key -> its index among the distinct completions
        index, texts = {}, []  # original index of a first copy -> its new index; the distinct texts
        for i, text in enumerate(first.completions):
            if text_key(text) not in distinct:
                index[i] = distinct[text_key(text)] = len(texts)
                texts.append(text)
        rankings = []
        for r in recs:
            groups = [[index[i] for i in group if i in index] for group in r.ranking]
            groups = [g for g in groups if g]
            if len(groups) >= 2:
                rankings.append(groups)
        items.append(RankedItem(item_id, first.prompt, texts, rankings, first.criterion))
    return items


@dataclass
class RankedData:
    """Items as tensors. `seqs` = (ids, attention mask, completion mask), each (M, T): every item's completions,
    item after item, in encode_pairs' right-padded prompt + completion + EOS layout. rows (I, K): the row of each
    item's k-th completion, -1 past its last. ranks (I, L, K): ranking l of item i (0 = best, equal = tied,
    -1 = absent), all -1 where the item has fewer than L rankings."""

    seqs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    rows: torch.Tensor
    ranks: torch.Tensor
    row_of: dict[tuple[str, str], int]  # (item_id, text_key of a completion) -> row

    def items_per_batch(self, rankings_per_batch: int) -> int:
        """Whole items holding about `rankings_per_batch` rankings (at least one item): a listwise trainer's
        batch_size counts rankings, as a pairwise one's counts comparisons, so both make about as many steps
        per epoch, while an item's rankings stay in the batch that forwards its completions."""
        n_rankings = int((self.ranks >= 0).any(dim=-1).sum())
        return max(1, round(rankings_per_batch * len(self.rows) / max(n_rankings, 1)))

    def batch(self, items: torch.Tensor):
        """For items (B,): the rows to forward (F,), where their values land in a (B, K) grid (`present`, row-major
        as the rows), and every ranking of those items: ranks (R, K) and the batch position of its item (R,)."""
        rows = self.rows[items]  # (B, K)
        present = rows >= 0
        ranks = self.ranks[items]  # (B, L, K)
        real = (ranks >= 0).any(dim=-1)  # (B, L): a ranking, not padding
        owner = torch.arange(len(items), device=rows.device)[:, None].expand_as(real)[real]  # (R,)
        return rows[present], present, ranks[real], owner

    def comparison_rows(self, comparisons: list[Comparison]) -> torch.Tensor:
        """(P, 2) rows of each comparison's chosen and rejected completion."""
        pairs = []
        for c in comparisons:
            keys = [(c.item_id, text_key(t)) for t in (c.chosen, c.rejected)]
            missing = [k for k in keys if k not in self.row_of]
            if missing:
                raise DataError(f"a comparison of item {c.item_id!r} names {missing[0][1]!r}, which no ranking of the "
                                "item lists; the comparisons and the rankings must come from the same labels")
            pairs.append([self.row_of[k] for k in keys])
        return torch.tensor(pairs, dtype=torch.long, device=self.rows.device).reshape(-1, 2)


def to_grid(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(F,) per-row values -> (B, K), in row-major order of `present`; 0 where absent (the losses mask it)."""
    return values.new_zeros(present.shape).masked_scatter(present, values)


def encode_ranked_items(tokenizer, items: list[RankedItem]) -> RankedData:
    """RankedData of `items`: the sequences once per distinct completion, the rankings as rank tensors."""
    k = max(len(it.completions) for it in items)
    n_rankings = max(max((len(it.rankings) for it in items), default=0), 1)
    rows = torch.full((len(items), k), -1, dtype=torch.long)
    ranks = torch.full((len(items), n_rankings, k), -1, dtype=torch.long)
    prompts, completions, row_of = [], [], {}
    for i, it in enumerate(items):
        for j, text in enumerate(it.completions):
            rows[i, j] = row_of[(it.item_id, text_key(text))] = len(completions)
            prompts.append(it.prompt)
            completions.append(text)
        if it.rankings:
            ranks[i, : len(it.rankings)] = ranks_from_tie_groups(it.rankings, k)
    return RankedData(encode_pairs(tokenizer, prompts, completions), rows, ranks, row_of)
