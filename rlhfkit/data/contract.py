"""The one data contract: comparison and ranking records (JSONL), shared by every producer and trainer.

Simulated labelers (`rlhfkit feedback`), the labeling web app's export and any imported preference data
all write these records; the reward-model trainer (and, later, DPO) read them. The schema is documented
in docs/data.md; `tests/test_contract.py` keeps the two in step.

Comparison record (one line of comparisons.jsonl), one strict preference:
    {"item_id": "digits-000017", "prompt": "4 5 9 1 =", "chosen": "2 6 7 8", "rejected": "6 2 7 8",
     "margin": null, "labeler_ids": ["sim-0", "sim-2"], "criterion": "overall"}

Ranking record (one line of rankings.jsonl), one labeler's (or the consensus') ranking of K completions:
    {"item_id": "digits-000017", "prompt": "4 5 9 1 =", "completions": ["6 2 7 8", "2 6 7 8", ...],
     "labeler_id": "sim-0", "ranking": [[1], [0, 3], [2]], "criterion": "overall",
     "strengths": ["significantly", "slightly"]}
`ranking` lists tie groups, best first; together they must be a permutation of 0..K-1. `strengths` (optional)
says how much better each tie group is than the next (STRENGTH_MARGINS' labels).

Demonstration record (SFT) and prompt record (feedback, online RL, evaluation); item_id optional:
    {"item_id": "p2842d6a87166", "prompt": "Q: What is 2+2?\nA:", "completion": " 4"}
    {"prompt": "Tell me a joke."}

Text or conversation: every `prompt`, `chosen`, `rejected`, `completion` and each of `completions` is either
a string or a conversation, a list of {"role", "content"} messages (the shape of Hugging Face chat templates
and of TRL's "conversational" datasets). A record is all text or all conversation: with a conversation
prompt, each reply is the assistant message(s) that answer it, beginning with an assistant message
(align_replies). Other formats (TRL, HH, UltraFeedback, ...) become these records in rlhfkit.data.formats.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Iterator

from rlhfkit.core.errors import DataError

# Llama 2 (Touvron et al., 2023), Table 28, "small margin" variant: the labeler's stated strength of a
# preference becomes the margin m(r) subtracted inside the Bradley-Terry sigmoid.
STRENGTH_MARGINS: dict[str, float] = {
    "significantly": 1.0,
    "better": 2.0 / 3.0,
    "slightly": 1.0 / 3.0,
    "negligibly": 0.0,
}

Ranking = list[list[int]]
Message = dict[str, Any]  # {"role": str, "content": str}; other keys (e.g. "name") are kept as given
Text = str | list[Message]  # plain text, or a conversation


@dataclass(frozen=True)
class Comparison:
    """One strict preference: `chosen` was judged better than `rejected` as a reply to `prompt`."""

    item_id: str
    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None  # strength of the preference (see STRENGTH_MARGINS); None = unknown
    labeler_ids: list[str] = field(default_factory=list)  # who supports this preference
    criterion: str = "overall"  # e.g. "helpfulness", "harmlessness"; one reward model per criterion
    # An AI labeler's probability that `chosen` is better, in [0.5, 1] (docs/rlaif.md); None = a hard label. The
    # reward model trains on it by cross-entropy (reward.soft_labels: distilled RLAIF, Lee et al. 2023).
    soft_label: float | None = None
    rationale: str | None = None  # the AI labeler's chain of thought (both orders with position swap); None = none
    principle: str | None = None  # the constitution's principle the AI labeler was asked under (RL-CAI); None = none


# Comparison fields written only when set (records without them stay as before: the fields are optional to read).
OPTIONAL_WHEN_NONE = ("soft_label", "rationale", "principle")


@dataclass(frozen=True)
class RankingRecord:
    """One labeler's ranking of K completions of one prompt (ties allowed)."""

    item_id: str
    prompt: Text
    completions: list[Text]
    labeler_id: str
    ranking: Ranking  # tie groups of completion indices, best first
    criterion: str = "overall"
    strengths: list[str] | None = None  # per step between adjacent tie groups (STRENGTH_MARGINS); None = not asked


