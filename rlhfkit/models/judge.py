"""The AI judge: a language model asked which of two replies is better, read as a probability.

RLAIF (Lee et al. 2023, "RLAIF vs. RLHF: Scaling Reinforcement Learning from Human Feedback with AI Feedback",
Sec. 2.1) and Constitutional AI's feedback model (Bai et al. 2022, "Constitutional AI: Harmlessness from AI
Feedback", Sec. 4.1) label a comparison (x, y_1, y_2) with an off-the-shelf LLM: a preamble, optional few-shot
exemplars, the comparison, then the next-token log-probs of the two answer labels, normalised over those two:

    P(y_1 better) = exp z_1 / (exp z_1 + exp z_2),    z_i = the judge's logit of label i after the input

Position swap (Lee et al. 2023, Sec. 2.1.1: judges prefer a position regardless of content): judge both
orders and average, p = (p_12 + (1 - p_21)) / 2 (`swap_average`).

The parts, top to bottom:
  JudgeTemplate, load_template   the prompt as data (a TOML file the user edits: judge_templates/pairwise.toml)
  render                         the judge's input text, through the tokenizer's chat template when it has one
  judge_messages                 the same input as chat messages, for an OpenAI-compatible endpoint
  answer_token_ids               the two labels' token ids (each must be ONE token after the answer prefix)
  JudgeCache                     judgements on disk (SQLite), keyed by judge, template, input and options
  JudgeModel, LocalJudge         a causal-LM directory as a judge: batched, left-padded, last position only
  judge_pairs                    any judge (PairJudge), both orders, averaged: Judgement per pair
  position_bias, same_position_rate, alignment    how a judge behaves, measured on its judgements
The 1-10 score judge (direct RLAIF) is rlhfkit/models/judge_score.py, built from these parts.
The OpenAI-compatible back-end (RemoteJudge) is rlhfkit/models/judge_remote.py.

Deviations from the papers (docs/rlaif.md, "Deviations"):
1. A chat model is given the preamble as the system message and each exemplar as a user turn answered by an
   assistant turn (Lee et al. prompt PaLM 2, a base model, with one block of text). Without a chat template the
   same parts are joined as one text, as in the paper.
2. Chain of thought generates ONE greedy rationale (top-k = 1), cut at the answer line, then reads the labels'
   probabilities after the rationale and `cot_answer_prefix` (the paper's two-step CoT). The rationale is kept
   as text and re-tokenised with the rest of the input, so its ids may differ from the ids generated (a BPE
   merge across a boundary). Self-consistency (cot_samples > 1) samples that many rationales instead and averages
   the probabilities read after each (Lee et al. 2023, Sec. 2.1.3).
3. A label that does not continue the answer prefix as one token may take the prefix's trailing spaces
   (GPT-2-style tokenizers read "Answer: 1" as "Answer", ":", " 1"): the input then ends before the spaces and
   the label read is " 1". Lee et al. read the token after "Preferred Summary=" and need no such rule.
4. The cache keys each ordered input, not each pair: the swapped order of (a, b) is the unswapped order of
   (b, a) and is judged once.
5. `Runtime.dtype` is an autocast dtype, as everywhere in rlhfkit: the weights stay fp32 (load_policy).

Layer: models (imports data, core; within models: forward, load, runtime, sampling, scoring).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import sqlite3
import string
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Protocol, Sequence

import torch

from rlhfkit.core.errors import ConfigError, DataError, RlhfkitError
from rlhfkit.data.batching import pad_id, pad_left, stop_ids
from rlhfkit.data.chat import has_chat_template
from rlhfkit.data.chat import render as render_chat
from rlhfkit.models.forward import disable_dropout, freeze, position_ids
from rlhfkit.models.load import check_model_dir, load_policy, load_tokenizer
from rlhfkit.models.runtime import Runtime, autocast
from rlhfkit.models.sampling import CACHE, SamplingParams, decode_responses, sample
from rlhfkit.models.scoring import as_text

TEMPLATES_DIR = Path(__file__).resolve().parent / "judge_templates"
DEFAULT_TEMPLATE = TEMPLATES_DIR / "pairwise.toml"
CONSTITUTIONAL_TEMPLATE = TEMPLATES_DIR / "constitutional.toml"  # asks a principle's question (RL-CAI)
PLACEHOLDERS = ("prompt", "reply_1", "reply_2")  # what a question must hold, each at least once
PRINCIPLE = "principle"  # what a question may hold: a constitution's comparison question (RL-CAI, for_principle)

# ----------------------------------------------------------------------------------------------------
# The prompt as data


@dataclass(frozen=True)
class Exemplar:
    """A worked comparison shown to the judge before the real one (few-shot)."""

    prompt: str
    """The user message of the example."""
    reply_1: str
    """The reply shown first."""
    reply_2: str
    """The reply shown second."""
    answer: str
    """The better reply's label: one of the template's `labels`."""
    rationale: str = ""
    """Why that reply is better; shown before the answer only with chain of thought ("" = none)."""


@dataclass(frozen=True)
class JudgeTemplate:
    """A pairwise judge prompt (docs/rlaif.md, "Templates"); `load_template` reads one from TOML. Checked when
    made: every rule broken is a ConfigError naming `source` and the field."""

    question: str
    """One comparison, with the placeholders {prompt}, {reply_1} and {reply_2} ({{ and }} for literal braces)."""
    preamble: str = ""
    """Instructions before everything else: the system message under a chat template ("" = none)."""
    exemplars: tuple[Exemplar, ...] = ()
    """Worked comparisons shown before the real one when few-shot is on."""
    labels: tuple[str, str] = ("1", "2")
    """The answers meaning "reply 1 is better" and "reply 2 is better"; each must be one token for the judge's
    tokenizer right after `answer_prefix` (answer_token_ids checks it)."""
    answer_prefix: str = ""
    """Text the judge's answer starts with, right before the label ("" = the label is the first token)."""
    cot_instruction: str = ""
    """Appended to the question with chain of thought: ask for reasons first ("" = chain of thought refused)."""
    cot_answer_prefix: str = "\nAnswer: "
    """Written after the generated rationale, right before the label; its text without surrounding whitespace
    also ends the rationale's generation (a model that starts the answer line itself is cut there)."""
    source: str = "<in memory>"
    """Where the template came from (a file path), for messages; not part of its content."""

    def __post_init__(self):
        where = self.source
        check_placeholders(self.question, where, "question", optional=(PRINCIPLE,))
        labels = self.labels
        if (not isinstance(labels, tuple) or len(labels) != 2 or not all(isinstance(x, str) and x for x in labels)):
            raise ConfigError(f"{where}: labels = {labels!r}; give two non-empty strings, e.g. labels = [\"1\", \"2\"]")
        if labels[0] == labels[1]:
            raise ConfigError(f"{where}: labels = {list(labels)!r} are the same; the two answers must differ")
        for i, ex in enumerate(self.exemplars, start=1):
            if ex.answer not in labels:
                raise ConfigError(f"{where}: exemplars[{i}].answer = {ex.answer!r} is not one of labels "
                                  f"{list(labels)!r}; answer with the label of the better reply")

    @property
    def asks_principle(self) -> bool:
        """Whether the question holds {principle}, filled in with a constitution's comparison (for_principle)."""
        return any(name == PRINCIPLE for _, name, _, _ in string.Formatter().parse(self.question))

    @property
    def content_hash(self) -> str:
        """sha256 of everything that shapes a judgement (not `source`): part of every cache key."""
        return template_hash(self)


