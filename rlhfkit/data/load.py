"""Reading and writing data files in any format and container, into and out of the contract's records.

The entry points the pipeline calls (each takes a path, an optional format name from
rlhfkit.data.formats.FORMATS, detected from the first record's fields when None, and the split of a
DatasetDict directory):

    load_pairs(path)          -> list[Comparison]     preference pairs; a rankings file gives its pairs
    load_rankings(path)       -> list[RankingRecord]  rankings (contract, rated, UltraFeedback)
    load_thumb_records(path)  -> list[Thumb]          thumbs up/down (contract, TRL unpaired); pairs give theirs
    load_demonstrations(path) -> list[Demonstration]  SFT data (prompt/completion or whole conversations)
    load_prompts(path)        -> list[PromptRecord]   a prompt file, or the prompts of any other file
    save_records(path, records, fmt=None)             any records, in the container the path's suffix names
    convert_file / check_file                         `rlhfkit data convert` / `rlhfkit data check`

Every error names the file, the line (JSONL, .txt) or record (JSON, Parquet, `datasets`), the field, and
what the format expects.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.core.errors import DataError
from rlhfkit.data.consensus import majority_pairs
from rlhfkit.data.containers import container_of, read_rows, write_rows
from rlhfkit.data.contract import (
    Comparison,
    Demonstration,
    PromptRecord,
    RankingRecord,
    Thumb,
    check_same_item,
    pair_margin,
)
from rlhfkit.data.formats import CONTRACT_FORMAT, FORMATS, KINDS, detect_format, format_table, messages_prompt

KIND_OF = {Comparison: "pairs", RankingRecord: "rankings", Thumb: "thumbs", Demonstration: "sft", PromptRecord: "prompts"}


@dataclass
class DataFile:
    """A file's records in the contract, and how they were read."""

    path: Path
    format: str | None  # None only when no record could be read (check_file)
    detected_from: str | None  # the record the format was told from; None when it was given
    records: list
    rows: int = 0  # records in the file (a rated row may give several rankings: one per criterion)
    problems: list[str] = field(default_factory=list)  # unreadable records (tolerant reading only)

    @property
    def kind(self) -> str | None:
        return FORMATS[self.format].kind if self.format else None