@dataclass(frozen=True)
class Thumb:
    """One binary judgement of one completion: thumbs up (`label` True, desirable) or down (KTO's unpaired
    feedback, Ethayarajh et al. 2024; TRL's "unpaired preference" records: prompt, completion, label)."""

    item_id: str
    prompt: Text
    completion: Text
    label: bool  # True = thumbs up (desirable), False = thumbs down (undesirable)
    labeler_id: str = ""  # who gave it; "" = unknown (imported data)
    criterion: str = "overall"


@dataclass(frozen=True)
class Demonstration:
    """One SFT example: the loss goes on `completion` only; in a conversation, on its assistant messages."""

    item_id: str
    prompt: Text
    completion: Text


@dataclass(frozen=True)
class PromptRecord:
    """One prompt to sample from (feedback, online RL, evaluation). `fields`: the record's other fields as they were
    (e.g. a reference answer), given to Python reward functions as keyword arguments (TRL passes a dataset's other
    columns the same way; rlhfkit/spine/reward_functions.py); written back at the record's top level."""

    item_id: str
    prompt: Text
    fields: dict = field(default_factory=dict, compare=False, hash=False)


# A prompt record's own fields; every other field of its row is kept in PromptRecord.fields
PROMPT_RECORD_KEYS = frozenset({"prompt", "item_id"})


def prompt_item_id(prompt: Text) -> str:
    """The item id of a record that came without one: a hash of its prompt, so every record with the same
    prompt is the same item (a held-out split by item never puts one prompt on both sides)."""
    key = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
    return "p" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------
# Text or conversation


def as_conversation(prompt: Text) -> list[Message]:
    """A text prompt as a one-message conversation (the user's turn); a conversation as is."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def parse_text(value: Any, key: str, where: str) -> Text:
    """A string, or a non-empty list of messages each with a string `role` and `content`. Keys that are
    null are dropped: Parquet and `datasets` pad a message with every key any message in the column has."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else type(value).__name__
        raise DataError(f"{where}: field '{key}' must be a string or a list of {{role, content}} messages, got {got}")
    messages = []
    for n, m in enumerate(value):
        at = f"{where}: field '{key}', message {n}"
        if not isinstance(m, dict):
            raise DataError(f"{at}: must be an object {{\"role\": ..., \"content\": ...}}, got {type(m).__name__}")
        for name in ("role", "content"):
            if not isinstance(m.get(name), str):
                got = "missing" if m.get(name) is None else f"a {type(m[name]).__name__}"
                raise DataError(f"{at}: '{name}' must be a string, got {got}")
        messages.append({"role": m["role"], "content": m["content"],
                         **{k: v for k, v in m.items() if k not in ("role", "content") and v is not None}})
    return messages


def align_replies(prompt: Text, replies: list[Text], keys: list[str], where: str) -> tuple[Text, list[Text]]:
    """Put a prompt and its replies in one form: all text, or a conversation and assistant replies.

    A text reply to a conversation becomes one assistant message; a text prompt with conversation replies
    becomes a user message; a conversation reply that repeats the prompt's messages first (as
    UltraFeedback-binarized does) loses them. Idempotent, so records read back exactly as written.
    """
    if isinstance(prompt, str) and all(isinstance(r, str) for r in replies):
        return prompt, replies
    prompt = as_conversation(prompt)
    aligned = []
    for reply, key in zip(replies, keys, strict=True):
        if isinstance(reply, str):
            reply = [{"role": "assistant", "content": reply}]
        elif len(reply) > len(prompt) and reply[: len(prompt)] == prompt:
            reply = reply[len(prompt):]
        if reply[0]["role"] != "assistant":
            raise DataError(f"{where}: field '{key}' must be the assistant's reply, a list of messages starting with "
                            f"role 'assistant' (got '{reply[0]['role']}'); a reply that repeats the prompt must "
                            "repeat all of its messages")
        aligned.append(reply)
    return prompt, aligned


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


def pair_margin(ranking: Ranking, strengths: list[str], better: int, worse: int,
                table: dict[str, float] = STRENGTH_MARGINS) -> float:
    """The margin a labeler's ranking with strengths gives the preference better > worse: that of the strongest
    step between their tie groups (strengths[g] = how much better group g is than group g + 1), mapped by
    `table`. The labeling app's export and the simulated labelers both use this rule."""
    group = {i: g for g, members in enumerate(ranking) for i in members}
    return max(table[s] for s in strengths[group[better] : group[worse]])


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
            obj = parse_jsonl_line(raw, where, first=lineno == 1)
            if obj is not None:
                yield where, obj