def template_hash(template) -> str:
    """sha256 of a template dataclass's fields but `source`, its `exemplars` as dicts (any judge's template)."""
    content = {f.name: getattr(template, f.name) for f in fields(template) if f.name != "source"}
    content["exemplars"] = [vars(ex) for ex in template.exemplars]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _braced(names) -> str:
    shown = ["{" + n + "}" for n in names]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def check_placeholders(text: str, where: str, field: str, placeholders: tuple[str, ...] = PLACEHOLDERS,
                       optional: tuple[str, ...] = ()) -> None:
    """A ConfigError naming `where` and `field` unless `text` holds each of `placeholders`, and no other than those
    and `optional`."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as e:  # a single { or }
        raise ConfigError(f"{where}: {field}: {e}; write a literal brace as {{{{ or }}}}") from None
    unknown = sorted({n for n in names if n not in placeholders + optional})
    if unknown:
        raise ConfigError(f"{where}: {field} has the unknown placeholder(s) {_braced(unknown)}; use only "
                          f"{_braced(placeholders + optional)} (a literal brace is {{{{ or }}}})")
    missing = [n for n in placeholders if n not in names]
    if missing:
        raise ConfigError(f"{where}: {field} lacks {_braced(missing)}; the question must show "
                          f"{_braced(placeholders)}")


_EXEMPLAR_FIELDS = tuple(f.name for f in fields(Exemplar))
_TEMPLATE_FIELDS = tuple(f.name for f in fields(JudgeTemplate) if f.name != "source")


def string_field(table: dict, key: str, where: str, field: str, required: bool,
                 example: Path = DEFAULT_TEMPLATE) -> str | None:
    """table[key] as a string (None when absent and not required); a ConfigError naming `where` and `field`."""
    if key not in table:
        if required:
            raise ConfigError(f"{where}: the field {field} is missing; add it (see {example.name})")
        return None
    value = table[key]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {field} = {value!r} is a {type(value).__name__}; write it as a string in quotes")
    return value


def unknown_fields(table: dict, known: tuple[str, ...], where: str, prefix: str) -> None:
    """A ConfigError naming the first key of `table` that is not in `known` (a typo), and the known ones."""
    extra = [k for k in table if k not in known]
    if extra:
        raise ConfigError(f"{where}: unknown field {prefix}{extra[0]}; the fields are {', '.join(known)}")


def template_from_dict(raw: dict, source: str = "<in memory>") -> JudgeTemplate:
    """A JudgeTemplate from a parsed TOML table; every error a ConfigError naming `source` and the field."""
    unknown_fields(raw, _TEMPLATE_FIELDS, source, "")
    kwargs = {}
    for key in ("question", "preamble", "answer_prefix", "cot_instruction", "cot_answer_prefix"):
        value = string_field(raw, key, source, key, required=key == "question")
        if value is not None:
            kwargs[key] = value
    if "labels" in raw:
        labels = raw["labels"]
        if not (isinstance(labels, list) and len(labels) == 2 and all(isinstance(x, str) for x in labels)):
            raise ConfigError(f"{source}: labels = {labels!r}; give a list of two strings, "
                              "e.g. labels = [\"1\", \"2\"]")
        kwargs["labels"] = tuple(labels)
    exemplars = raw.get("exemplars", [])
    if not (isinstance(exemplars, list) and all(isinstance(e, dict) for e in exemplars)):
        raise ConfigError(f"{source}: exemplars must be tables, each written [[exemplars]] with prompt, reply_1, "
                          "reply_2, answer and (optionally) rationale")
    parsed = []
    for i, ex in enumerate(exemplars, start=1):
        name = f"exemplars[{i}]"
        unknown_fields(ex, _EXEMPLAR_FIELDS, source, name + ".")
        values = {k: string_field(ex, k, source, f"{name}.{k}", required=k != "rationale") for k in _EXEMPLAR_FIELDS}
        parsed.append(Exemplar(**{k: v for k, v in values.items() if v is not None}))
    return JudgeTemplate(**kwargs, exemplars=tuple(parsed), source=source)


def read_template_file(path: str | Path, example: Path = DEFAULT_TEMPLATE, kind: str = "judge template") -> dict:
    """The TOML table in a judge template file (or another prompt file the user edits, named by `kind`); a
    ConfigError pointing at `example` (a shipped file) when the file is missing or not TOML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {path} does not exist; copy {example} and edit it")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); compare it with {example}") from None


