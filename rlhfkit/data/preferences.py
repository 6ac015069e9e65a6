"""Preference data as a stage reads it (the reward model, DPO, KTO): the run's comparisons, rankings or thumbs, or a file in
any format rlhfkit reads, one criterion, text the stage's tokenizer can represent, split by item into training
and held-out parts (rlhfkit.data.splits). The pipeline calls these before anything runs, so bad data fails
before SFT, not after it. Errors name the file, line and field.

Layer: data.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple

from rlhfkit.core.errors import DataError
from rlhfkit.data.batching import check_representable
from rlhfkit.data.contract import Comparison, Thumb
from rlhfkit.data.load import convert_records, format_origin, rankings_to_comparisons, read_data
from rlhfkit.data.ranked import RankedItem, group_rankings
from rlhfkit.data.splits import is_heldout, split_by_item


def select_criterion(comparisons: list, criterion: str, source: str | Path,
                     noun: str = "comparisons") -> tuple[list, str]:
    """The records (comparisons, or rankings) of one criterion, and its name. `criterion` empty: the data must
    hold a single criterion (whatever it is), else an error lists those found, so mixed labels never train one
    model. '*' (one model per criterion, train_reward_model): every record, as one checks them all at once."""
    counts = Counter(c.criterion for c in comparisons).most_common()
    found = ", ".join(f"'{name}' ({n} {noun})" for name, n in counts)
    if criterion == "*":
        return comparisons, "*"
    if not criterion:
        if len(counts) > 1:
            raise DataError(f"{source}: comparisons of {len(counts)} criteria ({found}); a reward model learns one, "
                            f"so set reward.criterion to one of them")
        return comparisons, counts[0][0] if counts else ""
    selected = [c for c in comparisons if c.criterion == criterion]
    if not selected:
        raise DataError(f"{source}: no {noun} with reward.criterion = '{criterion}'; the file holds {found}")
    return selected, criterion


def preference_files(cfg, out: Path, loss: str) -> tuple[Path | None, Path | None]:
    """(comparisons or None, rankings or None) a stage with this loss reads: reward.data (comparisons, or
    rankings for 'plackett_luce'), else the feedback stage's files, whose comparisons also measure a
    plackett_luce model (its held-out accuracy)."""
    listwise = loss == "plackett_luce"
    if cfg.reward.data:
        return (None, Path(cfg.reward.data)) if listwise else (Path(cfg.reward.data), None)
    return out / "feedback" / "comparisons.jsonl", (out / "feedback" / "rankings.jsonl" if listwise else None)


def read_preferences(path: str | Path, kind: str, stage: str) -> list:
    """The comparisons (kind 'pairs') or rankings of a preference file in any format rlhfkit reads: the
    contract's, TRL's, Anthropic HH, UltraFeedback, ... (rlhfkit.data.load; errors name file, line and
    field). Rankings give their pairs; comparisons cannot give whole rankings, which a listwise loss needs."""
    data = read_data(path)
    if kind == "rankings" and data.kind != "rankings":
        raise DataError(f"{path}: holds {data.kind} ({format_origin(data)}), but {stage}.loss = 'plackett_luce' trains "
                        "on whole rankings; give a rankings file (like the feedback stage's rankings.jsonl, or "
                        f"UltraFeedback-style ratings; docs/data.md) or a pairwise {stage}.loss")
    try:
        return convert_records(data.records, data.kind, kind)
    except DataError as e:
        raise DataError(f"{path}: {e} ({format_origin(data)})") from None


def load_comparisons(path: str | Path, criterion: str, heldout_fraction: float, seed: int, tokenizer,
                     stage: str = "reward"):
    """(train, held-out) comparisons a stage learns from (the reward model, or DPO's policy): read (errors
    name file:line:field), one criterion, text the stage's tokenizer can represent, enough items to hold
    some out (`{stage}.heldout_fraction`). The pipeline calls this before anything runs, so bad data fails
    before SFT, not after it."""
    comparisons, _ = select_criterion(read_preferences(path, "pairs", stage), criterion, path)
    texts = [(f"item {c.item_id!r} field {field!r}", getattr(c, field))
             for c in comparisons for field in ("prompt", "chosen", "rejected")]
    check_representable(tokenizer, texts, str(path), "reward model" if stage == "reward" else f"{stage} policy")
    train, test = split_by_item(comparisons, heldout_fraction, seed)
    if not train or not test:
        of = f" of criterion {criterion!r}" if criterion and criterion != "*" else ""
        raise DataError(f"{path}: {len(comparisons)} comparisons{of} are too few to hold out "
                        f"{heldout_fraction:.0%} of items; label more items or change {stage}.heldout_fraction "
                        "(when the labelers tied most replies, the policy's samples differ too little by this "
                        "criterion)")
    return train, test


class RankingSplit(NamedTuple):
    items: list[RankedItem]  # what a listwise loss trains on
    comparisons: list[Comparison]  # the consensus comparisons of the same items: where pairwise accuracy is measured


def load_rankings(path: str | Path, comparisons_path: str | Path | None, criterion: str, heldout_fraction: float,
                  seed: int, tokenizer, stage: str = "reward") -> tuple[RankingSplit, RankingSplit]:
    """(train, held-out) rankings and comparisons a listwise stage reads, split by item as load_comparisons
    splits (same seed and fraction: the same held-out items). The comparisons are those of `comparisons_path`
    (the feedback stage's, which a Bradley-Terry model of the same run trains on), else the pairwise-majority
    consensus of the rankings (feedback.consensus' default and the labeling app's rule). Errors name
    file:line:field (a ranking that is not a permutation, a missing field) before anything runs."""
    records, _ = select_criterion(read_preferences(path, "rankings", stage), criterion, path, noun="rankings")
    texts = [(f"item {r.item_id!r} field {field!r}", text) for r in records
             for field, text in [("prompt", r.prompt), *(("completions", c) for c in r.completions)]]
    check_representable(tokenizer, texts, str(path), "reward model" if stage == "reward" else f"{stage} policy")
    items = group_rankings(records)
    if comparisons_path is not None:
        train_comparisons, test_comparisons = load_comparisons(comparisons_path, criterion, heldout_fraction, seed,
                                                               tokenizer, stage)
    else:  # the pairwise-majority consensus (the labeling app's rule)
        train_comparisons, test_comparisons = split_by_item(rankings_to_comparisons(records), heldout_fraction, seed)
    train = RankingSplit([it for it in items if not is_heldout(it.item_id, heldout_fraction, seed)], train_comparisons)
    test = RankingSplit([it for it in items if is_heldout(it.item_id, heldout_fraction, seed)], test_comparisons)
    if not any(it.rankings for it in train.items) or not test.comparisons:
        raise DataError(f"{path}: {len(items)} items are too few to train on some and hold out "
                        f"{heldout_fraction:.0%} of them with comparisons; label more items or change "
                        f"{stage}.heldout_fraction")
    return train, test


def load_thumbs(path: str | Path, criterion: str, heldout_fraction: float, seed: int, tokenizer,
                stage: str = "kto") -> tuple[list[Thumb], list[Thumb]]:
    """(train, held-out) thumbs a stage learns from (KTO), split by item as load_comparisons splits (same seed and
    fraction: the same held-out items). Any file rlhfkit reads as thumbs: the contract's thumbs, TRL's unpaired
    preference format, or preference pairs (each pair: chosen up, rejected down). One criterion (`criterion`, or
    the file's only one), text the tokenizer can represent, and both kinds of thumb: KTO learns from the contrast
    of desirable and undesirable completions, so a file of only thumbs up (or only down) is refused. Errors name
    file, line and field; the pipeline calls this before anything runs."""
    data = read_data(path)
    try:
        records = convert_records(data.records, data.kind, "thumbs")
    except DataError as e:
        raise DataError(f"{path}: {e} ({format_origin(data)}); {stage} learns from thumbs up/down: give a file of "
                        "{prompt, completion, label} records (docs/data.md, 'Thumb record')") from None
    thumbs, _ = select_criterion(records, criterion, path, noun="thumbs")
    _both_labels(thumbs, path, "the file", stage)
    texts = [(f"item {t.item_id!r} field {field!r}", getattr(t, field)) for t in thumbs for field in ("prompt", "completion")]
    check_representable(tokenizer, texts, str(path), f"{stage} policy")
    train, test = split_by_item(thumbs, heldout_fraction, seed)
    if not train or not test:
        raise DataError(f"{path}: {len(thumbs)} thumbs are too few to hold out {heldout_fraction:.0%} of items; "
                        f"label more items or change {stage}.heldout_fraction")
    _both_labels(train, path, f"the training items ({stage}.heldout_fraction held out)", stage)
    return train, test


def _both_labels(thumbs: list[Thumb], path, where: str, stage: str) -> None:
    ups = sum(t.label for t in thumbs)
    if ups == 0 or ups == len(thumbs):
        kind = "up (label true)" if ups else "down (label false)"
        raise DataError(f"{path}: all {len(thumbs)} thumbs of {where} are {kind}; {stage} (KTO) learns from the "
                        "contrast of desirable and undesirable completions and cannot learn from one kind: add "
                        f"thumbs {'down' if ups else 'up'}")