def parse_jsonl_line(raw: bytes, where: str, first: bool) -> dict | None:
    """One line of a JSONL file as an object; None for a blank line."""
    line = _decode_line(raw, where, first)
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_comparison(obj: dict, where: str, item_id_required: bool = True) -> Comparison:
    labeler_ids = _require(obj, "labeler_ids", list, where, optional=True) or []
    if not all(isinstance(x, str) for x in labeler_ids):
        raise DataError(f"{where}: field 'labeler_ids' must be a list of strings")
    margin = _require(obj, "margin", (int, float), where, optional=True)
    soft_label = _require(obj, "soft_label", (int, float), where, optional=True)
    if soft_label is not None and not 0.5 <= soft_label <= 1.0:
        raise DataError(f"{where}: field 'soft_label' = {soft_label!r} must be in [0.5, 1], the probability that "
                        "'chosen' is better (swap chosen and rejected if the labeler preferred the other)")
    rationale = _require(obj, "rationale", str, where, optional=True)
    principle = _require(obj, "principle", str, where, optional=True)
    texts = {key: parse_text(_require(obj, key, (str, list), where), key, where) for key in ("prompt", "chosen", "rejected")}
    prompt, (chosen, rejected) = align_replies(texts["prompt"], [texts["chosen"], texts["rejected"]],
                                               ["chosen", "rejected"], where)
    comparison = Comparison(
        item_id=str(_require(obj, "item_id", (str, int), where)) if item_id_required else _item_id(obj, prompt, where),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        margin=None if margin is None else float(margin),
        labeler_ids=list(labeler_ids),
        criterion=_require(obj, "criterion", str, where, optional=True) or "overall",
        soft_label=None if soft_label is None else float(soft_label),
        rationale=rationale,
        principle=principle,
    )
    if comparison.chosen == comparison.rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a comparison needs two different completions")
    return comparison


def parse_ranking(obj: dict, where: str, item_id_required: bool = True) -> RankingRecord:
    completions = _require(obj, "completions", list, where)
    if len(completions) < 2:
        raise DataError(f"{where}: field 'completions' must list at least 2 completions, got {len(completions)}")
    keys = [f"completions[{i}]" for i in range(len(completions))]
    prompt, completions = align_replies(parse_text(_require(obj, "prompt", (str, list), where), "prompt", where),
                                        [parse_text(c, k, where) for c, k in zip(completions, keys)], keys, where)
    ranking = validate_ranking(_require(obj, "ranking", list, where), len(completions), f"{where}: field 'ranking'")
    strengths = _require(obj, "strengths", list, where, optional=True)
    if strengths is not None and (len(strengths) != len(ranking) - 1
                                  or not all(isinstance(s, str) and s in STRENGTH_MARGINS for s in strengths)):
        raise DataError(f"{where}: field 'strengths' must list {len(ranking) - 1} strength(s), one per step between "
                        f"adjacent tie groups of 'ranking', each one of {list(STRENGTH_MARGINS)}; got {strengths!r}")
    return RankingRecord(
        item_id=str(_require(obj, "item_id", (str, int), where)) if item_id_required else _item_id(obj, prompt, where),
        prompt=prompt,
        completions=completions,
        labeler_id=str(_require(obj, "labeler_id", (str, int), where)),
        ranking=ranking,
        criterion=_require(obj, "criterion", str, where, optional=True) or "overall",
        strengths=strengths,
    )