def load_template(path: str | Path = DEFAULT_TEMPLATE) -> JudgeTemplate:
    """The judge template in a TOML file (default: the shipped pairwise.toml)."""
    return template_from_dict(read_template_file(path), str(Path(path)))


# ----------------------------------------------------------------------------------------------------
# The judge's input


def for_principle(template: JudgeTemplate, comparison: str) -> JudgeTemplate:
    """The template asking one principle's comparison question (Constitutional AI's RL stage, Bai et al. 2022,
    Sec. 4.1): {principle} in its question replaced by `comparison`, everything else (labels, answer format,
    exemplars) the same."""
    if not template.asks_principle:
        raise ConfigError(f"{template.source}: the question has no {{{PRINCIPLE}}} placeholder for a principle's "
                          "comparison question; add one (see judge_templates/constitutional.toml)")
    literal = comparison.replace("{", "{{").replace("}", "}}")
    question = template.question.replace("{" + PRINCIPLE + "}", literal)
    return replace(template, question=question, source=f"{template.source} (principle)")


def _question(template: JudgeTemplate, prompt, reply_1, reply_2, cot: bool) -> str:
    if template.asks_principle:
        raise ConfigError(f"{template.source}: the question asks a {{{PRINCIPLE}}}, which only a constitution fills "
                          "in: set judge.constitution, or remove {principle} from the question")
    q = template.question.format(prompt=as_text(prompt), reply_1=as_text(reply_1), reply_2=as_text(reply_2))
    return q + "\n\n" + template.cot_instruction if cot else q


def _exemplar_answer(template: JudgeTemplate, ex: Exemplar, cot: bool) -> str:
    if cot and ex.rationale:
        return ex.rationale + template.cot_answer_prefix + ex.answer
    return template.answer_prefix + ex.answer


def render(template: JudgeTemplate, tokenizer, prompt, reply_1, reply_2, few_shot: bool = True,
           cot: bool = False) -> str:
    """The judge's input for one ordered comparison: the label is the next token after it (cot = False), or the
    rationale is (cot = True). With a chat template: the preamble as the system message (leading the first user
    message when the template refuses a system role), each exemplar a user turn and an assistant answer, the
    question a user turn, then the assistant turn opened (+ answer_prefix). Without: the same parts as one text,
    separated by blank lines, each answer on the line after its question."""
    return render_parts(tokenizer, template.preamble, _shots(template, few_shot, cot),
                        _question(template, prompt, reply_1, reply_2, cot), "" if cot else template.answer_prefix)


def _shots(template: JudgeTemplate, few_shot: bool, cot: bool) -> list[tuple[str, str]]:
    return [(_question(template, e.prompt, e.reply_1, e.reply_2, cot), _exemplar_answer(template, e, cot))
            for e in (template.exemplars if few_shot else ())]


def judge_messages(template: JudgeTemplate, prompt, reply_1, reply_2, few_shot: bool = True,
                   cot: bool = False) -> list[dict]:
    """The conversation `render` gives a chat template, as messages (what an OpenAI-compatible judge is sent,
    rlhfkit.models.judge_remote): the answer prefix has no place in it, so a chat judge needs answer_prefix = ""."""
    return chat_messages(template.preamble, _shots(template, few_shot, cot),
                         _question(template, prompt, reply_1, reply_2, cot))