def read_data(path: str | Path, fmt: str | None = None, split: str | None = None, *, as_kind: str | None = None,
              tolerant: bool = False) -> DataFile:
    """Every record of the file in its format's own kind. `as_kind="prompts"` reads a `messages` file's
    conversations up to the first reply (so a prompt file may hold conversations without replies).
    With `tolerant`, bad records are collected in `problems` instead of raised."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}'; the formats are:\n{format_table()}")
    if container_of(path) == "txt":
        if fmt not in (None, "txt", "prompts"):
            raise DataError(f"{path}: a .txt file holds prompts, one a line; it cannot be read as '{fmt}'")
        fmt = "txt"
    data, first = DataFile(path, fmt, None, []), {}
    for where, row in read_rows(path, split, tolerant=tolerant):
        data.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            if data.format is None:
                data.format, data.detected_from = detect_format(row, where), where
            for r in _parse(data, row, where, as_kind):
                if isinstance(r, RankingRecord):  # indices refer to the item's completions: one list per item
                    if row.get("item_id") is None:
                        r = _own_item(r, first)
                    check_same_item(r, where, first)
                data.records.append(r)
        except DataError as e:
            if not tolerant:
                raise
            data.problems.append(str(e))
    if data.rows == 0:
        raise DataError(f"{path}: holds no records")
    return data


def _own_item(r: RankingRecord, first: dict) -> RankingRecord:
    """A ranking whose item id was derived from its prompt, with `#2`, `#3`... added when an earlier ranking of
    that prompt lists other completions (UltraFeedback repeats some instructions): another item."""
    item_id, n = r.item_id, 1
    while item_id in first and (first[item_id][1].prompt, first[item_id][1].completions) != (r.prompt, r.completions):
        n += 1
        item_id = f"{r.item_id}#{n}"
    return r if n == 1 else dataclasses.replace(r, item_id=item_id)


def _parse(data: DataFile, row: dict, where: str, as_kind: str | None) -> list:
    f = FORMATS[data.format]
    try:
        if as_kind == "prompts" and f.name == "messages":
            return [messages_prompt(row, where)]
        return f.parse(row, where)
    except DataError as e:
        how = (f"format '{f.name}' told from the fields of {data.detected_from}; to read it as another, convert it "
               "with `rlhfkit data convert FILE OUT --from FORMAT` (fmt= from Python)"
               if data.detected_from else f"format '{f.name}'")
        raise DataError(f"{e}; expected {f.title} {f.fields} ({how})") from None


# ----------------------------------------------------------------------------------------------------
# Kinds: what the pipeline asks for


def load_pairs(path: str | Path, fmt: str | None = None, split: str | None = None) -> list[Comparison]:
    return _as_kind(read_data(path, fmt, split), "pairs")


def load_rankings(path: str | Path, fmt: str | None = None, split: str | None = None) -> list[RankingRecord]:
    return _as_kind(read_data(path, fmt, split), "rankings")


def load_thumb_records(path: str | Path, fmt: str | None = None, split: str | None = None) -> list[Thumb]:
    return _as_kind(read_data(path, fmt, split), "thumbs")


def load_demonstrations(path: str | Path, fmt: str | None = None, split: str | None = None) -> list[Demonstration]:
    return _as_kind(read_data(path, fmt, split), "sft")


def load_prompts(path: str | Path, fmt: str | None = None, split: str | None = None) -> list[PromptRecord]:
    """The prompts of a prompt file, in order; or the distinct prompts of any other file (pairs, rankings,
    demonstrations), in order of first appearance."""
    return _as_kind(read_data(path, fmt, split, as_kind="prompts"), "prompts")


def _as_kind(data: DataFile, kind: str) -> list:
    try:
        return convert_records(data.records, data.kind, kind)
    except DataError as e:
        raise DataError(f"{data.path}: {e} ({format_origin(data)})") from None


def format_origin(data: DataFile) -> str:
    """How the format was decided, for an error: 'format 'prompts', told from the fields of FILE:1'."""
    if data.detected_from is None:
        return f"format '{data.format}'"
    return f"format '{data.format}', told from the fields of {data.detected_from}; docs/data.md lists each format's fields"


def convert_records(records: list, have: str, want: str) -> list:
    """Records of kind `have` as kind `want`: rankings -> pairs (rankings_to_comparisons), pairs (or rankings)
    -> thumbs (comparisons_to_thumbs), anything -> prompts (distinct, in order); other conversions are refused
    (a pair is not a demonstration, thumbs are not pairs)."""
    if have == want:
        return records
    if have == "rankings" and want == "pairs":
        return rankings_to_comparisons(records)
    if have in ("pairs", "rankings") and want == "thumbs":
        return comparisons_to_thumbs(convert_records(records, have, "pairs"))
    if want == "prompts":
        seen, prompts = set(), []
        for r in records:
            key = (r.item_id, json.dumps(r.prompt, sort_keys=True))
            if key not in seen:
                seen.add(key)
                prompts.append(PromptRecord(r.item_id, r.prompt))
        return prompts
    raise DataError(f"holds {KINDS[have]}, not {KINDS[want]}")


def comparisons_to_thumbs(records: list[Comparison]) -> list[Thumb]:
    """Each comparison as two thumbs, chosen up and rejected down (TRL's `unpair_preference_dataset`): KTO on
    paired data. The labeler is the comparison's first supporter, when it names one."""
    out = []
    for c in records:
        labeler = c.labeler_ids[0] if c.labeler_ids else ""
        out += [Thumb(c.item_id, c.prompt, c.chosen, True, labeler, c.criterion),
                Thumb(c.item_id, c.prompt, c.rejected, False, labeler, c.criterion)]
    return out


def rankings_to_comparisons(records: list[RankingRecord]) -> list[Comparison]:
    """The comparisons of rankings, by the labeling app's export rule: per item and criterion, the pairs a
    majority of its labelers agree on (one labeler: every pair its ranking implies; ties give none), the
    supporters as labeler_ids, the margin the mean of their stated strengths (contract.pair_margin).
    Pairs of identical texts are dropped. The rankings of an item must list the same prompt and completions
    (as the readers check: contract.check_same_item)."""
    groups: dict[tuple[str, str], list[RankingRecord]] = {}
    for r in records:
        groups.setdefault((r.item_id, r.criterion), []).append(r)
    out = []
    for (item_id, criterion), recs in groups.items():
        first = recs[0]
        ranks, texts = [r.ranking for r in recs], first.completions
        for better, worse, support in majority_pairs(ranks):
            if texts[better] == texts[worse]:
                continue
            margins = [pair_margin(ranks[n], recs[n].strengths, better, worse) for n in support if recs[n].strengths]
            out.append(Comparison(item_id, first.prompt, texts[better], texts[worse],
                                  statistics.fmean(margins) if margins else None,
                                  [recs[n].labeler_id for n in support], criterion))
    return out


# ----------------------------------------------------------------------------------------------------
# Writing and converting


def save_records(path: str | Path, records: list, fmt: str | None = None) -> int:
    """Write records (one kind) in format `fmt` (default: the contract's format for their kind, or one
    prompt a line for .txt), converting rankings to pairs or anything to prompts when the format asks.
    Atomic; a record the format cannot hold exactly stops the write, naming it."""
    path = Path(path)
    if not records:
        raise DataError(f"{path}: no records to write")
    have = KIND_OF.get(type(records[0]))
    if have is None or any(type(r) is not type(records[0]) for r in records):
        raise DataError(f"{path}: records must all be one of {', '.join(t.__name__ for t in KIND_OF)}")
    txt = container_of(path) == "txt"
    fmt = fmt or ("txt" if txt else CONTRACT_FORMAT[have])
    if fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}'; the formats are:\n{format_table()}")
    if txt != (fmt == "txt"):
        raise DataError(f"{path}: the 'txt' format is a .txt file and a .txt file holds the 'txt' format")
    f = FORMATS[fmt]
    try:
        records = convert_records(records, have, f.kind)
    except DataError:
        raise DataError(f"{path}: {KINDS[have]} cannot be written as '{fmt}', which holds {KINDS[f.kind]}") from None
    rows = []
    for n, r in enumerate(records, start=1):
        try:
            rows.append(f.emit(r))
        except DataError as e:
            raise DataError(f"{path}: record {n} (item '{r.item_id}') cannot be written as '{fmt}': {e}") from None
    return write_rows(path, rows)


