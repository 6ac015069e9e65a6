"""Labelled texts for a text classifier (the toxicity classifier, rlhfkit/algorithms/classifier.py): one JSONL record
a line,

    {"text": "you are an idiot .", "label": "toxic"}
    {"text": "try a fan .", "label": 0}

`label` is a class index (0 or 1) or a class name of `names` (case-insensitive), e.g. "not toxic" / "toxic". Errors
name the file, the line and the field. Texts are split into training and held-out parts by the same hash rule as
every other split (rlhfkit.data.splits), keyed by the text, so a text repeated in the file is never on both sides.

Layer: data.
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.core.errors import DataError
from rlhfkit.data.contract import iter_jsonl
from rlhfkit.data.splits import is_heldout

# The toxicity classifier's classes, by index (rlhfkit/algorithms/classifier.py saves them as its id2label): the
# names a toxicity.data file and a reward source's `label` may use.
TOXICITY_LABELS = ("not toxic", "toxic")


def parse_label(value, names: tuple[str, ...], where: str) -> int:
    """A record's label as a class index: an index of `names`, or one of the names (case-insensitive)."""
    listed = ", ".join(f"{i} or {n!r}" for i, n in enumerate(names))
    if isinstance(value, str) and value.strip().lower() in names:
        return names.index(value.strip().lower())
    # a boolean is an int in Python, but "true" says nothing about which class it means
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    raise DataError(f"{where}: field 'label' must be {listed}, got {value!r}")


def read_labelled_texts(path: str | Path, names: tuple[str, ...]) -> list[tuple[str, int]]:
    """Every (text, class index) record of a JSONL file; each class of `names` must appear at least once."""
    out = []
    for where, obj in iter_jsonl(path):
        if "text" not in obj:
            raise DataError(f"{where}: missing field 'text' (each line is {{\"text\": ..., \"label\": ...}})")
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise DataError(f"{where}: field 'text' must be a non-empty string, got {obj['text']!r}")
        if "label" not in obj:
            raise DataError(f"{where}: missing field 'label' (each line is {{\"text\": ..., \"label\": ...}})")
        out.append((obj["text"], parse_label(obj["label"], names, where)))
    missing = [n for i, n in enumerate(names) if not any(label == i for _, label in out)]
    if missing:
        raise DataError(f"{path}: no record is labelled {' or '.join(map(repr, missing))}; a classifier needs examples "
                        "of every class")
    return out


def split_texts(examples: list[tuple[str, int]], heldout_fraction: float, seed: int):
    """(train, held-out) by a hash of each text (rlhfkit.data.splits.is_heldout)."""
    train = [e for e in examples if not is_heldout(e[0], heldout_fraction, seed)]
    heldout = [e for e in examples if is_heldout(e[0], heldout_fraction, seed)]
    return train, heldout