def parse_thumb(obj: dict, where: str) -> Thumb:
    """A thumbs record; `label` must be a JSON boolean (true = up), not a string or a number, so that "false" or
    0.3 is never read as a thumbs up."""
    if "label" in obj and not isinstance(obj["label"], bool):
        raise DataError(f"{where}: field 'label' must be a JSON boolean, true (thumbs up) or false (thumbs down); "
                        f"got {type(obj['label']).__name__} {obj['label']!r}")
    label = _require(obj, "label", bool, where)  # absent: "missing field 'label'"
    prompt = parse_text(_require(obj, "prompt", (str, list), where), "prompt", where)
    prompt, (completion,) = align_replies(
        prompt, [parse_text(_require(obj, "completion", (str, list), where), "completion", where)], ["completion"], where)
    labeler_id = _require(obj, "labeler_id", (str, int), where, optional=True)
    return Thumb(item_id=_item_id(obj, prompt, where), prompt=prompt, completion=completion, label=label,
                 labeler_id="" if labeler_id is None else str(labeler_id),
                 criterion=_require(obj, "criterion", str, where, optional=True) or "overall")


def read_thumbs(path: str | Path) -> list[Thumb]:
    records = [parse_thumb(obj, where) for where, obj in iter_jsonl(path)]
    if not records:
        raise DataError(f"{path}: contains no thumbs records")
    return records


def parse_demonstration(obj: dict, where: str) -> Demonstration:
    prompt = parse_text(_require(obj, "prompt", (str, list), where), "prompt", where)
    prompt, (completion,) = align_replies(
        prompt, [parse_text(_require(obj, "completion", (str, list), where), "completion", where)], ["completion"], where)
    return Demonstration(item_id=_item_id(obj, prompt, where), prompt=prompt, completion=completion)


def parse_prompt(obj: dict, where: str) -> PromptRecord:
    prompt = parse_text(_require(obj, "prompt", (str, list), where), "prompt", where)
    fields = {k: v for k, v in obj.items() if k not in PROMPT_RECORD_KEYS}
    return PromptRecord(item_id=_item_id(obj, prompt, where), prompt=prompt, fields=fields)


def _item_id(obj: dict, prompt: Text, where: str) -> str:
    """`item_id` as given, else derived from the prompt (prompt_item_id)."""
    given = _require(obj, "item_id", (str, int), where, optional=True)
    return prompt_item_id(prompt) if given is None else str(given)


def read_comparisons(path: str | Path) -> list[Comparison]:
    records = [parse_comparison(obj, where) for where, obj in iter_jsonl(path)]
    if not records:
        raise DataError(f"{path}: contains no comparisons")
    return records


def read_rankings(path: str | Path) -> list[RankingRecord]:
    """Every ranking of the file. The rankings of one item (by several labelers, or by criterion) must list the
    same prompt and completions in the same order: their indices refer to them."""
    records, first = [], {}
    for where, obj in iter_jsonl(path):
        record = parse_ranking(obj, where)
        check_same_item(record, where, first)
        records.append(record)
    if not records:
        raise DataError(f"{path}: contains no rankings")
    return records


def check_same_item(record: RankingRecord, where: str, first: dict[str, tuple[str, RankingRecord]]) -> None:
    """Refuse a ranking whose prompt or completions differ from those of its item's first ranking (`first`:
    item_id -> (location, record), filled as records are checked)."""
    seen = first.setdefault(record.item_id, (where, record))
    for name in ("prompt", "completions"):
        if getattr(record, name) != getattr(seen[1], name):
            raise DataError(f"{where}: field '{name}' differs from that of item {record.item_id!r} at {seen[0]}; "
                            "every ranking of one item must list the same prompt and completions, in the same order")


def record_kind(path: str | Path) -> str:
    """'rankings' when the file's first record has a ranking's fields ('completions' or 'ranking'), else
    'comparisons' (whose reader then names any missing field), so that a trainer given the other kind can say
    so instead of reporting a missing field."""
    for _, obj in iter_jsonl(path):
        return "rankings" if "ranking" in obj or "completions" in obj else "comparisons"
    raise DataError(f"{path}: contains no records")


def _as_row(record: Any) -> Any:
    """A record as one JSON object: a dataclass's fields, less those of OPTIONAL_WHEN_NONE that are None."""
    if not hasattr(record, "__dataclass_fields__"):
        return record
    row = {k: v for k, v in asdict(record).items() if not (v is None and k in OPTIONAL_WHEN_NONE)}
    if isinstance(record, PromptRecord):  # its other fields at the top level, as they were read
        row = {**row.pop("fields"), **row}
    return row


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write records (dataclasses or dicts) atomically: a killed writer never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(_as_row(r), ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