def chat_messages(preamble: str, shots: Sequence[tuple[str, str]], question: str) -> list[dict]:
    """Any judge's conversation from its filled-in parts: the preamble as the system message (none when ""), each
    (question, answer) exemplar a user turn answered by an assistant turn, then the question as a user turn."""
    turns = [{"role": "system", "content": preamble}] if preamble else []
    for q, a in shots:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return turns + [{"role": "user", "content": question}]


def without_system(turns: list[dict]) -> list[dict]:
    """The conversation for a chat template that refuses a system role: the system message's text leads the first
    user message instead (a conversation without one is returned as it is)."""
    if not turns or turns[0]["role"] != "system":
        return turns
    rest = list(turns[1:])
    rest[0] = {"role": "user", "content": turns[0]["content"] + "\n\n" + rest[0]["content"]}
    return rest


def render_parts(tokenizer, preamble: str, shots: Sequence[tuple[str, str]], question: str, answer: str) -> str:
    """Any judge's input from its filled-in parts: the preamble, the (question, answer) exemplars, the question,
    and the text the answer starts with (render's layout, with or without a chat template)."""
    if not has_chat_template(tokenizer):
        blocks = [preamble] if preamble else []
        blocks += [q + "\n" + a for q, a in shots]
        blocks.append(question + "\n" + answer)
        return "\n\n".join(blocks)
    turns = chat_messages(preamble, shots, question)
    try:
        text = render_chat(tokenizer, turns, add_generation_prompt=True)
    except DataError:
        if not preamble:
            raise
        turns = without_system(turns)  # the template refuses a system role: the preamble leads the first user turn
        text = render_chat(tokenizer, turns, add_generation_prompt=True)
    return text + answer


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of a rendered input: a chat template writes its own BOS (no special tokens added); plain text gets
    the tokenizer's own (BOS), as rlhfkit.data.batching.encode_prompt does."""
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def label_token_ids(tokenizer, context: str, labels: Sequence[str],
                    max_tokens: int = 1) -> tuple[int, list[list[int]]] | None:
    """(cut, ids): each label's token ids where it continues `context` (a rendering ending with the answer prefix)
    by 1 to max_tokens tokens, the input cut before the context's `cut` trailing spaces (0, else all of them:
    deviation 3). None when neither cut fits every label, or two labels get the same ids."""
    full = [encode_text(tokenizer, context + label) for label in labels]
    spaces = len(context) - len(context.rstrip(" "))
    for cut in dict.fromkeys((0, spaces)):
        base = encode_text(tokenizer, context[: len(context) - cut])
        if all(1 <= len(f) - len(base) <= max_tokens and f[: len(base)] == base for f in full):
            ids = [f[len(base):] for f in full]
            return (cut, ids) if len({tuple(i) for i in ids}) == len(ids) else None
    return None


def answer_token_ids(tokenizer, template: JudgeTemplate, context: str, field: str, judge: str) -> tuple[int, list[int]]:
    """(cut, ids): the two labels' token ids read after `context` (a rendering ending with the answer prefix), and
    how many trailing characters of every such input go into the label's token (deviation 3: trailing spaces,
    for tokenizers that merge " 1"). A ConfigError when a label is not one token there, or both are the same."""
    found = label_token_ids(tokenizer, context, template.labels, max_tokens=1)
    if found is not None:
        return found[0], [ids[0] for ids in found[1]]
    full = [encode_text(tokenizer, context + label) for label in template.labels]
    base = encode_text(tokenizer, context)
    shown = "; ".join(f"{label!r} -> {tokenizer.convert_ids_to_tokens(f[max(len(base) - 2, 0):])}"
                      for label, f in zip(template.labels, full))
    raise ConfigError(
        f"{template.source}: labels {list(template.labels)!r} are not two distinct single tokens after {field} = "
        f"{getattr(template, field)!r} for the tokenizer of the judge {judge} (the end of the input, then each label: "
        f"{shown}); choose labels that are one token each for this tokenizer (digits or single letters usually are), "
        f"or end {field} so that they are")


# ----------------------------------------------------------------------------------------------------
# The cache of judgements