def convert_file(src: str | Path, dst: str | Path, from_fmt: str | None = None, to_fmt: str | None = None,
                 split: str | None = None) -> dict:
    """`rlhfkit data convert`: read `src`, write its records to `dst` (in `to_fmt`, default the contract)."""
    want = FORMATS[to_fmt].kind if to_fmt in FORMATS else "prompts" if container_of(dst) == "txt" else None
    data = read_data(src, from_fmt, split, as_kind=want)
    n = save_records(dst, data.records, to_fmt)
    return {"read": data.rows, "format": data.format, "kind": data.kind, "written": n,
            "to_format": to_fmt or ("txt" if container_of(dst) == "txt" else CONTRACT_FORMAT[data.kind])}


def check_file(path: str | Path, as_kind: str | None = None, fmt: str | None = None,
               split: str | None = None) -> dict:
    """`rlhfkit data check`: what the file holds, read tolerantly; `problems` lists every bad record."""
    if as_kind is not None and as_kind not in KINDS:
        raise DataError(f"unknown kind '{as_kind}'; choose one of {', '.join(KINDS)}")
    data = read_data(path, fmt, split, as_kind=as_kind, tolerant=True)
    report = {"path": str(path), "format": data.format, "detected_from": data.detected_from, "kind": data.kind,
              "rows": data.rows, "records": len(data.records), "problems": data.problems}
    records = data.records
    if as_kind is not None and data.kind is not None and as_kind != data.kind:
        try:
            records = convert_records(records, data.kind, as_kind)
        except DataError as e:
            report["problems"] = [f"{path}: {e} (format '{data.format}')", *data.problems]
            records = []
        report["as_kind"], report["as_records"] = as_kind, len(records)
    if records:
        report["items"] = len({r.item_id for r in records})
        report["conversations"] = sum(isinstance(r.prompt, list) for r in records)
        criteria = Counter(getattr(r, "criterion", None) for r in records)
        if None not in criteria:
            report["criteria"] = dict(criteria)
    return report
