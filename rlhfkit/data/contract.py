"""The one data contract: comparison and ranking records (JSONL), shared by every producer and trainer.

Simulated labelers (`rlhfkit feedback`), the labeling web app's export and any imported preference data
all write these records; the reward-model trainer (and, later, DPO) read them. The schema is documented
in docs/data.md; `tests/test_contract.py` keeps the two in step.

Comparison record (one line of comparisons.jsonl), one strict preference:
    {"item_id": "digits-000017", "prompt": "4 5 9 1 =", "chosen": "2 6 7 8", "rejected": "6 2 7 8",
     "margin": null, "labeler_ids": ["sim-0", "sim-2"], "criterion": "overall"}

Ranking record (one line of rankings.jsonl), one labeler's (or the consensus') ranking of K completions:
    {"item_id": "digits-000017", "prompt": "4 5 9 1 =", "completions": ["6 2 7 8", "2 6 7 8", ...],
     "labeler_id": "sim-0", "ranking": [[1], [0, 3], [2]], "criterion": "overall"}
`ranking` lists tie groups, best first; together they must be a permutation of 0..K-1.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Iterator

from rlhfkit.errors import DataError

# Llama 2 (Touvron et al., 2023), Table 28, "small margin" variant: the labeler's stated strength of a
# preference becomes the margin m(r) subtracted inside the Bradley-Terry sigmoid.
STRENGTH_MARGINS: dict[str, float] = {
    "significantly": 1.0,
    "better": 2.0 / 3.0,
    "slightly": 1.0 / 3.0,
    "negligibly": 0.0,
}

Ranking = list[list[int]]


@dataclass(frozen=True)
class Comparison:
    """One strict preference: `chosen` was judged better than `rejected` as a reply to `prompt`."""

    item_id: str
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None  # strength of the preference (see STRENGTH_MARGINS); None = unknown
    labeler_ids: list[str] = field(default_factory=list)  # who supports this preference
    criterion: str = "overall"  # e.g. "helpfulness", "harmlessness"; one reward model per criterion


@dataclass(frozen=True)
class RankingRecord:
    """One labeler's ranking of K completions of one prompt (ties allowed)."""

    item_id: str
    prompt: str
    completions: list[str]
    labeler_id: str
    ranking: Ranking  # tie groups of completion indices, best first
    criterion: str = "overall"


# ----------------------------------------------------------------------------------------------------
# Rankings -> pairs


def validate_ranking(ranking: Any, k: int, where: str = "ranking") -> Ranking:
    """Check that `ranking` is a list of tie groups forming a permutation of 0..k-1; return it."""
    if not isinstance(ranking, list) or not all(isinstance(g, list) and g for g in ranking):
        raise DataError(f"{where}: must be a list of non-empty lists of completion indices (tie groups, best first)")
    flat = [i for g in ranking for i in g]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in flat):
        raise DataError(f"{where}: indices must be integers, got {flat!r}")
    if sorted(flat) != list(range(k)):
        raise DataError(
            f"{where}: {flat!r} is not a permutation of 0..{k - 1}; every completion must appear exactly once"
        )
    return ranking


def ranking_to_pairs(ranking: Ranking) -> list[tuple[int, int]]:
    """Every strict preference a ranking implies, as (better, worse) index pairs; ties give no pair.

    A ranking with tie groups of sizes n_1..n_g yields sum_{a<b} n_a * n_b pairs (InstructGPT, Ouyang et
    al. 2022, Sec. 3.5: all C(K, 2) comparisons of a K-way ranking when there are no ties).
    """
    return [(i, j) for a, b in combinations(range(len(ranking)), 2) for i in ranking[a] for j in ranking[b]]


def ranking_from_scores(scores: list[float]) -> Ranking:
    """Tie groups, best first, from per-completion scores (equal scores tie)."""
    order: dict[float, list[int]] = {}
    for i, s in enumerate(scores):
        order.setdefault(s, []).append(i)
    return [order[s] for s in sorted(order, reverse=True)]


# ----------------------------------------------------------------------------------------------------
# JSONL I/O with errors that name the file, line and field


def _require(obj: dict, key: str, types: type | tuple, where: str, optional: bool = False):
    if key not in obj:
        if optional:
            return None
        raise DataError(f"{where}: missing field '{key}'")
    value = obj[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise DataError(f"{where}: field '{key}' must be {_type_name(types)}, got a boolean")
    if not isinstance(value, types):
        raise DataError(f"{where}: field '{key}' must be {_type_name(types)}, got {type(value).__name__}")
    return value


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _decode_line(raw: bytes, where: str, first: bool) -> str:
    """One line of a JSONL file as text; anything but UTF-8 (UTF-16, a binary file) says how to fix it."""
    if first and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{where}: not UTF-8 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    if bytes(1) in raw:
        raise DataError(f"{where}: not UTF-8 text (it holds NUL bytes: a binary file, or UTF-16 without a "
                        "byte-order mark); save it as UTF-8")
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")  # a UTF-8 byte-order mark is harmless
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "save it as UTF-8") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (location, object) for each non-blank line; location reads 'file:line'."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as f:  # bytes, decoded per line, so an encoding error can name its line
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = _decode_line(raw, where, first=lineno == 1)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
            yield where, obj


def parse_comparison(obj: dict, where: str) -> Comparison:
    labeler_ids = _require(obj, "labeler_ids", list, where, optional=True) or []
    if not all(isinstance(x, str) for x in labeler_ids):
        raise DataError(f"{where}: field 'labeler_ids' must be a list of strings")
    margin = _require(obj, "margin", (int, float), where, optional=True)
    comparison = Comparison(
        item_id=str(_require(obj, "item_id", (str, int), where)),
        prompt=_require(obj, "prompt", str, where),
        chosen=_require(obj, "chosen", str, where),
        rejected=_require(obj, "rejected", str, where),
        margin=None if margin is None else float(margin),
        labeler_ids=list(labeler_ids),
        criterion=_require(obj, "criterion", str, where, optional=True) or "overall",
    )
    if comparison.chosen == comparison.rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a comparison needs two different completions")
    return comparison


def parse_ranking(obj: dict, where: str) -> RankingRecord:
    completions = _require(obj, "completions", list, where)
    if len(completions) < 2 or not all(isinstance(c, str) for c in completions):
        raise DataError(f"{where}: field 'completions' must be a list of at least 2 strings")
    return RankingRecord(
        item_id=str(_require(obj, "item_id", (str, int), where)),
        prompt=_require(obj, "prompt", str, where),
        completions=completions,
        labeler_id=str(_require(obj, "labeler_id", (str, int), where)),
        ranking=validate_ranking(_require(obj, "ranking", list, where), len(completions), f"{where}: field 'ranking'"),
        criterion=_require(obj, "criterion", str, where, optional=True) or "overall",
    )


def read_comparisons(path: str | Path) -> list[Comparison]:
    records = [parse_comparison(obj, where) for where, obj in iter_jsonl(path)]
    if not records:
        raise DataError(f"{path}: contains no comparisons")
    return records


def read_rankings(path: str | Path) -> list[RankingRecord]:
    return [parse_ranking(obj, where) for where, obj in iter_jsonl(path)]


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write records (dataclasses or dicts) atomically: a killed writer never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(asdict(r) if hasattr(r, "__dataclass_fields__") else r, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