def judgement_key(judge: str, template_hash: str, text: str, options: dict) -> str:
    """sha256 of what decides a judgement: the judge's identity, the template, the rendered input, the options."""
    blob = json.dumps([judge, template_hash, text, options], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


_SMALL_FILES = (".json", ".jinja", ".txt", ".model")  # config, tokenizer, chat template: hashed by content


def model_identity(path: str | Path) -> str:
    """A judge directory's identity for the cache: its resolved path, the content of its small files (config.json,
    tokenizer and chat template) and each weight file's name, size and modification time (not its bytes: hashing
    gigabytes per run would cost more than it saves). Rewriting the weights changes it."""
    path = Path(path).resolve()
    h = hashlib.sha256(str(path).encode())
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode())
        if f.suffix in _SMALL_FILES:
            h.update(f.read_bytes())
        else:
            st = f.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class JudgeCache:
    """Judgements on disk: one SQLite row per judged input, key (judgement_key) -> P(the reply shown first is
    better) and the rationale (the score judge, rlhfkit.models.judge_score, keeps its expected score in the
    p_first column, under keys of its own: its template's hash and options {"judgement": "score", ...}). A judge
    commits after each batch, so a run that dies keeps every batch it finished, and a rerun reads them instead of
    calling the model."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS judgements "
              "(key TEXT PRIMARY KEY, p_first REAL NOT NULL, rationale TEXT NOT NULL)")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path)
            with self.db:
                self.db.execute(self.SCHEMA)
        except sqlite3.DatabaseError as e:
            raise RlhfkitError(f"judge cache {self.path} is not a usable SQLite database ({e}); delete it or point "
                               "the cache elsewhere") from None

    def get(self, keys: Sequence[str]) -> dict[str, tuple[float, str]]:
        """The cached (p_first, rationale) of those `keys` that are cached."""
        out, unique = {}, list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # SQLite's limit on bound parameters is 999 in old builds
            chunk = unique[start : start + 500]
            rows = self.db.execute(f"SELECT key, p_first, rationale FROM judgements WHERE key IN "
                                   f"({','.join('?' * len(chunk))})", chunk)
            out.update({k: (p, r) for k, p, r in rows})
        return out

    def put(self, rows: Sequence[tuple[str, float, str]]) -> None:
        """Store (key, p_first, rationale) rows and commit."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        self.db.close()


# ----------------------------------------------------------------------------------------------------
# The local back-end


@dataclass
class JudgeStats:
    """What judging cost so far (the issue's "cost" metric)."""

    calls: int = 0
    """Forward passes that read answers (one per batch, and for the score judge one more per first token of a
    two-token label; rationale generation not counted); a remote judge: requests answered."""
    judged: int = 0
    """Inputs the model judged."""
    cached: int = 0
    """Inputs answered from the cache (or repeated within a call) without the model."""
    tokens: int = 0
    """Tokens the model read (padding excluded) plus rationale tokens it generated; a remote judge: the endpoint's
    `usage.total_tokens`."""
    bounded: int = 0
    """A remote judge: inputs with only one label among the top log-probs, the other's bounded by the smallest shown
    (rlhfkit.models.judge_remote, deviation 1)."""
    from_text: int = 0
    """A remote judge: inputs with neither label among the top log-probs, read from the answer's text instead
    (the first label 1, the second 0, anything else 0.5; rlhfkit.models.judge_remote, deviation 2)."""


class PairJudge(Protocol):
    """What judge_pairs needs of a back-end: P(the reply shown first is better) for ordered comparisons, asked
    with its own template or another of the same answer format (`template`, a principle's question)."""

    def first_probs(self, items: Sequence[tuple], *, few_shot: bool = True, cot: bool = False,
                    template: JudgeTemplate | None = None) -> list[tuple[float, str]]: ...


_ANSWER_FORMAT = ("labels", "answer_prefix", "cot_instruction", "cot_answer_prefix", "preamble", "exemplars")


def same_answer_format(own: JudgeTemplate, other: JudgeTemplate | None) -> JudgeTemplate:
    """`other` (None = `own`), which must differ from the judge's own template in its question alone: the labels'
    token ids, the chain-of-thought prompts and the exemplars were checked for `own` when the judge was made."""
    if other is None:
        return own
    changed = [f for f in _ANSWER_FORMAT if getattr(own, f) != getattr(other, f)]
    if changed:
        raise ConfigError(f"{other.source}: differs from the judge's template {own.source} in {', '.join(changed)}; "
                          "a judge asks another question (for_principle) with its own answer format only")
    return other


def last_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: bool = True) -> torch.Tensor:
    """(B, V) next-token logits at the last column of left-padded rows, without the (B, T, V) logits of every
    position: `logits_to_keep=1` (transformers' causal LMs), or, for a model without it (keep = False), the
    base model's last hidden state through the output embeddings."""
    pos = position_ids(attention_mask)
    if keep:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, logits_to_keep=1)
        return out.logits[:, -1]  # (B, V)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=pos).last_hidden_state[:, -1]  # (B, H)
    return model.get_output_embeddings()(hidden)  # (B, V)


