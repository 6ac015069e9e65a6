"""Record formats: what people's files hold, and how each becomes (and is written back from) the contract.

Each format turns one row (a dict from rlhfkit.data.containers) into contract records and one record back
into a row. Reading, writing in the same format and reading again gives the same records; a record a
format cannot hold exactly (an implicit prompt that would not be found again, a conversation in `hh`) is
refused by name instead of written wrong. Writing another kind of record converts it as documented in
docs/data.md (a text demonstration written as `messages` becomes a user and an assistant turn).

    format         kind      a row
    comparisons    pairs     {item_id, prompt, chosen, rejected, margin?, labeler_ids?, criterion?}  (the contract)
    trl            pairs     {prompt, chosen, rejected}: TRL "standard" (text) or "conversational" (messages)
    trl-implicit   pairs     {chosen, rejected}: TRL without a prompt; the prompt is what the two share
    hh             pairs     {chosen, rejected}: Anthropic HH-RLHF transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."
    rankings       rankings  {item_id, prompt, completions, labeler_id, ranking, criterion?, strengths?}  (the contract)
    rated          rankings  {prompt, completions, ratings}: UltraFeedback-style; equal ratings tie
    ultrafeedback  rankings  {instruction, completions: [{response, overall_score}, ...]}: openbmb/UltraFeedback
    thumbs         thumbs    {item_id, prompt, completion, label, labeler_id?, criterion?}  (the contract)
    trl-unpaired   thumbs    {prompt, completion, label}: TRL "unpaired preference" (text or conversational)
    sft            sft       {prompt, completion}: demonstrations, text or conversational (TRL "prompt-completion")
    messages       sft       {messages}: whole conversations, the loss on the assistant turns
    prompts        prompts   {prompt}: text or a conversation
    txt            prompts   a .txt file, one text prompt a line

Every foreign format also reads the contract's optional fields when a row has them (item_id, margin,
labeler_ids, criterion, labeler_id) and writes them only where they differ from what reading would derive
(an item_id that is the prompt's hash is left out), so converted files stay in the shape their tools expect.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

from rlhfkit.core.errors import DataError
from rlhfkit.data.contract import (
    Comparison,
    Demonstration,
    PromptRecord,
    RankingRecord,
    Text,
    Thumb,
    _require,
    as_conversation,
    parse_comparison,
    parse_demonstration,
    parse_prompt,
    parse_ranking,
    parse_text,
    parse_thumb,
    prompt_item_id,
    ranking_from_scores,
)

# Anthropic HH-RLHF (Bai et al., 2022): each side of a pair is a whole transcript; the two differ only in the
# final assistant turn, so the prompt is the shared prefix up to and including the last "\n\nAssistant:".
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
RATED_LABELER = "ratings"  # labeler_id of rankings read from ratings (no person ranked them)


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # "pairs", "rankings", "thumbs", "sft" or "prompts": the records it holds
    title: str  # for messages: "TRL preference pairs"
    fields: str  # what a row looks like: "{prompt, chosen, rejected}"
    parse: Callable[[dict, str], list]  # row, location -> records
    emit: Callable[[Any], dict]  # record -> row; raises DataError when the record does not fit


# ----------------------------------------------------------------------------------------------------
# Implicit prompts: the prompt is what chosen and rejected share


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _distinct(chosen: Text, rejected: Text, where: str) -> None:
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a comparison needs two different completions")


def split_hh(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two HH transcripts: the prompt ends with the last
    "\\n\\nAssistant:" the two share; each reply is the rest (with its leading space)."""
    _distinct(chosen, rejected, where)
    cut = chosen.rfind(HH_ASSISTANT, 0, _common_prefix(chosen, rejected))  # the marker wholly inside the shared part
    if cut < 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no '\\n\\nAssistant:' turn; an HH pair is two "
                        "transcripts that agree up to the assistant turn being compared")
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def split_shared_text(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two texts without a prompt: the shared prefix, cut back to the
    whitespace before the word where they part (so a reply begins with its space, as TRL cuts)."""
    _distinct(chosen, rejected, where)
    shared = chosen[: _common_prefix(chosen, rejected)]
    m = re.search(r"\s+\S*\Z", shared)  # the last run of whitespace in the shared part
    if not m or m.start() == 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no leading text to be the prompt; give a 'prompt' field")
    return chosen[: m.start()], chosen[m.start():], rejected[m.start():]


def split_shared_messages(chosen: list, rejected: list, where: str) -> tuple[list, list, list]:
    """(prompt, chosen reply, rejected reply) of two conversations without a prompt: the shared leading
    messages, up to the assistant message where the replies begin (at or before the first difference)."""
    _distinct(chosen, rejected, where)
    j = _common_prefix(chosen, rejected)
    while j > 0 and not (j < min(len(chosen), len(rejected)) and chosen[j]["role"] == rejected[j]["role"] == "assistant"):
        j -= 1
    if j == 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no messages before an assistant reply; "
                        "give a 'prompt' field")
    return chosen[:j], chosen[j:], rejected[j:]


# ----------------------------------------------------------------------------------------------------
# Rows -> records


def _extras(record, derived_labeler: str | None = None) -> dict:
    """The contract fields a foreign row carries only when they differ from what reading would derive."""
    out = {}
    if record.item_id != prompt_item_id(record.prompt):
        out["item_id"] = record.item_id
    if getattr(record, "margin", None) is not None:
        out["margin"] = record.margin
    if getattr(record, "labeler_ids", None):
        out["labeler_ids"] = record.labeler_ids
    if derived_labeler is not None and record.labeler_id != derived_labeler:
        out["labeler_id"] = record.labeler_id
    if getattr(record, "criterion", "overall") != "overall":
        out["criterion"] = record.criterion
    return out


def _parse_trl(row: dict, where: str) -> list[Comparison]:
    return [parse_comparison(row, where, item_id_required=False)]


def _parse_implicit(row: dict, where: str) -> list[Comparison]:
    chosen, rejected = (parse_text(_require(row, k, (str, list), where), k, where) for k in ("chosen", "rejected"))
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen, rejected = split_shared_text(chosen, rejected, where)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = split_shared_messages(chosen, rejected, where)
    else:
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be text or both be conversations")
    return [parse_comparison({**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}, where, item_id_required=False)]


def _parse_hh(row: dict, where: str) -> list[Comparison]:
    chosen, rejected = (_require(row, k, str, where) for k in ("chosen", "rejected"))
    prompt, chosen, rejected = split_hh(chosen, rejected, where)
    return [parse_comparison({**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}, where, item_id_required=False)]


def _ratings(value: Any, k: int, where: str, key: str) -> list[float]:
    if not isinstance(value, list) or len(value) != k or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        raise DataError(f"{where}: field '{key}' must list {k} numbers, one per completion; got {value!r}")
    return value


def _parse_rated(row: dict, where: str) -> list[RankingRecord]:
    """One ranking per criterion: `ratings` is a list (criterion `criterion`, default overall) or an object
    {criterion: list}. Equal ratings are tied (no pair between them)."""
    k = len(_require(row, "completions", list, where))
    ratings = _require(row, "ratings", (list, dict), where)
    if isinstance(ratings, list):
        ratings = {_require(row, "criterion", str, where, optional=True) or "overall": ratings}
        keys = {c: "ratings" for c in ratings}
    elif ratings:
        keys = {c: f"ratings.{c}" for c in ratings}
    else:
        raise DataError(f"{where}: field 'ratings' is an empty object; give a list of ratings, or one per criterion")
    labeler_id = row.get("labeler_id") or RATED_LABELER
    return [parse_ranking({**row, "criterion": c, "labeler_id": labeler_id,
                           "ranking": ranking_from_scores(_ratings(r, k, where, keys[c]))}, where, item_id_required=False)
            for c, r in ratings.items()]


# The four aspects UltraFeedback's annotators rated (1-5), whose mean is each completion's "fine-grained" score.
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def _finite_score(c: dict, key: str, at: str) -> float:
    value = _require(c, key, (int, float), at)
    if not math.isfinite(value):  # a NaN would otherwise rank best (every comparison with it is False)
        raise DataError(f"{at}: field '{key}' is {value}, not a finite number; fix or drop this completion's record")
    return float(value)


def _fine_grained(c: dict, at: str) -> float:
    """The mean of the four annotation ratings (what the `ultrafeedback_binarized` recipe ranks by), from
    `annotations.<aspect>.Rating`, else the record's own `fine-grained_score`."""
    annotations = c.get("annotations")
    if isinstance(annotations, dict) and all(isinstance(annotations.get(a), dict) for a in ULTRAFEEDBACK_ASPECTS):
        ratings = []
        for aspect in ULTRAFEEDBACK_ASPECTS:
            raw = annotations[aspect].get("Rating")
            try:
                rating = float(raw)
            except (TypeError, ValueError):
                raise DataError(f"{at}: annotations.{aspect}.Rating = {raw!r} is not a number (UltraFeedback rates "
                                "1 to 5; 'N/A' marks a missing rating): fix or drop this record") from None
            if not math.isfinite(rating):
                raise DataError(f"{at}: annotations.{aspect}.Rating is {rating}, not a finite number")
            ratings.append(rating)
        return sum(ratings) / len(ratings)
    if "fine-grained_score" in c:
        return _finite_score(c, "fine-grained_score", at)
    raise DataError(f"{at}: no fine-grained ratings (annotations.{{{', '.join(ULTRAFEEDBACK_ASPECTS)}}}.Rating, or "
                    "fine-grained_score); read it as 'ultrafeedback' to rank by overall_score")


def _ultrafeedback_parser(score):
    """A parser of openbmb/UltraFeedback records that ranks each record's completions by score(completion, where)."""
    def parse(row: dict, where: str) -> list[RankingRecord]:
        completions = _require(row, "completions", list, where)
        responses, scores = [], []
        for i, c in enumerate(completions):
            at = f"{where}: completions[{i}]"
            if not isinstance(c, dict):
                raise DataError(f"{at}: must be an object {{response, overall_score}}, got {type(c).__name__}")
            responses.append(_require(c, "response", str, at))
            scores.append(score(c, at))
        return [parse_ranking({**row, "prompt": _require(row, "instruction", str, where), "completions": responses,
                               "labeler_id": row.get("labeler_id") or RATED_LABELER,
                               "ranking": ranking_from_scores(scores)}, where, item_id_required=False)]

    return parse


_parse_ultrafeedback = _ultrafeedback_parser(lambda c, at: _finite_score(c, "overall_score", at))
_parse_ultrafeedback_fine = _ultrafeedback_parser(_fine_grained)


def _parse_messages(row: dict, where: str) -> list[Demonstration]:
    """A whole conversation: the prompt is everything before the first assistant turn, the completion the
    rest (the SFT loss then goes on every assistant message of it, not on the user turns between)."""
    messages = _require(row, "messages", list, where)
    messages = parse_text(messages, "messages", where)
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        raise DataError(f"{where}: field 'messages' has no assistant message, so nothing to learn "
                        "(a conversation without replies belongs in a prompt file)")
    if first == 0:
        raise DataError(f"{where}: field 'messages' begins with an assistant message; give the turn it answers first")
    return [parse_demonstration({**row, "prompt": messages[:first], "completion": messages[first:]}, where)]


def messages_prompt(row: dict, where: str) -> PromptRecord:
    """A prompt from a `messages` row: the messages before the first assistant turn (all of them when none)."""
    messages = parse_text(_require(row, "messages", list, where), "messages", where)
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    if first == 0:
        raise DataError(f"{where}: field 'messages' begins with an assistant message; give the turn it answers first")
    return parse_prompt({**row, "prompt": messages[:first]}, where)


def _parse_txt(row: dict, where: str) -> list[PromptRecord]:
    return [parse_prompt(row, where)]


# ----------------------------------------------------------------------------------------------------
# Records -> rows


def _emit_trl(c: Comparison) -> dict:
    return {"prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected, **_extras(c)}


def _emit_implicit(c: Comparison) -> dict:
    row = {"chosen": c.prompt + c.chosen, "rejected": c.prompt + c.rejected, **_extras(c)}
    if not _splits_back(split_shared_text if isinstance(c.prompt, str) else split_shared_messages, row, c.prompt):
        raise DataError("chosen and rejected begin alike, so the prompt would not be found again without a "
                        "'prompt' field; write the 'trl' format instead")
    return row


def _splits_back(split, row: dict, prompt: Text) -> bool:
    """Whether reading the written row finds the same prompt again."""
    try:
        return split(row["chosen"], row["rejected"], "")[0] == prompt
    except DataError:
        return False


def _emit_hh(c: Comparison) -> dict:
    if not (isinstance(c.prompt, str) and c.prompt.endswith(HH_ASSISTANT)):
        raise DataError("an HH record's prompt must be a transcript ending with '\\n\\nAssistant:'; "
                        "write the 'trl' format instead")
    row = {"chosen": c.prompt + c.chosen, "rejected": c.prompt + c.rejected, **_extras(c)}
    if not _splits_back(split_hh, row, c.prompt):
        raise DataError("a reply repeats the turn marker '\\n\\nAssistant:' where the two replies agree, so the "
                        "prompt would not be found again; write the 'trl' format instead")
    return row


def _rank_ratings(r: RankingRecord) -> list[int]:
    """Ratings that give back the ranking: the best tie group the highest (ratings are not kept in rankings)."""
    if r.strengths is not None:
        raise DataError("a ranking with 'strengths' cannot be written as ratings; write the 'rankings' format instead")
    rating = {i: len(r.ranking) - g for g, group in enumerate(r.ranking) for i in group}
    return [rating[i] for i in range(len(r.completions))]


def _emit_rated(r: RankingRecord) -> dict:
    return {"prompt": r.prompt, "completions": r.completions, "ratings": _rank_ratings(r), **_extras(r, RATED_LABELER)}


def _emit_ultrafeedback(r: RankingRecord) -> dict:
    if not isinstance(r.prompt, str):
        raise DataError("UltraFeedback holds text prompts; write the 'rated' format for conversations")
    return {"instruction": r.prompt, **_extras(r, RATED_LABELER),
            "completions": [{"response": c, "overall_score": s} for c, s in zip(r.completions, _rank_ratings(r))]}


def _emit_unpaired(t: Thumb) -> dict:
    return {"prompt": t.prompt, "completion": t.completion, "label": t.label, **_extras(t, "")}


def _emit_sft(d: Demonstration) -> dict:
    return {"prompt": d.prompt, "completion": d.completion, **_extras(d)}


def _emit_messages(d: Demonstration) -> dict:
    """A text demonstration becomes one user and one assistant message."""
    prompt = as_conversation(d.prompt)
    completion = [{"role": "assistant", "content": d.completion}] if isinstance(d.completion, str) else d.completion
    extras = _extras(d)
    if isinstance(d.prompt, str) and d.item_id == prompt_item_id(d.prompt):
        extras.pop("item_id", None)  # the derived id of the text prompt: let the conversation derive its own
    return {"messages": prompt + completion, **extras}


def _emit_prompt(p: PromptRecord) -> dict:
    return {**p.fields, "prompt": p.prompt, **_extras(p)}


def _emit_txt(p: PromptRecord) -> dict:
    if not isinstance(p.prompt, str):
        raise DataError("a .txt prompt file holds text prompts, one a line; write .jsonl for conversations")
    return {"prompt": p.prompt}  # item ids are not kept in a .txt file


# ----------------------------------------------------------------------------------------------------
# The registry, and telling the format from a row's fields

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("comparisons", "pairs", "rlhfkit comparisons", "{item_id, prompt, chosen, rejected, margin?, labeler_ids?, criterion?}",
           lambda row, where: [parse_comparison(row, where)], asdict),
    Format("trl", "pairs", "TRL preference pairs (standard or conversational)", "{prompt, chosen, rejected}",
           _parse_trl, _emit_trl),
    Format("trl-implicit", "pairs", "TRL preference pairs with an implicit prompt", "{chosen, rejected}",
           _parse_implicit, _emit_implicit),
    Format("hh", "pairs", "Anthropic HH transcripts", "{chosen, rejected} holding '\\n\\nHuman: ... \\n\\nAssistant: ...'",
           _parse_hh, _emit_hh),
    Format("rankings", "rankings", "rlhfkit rankings", "{item_id, prompt, completions, labeler_id, ranking, criterion?, strengths?}",
           lambda row, where: [parse_ranking(row, where)], asdict),
    Format("rated", "rankings", "rated completions (UltraFeedback-style)", "{prompt, completions, ratings}",
           _parse_rated, _emit_rated),
    Format("ultrafeedback", "rankings", "openbmb/UltraFeedback records", "{instruction, completions: [{response, overall_score}]}",
           _parse_ultrafeedback, _emit_ultrafeedback),
    # Not detected from the fields (they are the same records): named with --from / fmt=.
    Format("ultrafeedback-fine", "rankings", "openbmb/UltraFeedback ranked by the mean of its 4 ratings",
           "{instruction, completions: [{response, annotations}]}", _parse_ultrafeedback_fine, _emit_ultrafeedback),
    Format("thumbs", "thumbs", "rlhfkit thumbs", "{item_id, prompt, completion, label, labeler_id?, criterion?}",
           lambda row, where: [parse_thumb(row, where)], asdict),
    Format("trl-unpaired", "thumbs", "TRL unpaired preference (thumbs up/down; standard or conversational)",
           "{prompt, completion, label}", lambda row, where: [parse_thumb(row, where)], _emit_unpaired),
    Format("sft", "sft", "SFT demonstrations (prompt-completion)", "{prompt, completion}",
           lambda row, where: [parse_demonstration(row, where)], _emit_sft),
    Format("messages", "sft", "SFT conversations", "{messages: [{role, content}, ...]}", _parse_messages, _emit_messages),
    Format("prompts", "prompts", "prompts", "{prompt}", lambda row, where: [parse_prompt(row, where)], _emit_prompt),
    Format("txt", "prompts", "text prompts", "one prompt a line", _parse_txt, _emit_txt),
)}
KINDS = {"pairs": "preference pairs", "rankings": "rankings", "thumbs": "thumbs (binary feedback)",
         "sft": "SFT demonstrations", "prompts": "prompts"}