class JudgeModel:
    """What every local judge shares (LocalJudge, rlhfkit.models.judge_score.LocalScoreJudge): a causal-LM
    directory loaded frozen in eval mode with dropout off, its tokenizer, its identity for the cache, the cache,
    and `next_token_logits`, one batched, left-padded forward that reads only the last position.

    cache: a JudgeCache or a path to one (None = no cache)."""

    def __init__(self, path: str | Path, rt: Runtime | None = None, *, batch_size: int = 16,
                 cache: JudgeCache | str | Path | None = None):
        if batch_size < 1:
            raise ConfigError(f"judge batch_size = {batch_size}; it must be >= 1")
        self.path = check_model_dir(path, "judge", causal=True)
        self.rt = rt if rt is not None else Runtime(torch.device("cpu"), None)
        self.tokenizer = load_tokenizer(self.path, "judge")
        self.model = freeze(disable_dropout(load_policy(self.path, self.rt.device, "judge")))
        self.identity = model_identity(self.path)
        self.cache = JudgeCache(cache) if isinstance(cache, (str, Path)) else cache
        self.batch_size = batch_size
        self.stats = JudgeStats()
        self.positions = getattr(self.model.config, "max_position_embeddings", None)
        self.keep_one = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @torch.no_grad()
    def next_token_logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """(B, V) fp32 next-token logits after each token sequence, in one left-padded forward (stats: one call,
        the tokens read; the caller counts what it judged)."""
        longest = max(len(s) for s in seqs)
        if self.positions is not None and longest > self.positions:
            raise RlhfkitError(
                f"judge {self.path} has {self.positions} positions, but a rendered input takes {longest} tokens; "
                "shorten the replies or the template (preamble, exemplars), judge without few-shot, or use a judge "
                "with a longer context")
        ids, mask = pad_left(seqs, pad_id(self.tokenizer))  # (B, T): every row ends at column T - 1
        ids, mask = ids.to(self.rt.device), mask.to(self.rt.device)
        with autocast(self.rt.device, self.rt.dtype):
            logits = last_logits(self.model, ids, mask, self.keep_one)  # (B, V)
        self.stats.calls += 1
        self.stats.tokens += sum(len(s) for s in seqs)
        return logits.float()

    @torch.no_grad()
    def next_token_logits_then(self, seqs: list[list[int]], heads: Sequence[int]) -> tuple[torch.Tensor, dict]:
        """((B, V) logits after each sequence, {a: (B, V) logits after each sequence + [a]} for each token a in
        `heads`): what next_token_logits gives for seqs and for each seqs + [a], but the continuations read the
        first forward's KV cache (one new position each) instead of recomputing every sequence. A model without
        logits_to_keep takes the plain forwards."""
        if not heads or not self.keep_one:
            return self.next_token_logits(seqs), {a: self.next_token_logits([s + [a] for s in seqs]) for a in heads}
        longest = max(len(s) for s in seqs) + 1
        if self.positions is not None and longest > self.positions:
            self.next_token_logits([s + [heads[0]] for s in seqs])  # raises the error that names the judge
        ids, mask = pad_left(seqs, pad_id(self.tokenizer))
        ids, mask = ids.to(self.rt.device), mask.to(self.rt.device)
        pos = position_ids(mask)
        n = len(seqs)
        more = torch.cat([mask, mask.new_ones(n, 1)], dim=1)  # the continuation attends to the row and itself
        with autocast(self.rt.device, self.rt.dtype):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            first, cache, then = out.logits[:, -1].float(), getattr(out, CACHE), {}
            for i, a in enumerate(heads):  # a forward extends the cache in place: all but the last read a copy
                past = cache if i == len(heads) - 1 else copy.deepcopy(cache)
                step = self.model(input_ids=ids.new_full((n, 1), a), attention_mask=more, position_ids=pos[:, -1:] + 1,
                                  use_cache=True, logits_to_keep=1, **{CACHE: past})
                then[a] = step.logits[:, -1].float()
        self.stats.calls += 1 + len(heads)
        self.stats.tokens += sum(len(s) for s in seqs) + n * len(heads)
        return first, then


class LocalJudge(JudgeModel):
    """A local causal-LM directory as a pairwise judge (PairJudge): each ordered comparison rendered with the
    template, batched and left-padded, one forward reading only the last position, and P(first better) = the
    softmax over the two labels' logits. Deterministic: eval mode, dropout off, greedy rationales.

    cache: a JudgeCache or a path to one (None = no cache). cot_max_tokens: the longest rationale. cot_samples > 1:
    self-consistency (Lee et al. 2023, Sec. 2.1.3, after Wang et al. 2022): that many rationales sampled at
    cot_temperature, P(first better) read after each and averaged; the draws of an input are seeded by its cache key,
    so they do not depend on what else is in the batch."""

    def __init__(self, path: str | Path, template: JudgeTemplate | None = None, rt: Runtime | None = None, *,
                 batch_size: int = 16, cache: JudgeCache | str | Path | None = None, cot_max_tokens: int = 96,
                 cot_samples: int = 1, cot_temperature: float = 0.7):
        if cot_max_tokens < 1 or cot_samples < 1 or not cot_temperature > 0:
            raise ConfigError(f"judge cot_max_tokens = {cot_max_tokens}, cot_samples = {cot_samples}, "
                              f"cot_temperature = {cot_temperature}; the first two must be >= 1, the last > 0")
        super().__init__(path, rt, batch_size=batch_size, cache=cache)
        self.template = template if template is not None else load_template()
        self.cot_max_tokens, self.cot_samples, self.cot_temperature = cot_max_tokens, cot_samples, cot_temperature
        self._answers: dict[bool, tuple[int, list[int]]] = {}
        self._answer(cot=False)  # a template whose labels do not fit this tokenizer fails here, not mid-run

    def _answer(self, cot: bool) -> tuple[int, list[int]]:
        if cot not in self._answers:
            if cot and not self.template.cot_instruction:
                raise ConfigError(f"{self.template.source}: chain of thought needs a cot_instruction (what to write "
                                  "before the answer); add one to the template or judge without chain of thought")
            asked = for_principle(self.template, "Which is better?") if self.template.asks_principle else self.template
            probe = render(asked, self.tokenizer, "a question", "one reply", "another reply", False, cot)
            field = "cot_answer_prefix" if cot else "answer_prefix"
            if cot:
                probe += "Some reasons." + self.template.cot_answer_prefix
            self._answers[cot] = answer_token_ids(self.tokenizer, self.template, probe, field, str(self.path))
        return self._answers[cot]

    def options(self, cot: bool) -> dict:
        """The settings besides the input that decide a judgement (part of its cache key)."""
        options = {"cot": cot, "cot_max_tokens": self.cot_max_tokens if cot else None, "dtype": str(self.rt.dtype)}
        if cot and self.cot_samples > 1:  # (absent otherwise: the keys of greedy judgements stay as they were)
            options.update(cot_samples=self.cot_samples, cot_temperature=self.cot_temperature)
        return options

    def first_probs(self, items: Sequence[tuple], *, few_shot: bool = True, cot: bool = False,
                    template: JudgeTemplate | None = None) -> list[tuple[float, str]]:
        """(P(the reply shown first is better), rationale) for each (prompt, reply_1, reply_2); "" without cot.
        Cached inputs make no model call; each distinct input is judged once; the cache is written per batch.
        `template`: another question with this judge's answer format (for_principle); None = the judge's own."""
        tpl = same_answer_format(self.template, template)
        cut, label_ids = self._answer(cot)
        texts = [render(tpl, self.tokenizer, p, r1, r2, few_shot, cot) for p, r1, r2 in items]
        options, template_hash = self.options(cot), tpl.content_hash
        keys = [judgement_key(self.identity, template_hash, t, options) for t in texts]
        done = self.cache.get(keys) if self.cache is not None else {}
        todo = [k for k in dict.fromkeys(keys) if k not in done]
        self.stats.cached += len(keys) - len(todo)
        text_of = dict(zip(keys, texts))
        if cot and self.cot_samples > 1:
            return self._self_consistent(keys, todo, text_of, done, cut, label_ids)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            contexts = [text_of[k] for k in batch]
            rationales = self._rationales(contexts) if cot else [""] * len(batch)
            if cot:
                contexts = [c + r.rstrip() + self.template.cot_answer_prefix for c, r in zip(contexts, rationales)]
            probs = self._label_probs([c[: len(c) - cut] for c in contexts], label_ids)
            rows = list(zip(batch, probs, rationales))
            done.update({k: (p, r) for k, p, r in rows})
            if self.cache is not None:
                self.cache.put(rows)  # committed: a crash in a later batch keeps this one
        return [done[k] for k in keys]

    def _self_consistent(self, keys, todo, text_of, done, cut, label_ids) -> list[tuple[float, str]]:
        """Self-consistency: per input, cot_samples rationales in one batch (draws seeded by its key), the labels'
        probabilities after each, averaged; the rationales kept, separated by a line '~~~'."""
        for key in todo:
            context, n = text_of[key], self.cot_samples
            rationales = self._rationales([context] * n, seed=int(key[:15], 16))
            contexts = [context + r.rstrip() + self.template.cot_answer_prefix for r in rationales]
            probs = self._label_probs([c[: len(c) - cut] for c in contexts], label_ids)
            row = (key, sum(probs) / n, "\n~~~\n".join(rationales))
            done[key] = row[1:]
            if self.cache is not None:
                self.cache.put([row])
        return [done[k] for k in keys]

    def _label_probs(self, contexts: list[str], label_ids: list[int]) -> list[float]:
        """P(label 1) / (P(label 1) + P(label 2)) as the next token after each context, in one forward."""
        seqs = [encode_text(self.tokenizer, c) for c in contexts]
        pair = self.next_token_logits(seqs)[:, label_ids]  # (B, 2): z_1, z_2
        self.stats.judged += len(seqs)
        return torch.softmax(pair, dim=-1)[:, 0].tolist()

    @torch.no_grad()
    def _rationales(self, contexts: list[str], seed: int | None = None) -> list[str]:
        """A rationale after each context, ended by the end of the turn, by the answer line's text, or by
        cot_max_tokens: greedy (top-k 1: the draw is the argmax whatever the generator), or with a `seed` sampled at
        cot_temperature (self-consistency)."""
        seqs = [encode_text(self.tokenizer, c) for c in contexts]
        q, qm = pad_left(seqs, pad_id(self.tokenizer))
        stop = self.template.cot_answer_prefix.strip()
        params = SamplingParams(top_k=1 if seed is None else 0, stop=(stop,) if stop else ())
        generator = torch.Generator(device=self.rt.device).manual_seed(0 if seed is None else seed)
        with autocast(self.rt.device, self.rt.dtype):
            s = sample(self.model, q.to(self.rt.device), qm.to(self.rt.device), max_new_tokens=self.cot_max_tokens,
                       eos_token_id=stop_ids(self.tokenizer), pad_token_id=pad_id(self.tokenizer),
                       temperature=1.0 if seed is None else self.cot_temperature,
                       generator=generator, sampling=params, tokenizer=self.tokenizer)
        self.stats.tokens += int(s.response_mask.sum())
        return decode_responses(self.tokenizer, s)

    def judge(self, prompts: Sequence, replies_a: Sequence, replies_b: Sequence, *, swap: bool = True,
              few_shot: bool = True, cot: bool = False) -> list["Judgement"]:
        """judge_pairs with this judge."""
        return judge_pairs(self, prompts, replies_a, replies_b, swap=swap, few_shot=few_shot, cot=cot)