CONTRACT_FORMAT = {"pairs": "comparisons", "rankings": "rankings", "thumbs": "thumbs", "sft": "sft", "prompts": "prompts"}


def format_table() -> str:
    return "\n".join(f"  {f.name:<18} {f.kind:<9} {f.fields}" for f in FORMATS.values())


def detect_format(row: dict, where: str) -> str:
    """The format a row's fields say (null fields count as absent, as Parquet pads missing ones with null)."""
    keys = {k for k, v in row.items() if v is not None}
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys:
            return "comparisons" if "item_id" in keys else "trl"
        chosen = row["chosen"]
        return "hh" if isinstance(chosen, str) and HH_HUMAN in chosen and HH_ASSISTANT in chosen else "trl-implicit"
    if "completions" in keys:
        for field, name in (("ranking", "rankings"), ("ratings", "rated"), ("instruction", "ultrafeedback")):
            if field in keys:
                return name
    if "messages" in keys:
        return "messages"
    if "label" in keys and ("completion" in keys or "prompt" in keys):  # a thumb (it names a missing completion)
        return "thumbs" if "item_id" in keys else "trl-unpaired"
    if "prompt" in keys:
        return "sft" if "completion" in keys else "prompts"
    raise DataError(f"{where}: cannot tell the format from the fields {sorted(keys)}; the formats are:\n"
                    f"{format_table()}\n(`rlhfkit data convert FILE OUT --from FORMAT` reads it as one of them; fmt= from Python)")