# ----------------------------------------------------------------------------------------------------
# Pairs, both orders, and what the judgements say about the judge


@dataclass(frozen=True)
class Judgement:
    """The judge's verdict on one pair (a, b)."""

    p: float
    """P(a is better than b): swap_average(p_ab, p_ba) with swap, else p_ab. The soft label."""
    p_ab: float
    """P(the reply shown first is better) with a shown first."""
    p_ba: float | None = None
    """P(the reply shown first is better) with b shown first; None without swap."""
    rationale_ab: str = ""
    """The rationale with a shown first ("" without chain of thought)."""
    rationale_ba: str = ""
    """The rationale with b shown first."""


def swap_average(p_ab: float, p_ba: float) -> float:
    """P(a better) from both orders (Lee et al. 2023, Sec. 2.1.1): (p_ab + (1 - p_ba)) / 2, where p_ba is the
    probability that the first-shown reply, b, is better."""
    return (p_ab + (1.0 - p_ba)) / 2.0


def judge_pairs(judge: PairJudge, prompts: Sequence, replies_a: Sequence, replies_b: Sequence, *,
                swap: bool = True, few_shot: bool = True, cot: bool = False,
                template: JudgeTemplate | None = None) -> list[Judgement]:
    """A Judgement per (prompt, a, b); with swap, both orders go to the judge in one call and are averaged.
    `template`: a question other than the judge's own, with its answer format (for_principle)."""
    if not len(prompts) == len(replies_a) == len(replies_b):
        raise ValueError(f"{len(prompts)} prompts, {len(replies_a)} and {len(replies_b)} replies; one of each per pair")
    n = len(prompts)
    items = list(zip(prompts, replies_a, replies_b))
    if swap:
        items += list(zip(prompts, replies_b, replies_a))
    out = judge.first_probs(items, few_shot=few_shot, cot=cot, **({"template": template} if template else {}))
    if not swap:
        return [Judgement(p, p, None, r) for p, r in out]
    return [Judgement(swap_average(p_ab, p_ba), p_ab, p_ba, r_ab, r_ba)
            for (p_ab, r_ab), (p_ba, r_ba) in zip(out[:n], out[n:])]


def _prefers_first(p: float) -> float:
    return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0  # a tie counts half


def position_bias(judgements: Sequence[Judgement]) -> float:
    """How often the judge prefers the reply shown first, over every order it saw (both with swap): 0.5 for a
    judge that position does not sway, 1.0 for one that always answers the first label. A tie counts half."""
    shown = [j.p_ab for j in judgements] + [j.p_ba for j in judgements if j.p_ba is not None]
    if not shown:
        raise ValueError("position_bias of no judgements")
    return sum(_prefers_first(p) for p in shown) / len(shown)


def same_position_rate(judgements: Sequence[Judgement]) -> float:
    """Lee et al. 2023's position-bias measure: the share of swapped pairs whose preferred POSITION is the same in
    both orders, so that the verdict flips with the order (0 for a consistent judge, 1 for one that always picks
    the same slot). Needs judgements made with swap; ties count as no preference for either slot."""
    pairs = [j for j in judgements if j.p_ba is not None]
    if not pairs:
        raise ValueError("same_position_rate needs judgements made with swap = True")
    return sum((j.p_ab > 0.5 and j.p_ba > 0.5) or (j.p_ab < 0.5 and j.p_ba < 0.5) for j in pairs) / len(pairs)


def alignment(judgements: Sequence[Judgement], a_better: Sequence[bool]) -> float:
    """AI-labeler alignment (Lee et al. 2023): the share of pairs where the judge's preferred reply
    (p > 0.5) is the gold one; a tie (p = 0.5) counts half."""
    if len(judgements) != len(a_better) or not judgements:
        raise ValueError(f"{len(judgements)} judgements and {len(a_better)} gold labels; one of each, at least one")
    return sum(_prefers_first(j.p) if gold else 1.0 - _prefers_first(j.p)
               for j, gold in zip(judgements, a_better)) / len(judgements)
