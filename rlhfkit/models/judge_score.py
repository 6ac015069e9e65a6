"""The score judge: a language model asked to rate ONE reply from 1 to 10, read as an expected score.

Direct RLAIF (Lee et al. 2023, "RLAIF vs. RLHF: Scaling Reinforcement Learning from Human Feedback with AI
Feedback", Sec. 2.3): no reward model is trained; during RL the LLM rates each reply, and the reward is its expected
score under the probabilities of the score tokens, renormalised over the scores and rescaled to [-1, 1]:

    P(s) = p(s | x) / sum_s' p(s' | x)            s in the template's labels, e.g. "1" ... "10"
    E[s] = sum_s value(s) * P(s)                   value(s) = the label read as a number (expected_scores)
    r    = (E[s] - lo) / (hi - lo) * 2 - 1         lo, hi = the smallest and largest value (scores, in [-1, 1])

The parts, top to bottom:
  ScoreTemplate, load_score_template   the prompt as data (judge_templates/score.toml)
  render_score                         the judge's input, through the chat template when there is one
  score_label_ids                      each label's one or two token ids after the answer prefix
  label_log_probs, expected_score, rescale    the math above (pure tensor functions)
  LocalScoreJudge                      a causal-LM directory as a score judge: batched, cached

Shared with the pairwise judge (rlhfkit/models/judge.py): the TOML checks, the chat/plain rendering, the model
loading and its last-position forward (JudgeModel), the disk cache (JudgeCache: the expected score sits in its
p_first column, under keys of this template and options {"judgement": "score"}).

Deviations from Lee et al. 2023 (besides judge.py's 1, 3 and 5, which hold here too):
1. Labels of two tokens. Lee et al. read single score tokens from PaLM 2; a tokenizer that splits digits (Llama,
   SmolLM2) reads "10" as "1", "0". A two-token label's probability is the chain rule,
       P("10") = p(t1 = "1") * p(t2 = "0" | "1"),
   and a one-token label that also starts two-token labels keeps only the mass that does not continue into them,
       P("1")  = p(t1 = "1") * (1 - sum over two-token labels "1"b of p(t2 = b | "1")),
   both before the renormalisation over the labels. The second token's distribution costs ONE more batched
   forward per distinct first token of a two-token label (that token appended to every row). Labels of three or
   more tokens are refused.
2. No chain of thought, and one reading per reply (the score needs no position swap).

Layer: models (imports data, core; within models: judge, load, runtime, scoring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from rlhfkit.core.errors import ConfigError
from rlhfkit.models.judge import (
    TEMPLATES_DIR,
    JudgeCache,
    JudgeModel,
    check_placeholders,
    encode_text,
    judgement_key,
    label_token_ids,
    read_template_file,
    render_parts,
    string_field,
    template_hash,
    unknown_fields,
)
from rlhfkit.models.runtime import Runtime
from rlhfkit.models.scoring import as_text

DEFAULT_SCORE_TEMPLATE = TEMPLATES_DIR / "score.toml"
SCORE_PLACEHOLDERS = ("prompt", "reply")  # what a question must hold, each at least once
MAX_LABEL_TOKENS = 2  # deviation 1: one or two tokens per label

# ----------------------------------------------------------------------------------------------------
# The prompt as data


@dataclass(frozen=True)
class ScoreExemplar:
    """A worked rating shown to the judge before the real one (few-shot)."""

    prompt: str
    """The user message of the example."""
    reply: str
    """The assistant reply being rated."""
    score: str
    """Its score: one of the template's `labels`."""


@dataclass(frozen=True)
class ScoreTemplate:
    """A score judge prompt (judge_templates/score.toml); `load_score_template` reads one from TOML. Checked when
    made: every rule broken is a ConfigError naming `source` and the field."""

    question: str
    """One rating, with the placeholders {prompt} and {reply} ({{ and }} for literal braces)."""
    preamble: str = ""
    """Instructions before everything else: the system message under a chat template ("" = none)."""
    exemplars: tuple[ScoreExemplar, ...] = ()
    """Worked ratings shown before the real one when few-shot is on."""
    labels: tuple[str, ...] = tuple(str(i) for i in range(1, 11))
    """The scores the judge may answer, each a number written as the judge writes it; each must be one or two
    tokens for the judge's tokenizer right after `answer_prefix` (score_label_ids checks it)."""
    answer_prefix: str = ""
    """Text the judge's answer starts with, right before the score ("" = the score is the first token)."""
    source: str = "<in memory>"
    """Where the template came from (a file path), for messages; not part of its content."""

    def __post_init__(self):
        where, labels = self.source, self.labels
        check_placeholders(self.question, where, "question", SCORE_PLACEHOLDERS)
        if not (isinstance(labels, tuple) and len(labels) >= 2 and all(isinstance(x, str) and x for x in labels)):
            raise ConfigError(f"{where}: labels = {labels!r}; give at least two non-empty strings, e.g. "
                              'labels = ["1", "2", "3", "4", "5"]')
        for label in labels:
            if _number(label) is None:
                raise ConfigError(f"{where}: labels: {label!r} is not a number; every label is a score, its value "
                                  'the label read as a number (e.g. "7" or "3.5")')
        values = self.values
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: labels = {list(labels)!r} give the same score twice; each score once")
        for i, ex in enumerate(self.exemplars, start=1):
            if ex.score not in labels:
                raise ConfigError(f"{where}: exemplars[{i}].score = {ex.score!r} is not one of labels "
                                  f"{list(labels)!r}; rate the exemplar with one of them")

    @property
    def values(self) -> tuple[float, ...]:
        """Each label's score as a number."""
        return tuple(_number(label) for label in self.labels)

    @property
    def content_hash(self) -> str:
        """sha256 of everything that shapes a score (not `source`): part of every cache key."""
        return template_hash(self)


def _number(label: str) -> float | None:
    try:
        value = float(label)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


_EXEMPLAR_FIELDS = tuple(f.name for f in fields(ScoreExemplar))
_TEMPLATE_FIELDS = tuple(f.name for f in fields(ScoreTemplate) if f.name != "source")


def score_template_from_dict(raw: dict, source: str = "<in memory>") -> ScoreTemplate:
    """A ScoreTemplate from a parsed TOML table; every error a ConfigError naming `source` and the field."""
    unknown_fields(raw, _TEMPLATE_FIELDS, source, "")
    kwargs = {}
    for key in ("question", "preamble", "answer_prefix"):
        value = string_field(raw, key, source, key, required=key == "question", example=DEFAULT_SCORE_TEMPLATE)
        if value is not None:
            kwargs[key] = value
    if "labels" in raw:
        labels = raw["labels"]
        if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise ConfigError(f"{source}: labels = {labels!r}; give a list of strings, each a number, "
                              'e.g. labels = ["1", "2", "3", "4", "5"]')
        kwargs["labels"] = tuple(labels)
    exemplars = raw.get("exemplars", [])
    if not (isinstance(exemplars, list) and all(isinstance(e, dict) for e in exemplars)):
        raise ConfigError(f"{source}: exemplars must be tables, each written [[exemplars]] with prompt, reply and "
                          "score")
    parsed = []
    for i, ex in enumerate(exemplars, start=1):
        name = f"exemplars[{i}]"
        unknown_fields(ex, _EXEMPLAR_FIELDS, source, name + ".")
        parsed.append(ScoreExemplar(**{k: string_field(ex, k, source, f"{name}.{k}", True, DEFAULT_SCORE_TEMPLATE)
                                       for k in _EXEMPLAR_FIELDS}))
    return ScoreTemplate(**kwargs, exemplars=tuple(parsed), source=source)


def load_score_template(path: str | Path = DEFAULT_SCORE_TEMPLATE) -> ScoreTemplate:
    """The score template in a TOML file (default: the shipped score.toml)."""
    return score_template_from_dict(read_template_file(path, DEFAULT_SCORE_TEMPLATE), str(Path(path)))


# ----------------------------------------------------------------------------------------------------
# The judge's input and the labels' tokens


def _question(template: ScoreTemplate, prompt, reply) -> str:
    return template.question.format(prompt=as_text(prompt), reply=as_text(reply))


def render_score(template: ScoreTemplate, tokenizer, prompt, reply, few_shot: bool = True) -> str:
    """The judge's input for one reply, ending with the answer prefix: the score is what comes next. The layout
    is the pairwise judge's (rlhfkit.models.judge.render): preamble as system message, exemplars as user/assistant
    turns, the question, the assistant turn opened; without a chat template one text in blank-line blocks."""
    shots = [(_question(template, e.prompt, e.reply), template.answer_prefix + e.score)
             for e in (template.exemplars if few_shot else ())]
    return render_parts(tokenizer, template.preamble, shots, _question(template, prompt, reply),
                        template.answer_prefix)


def score_label_ids(tokenizer, template: ScoreTemplate, judge: str = "") -> tuple[int, list[list[int]]]:
    """(cut, ids): each label's one or two token ids after the answer prefix (read on a probe rendering), and
    how many trailing spaces of every input go into the labels' first token (judge.py's deviation 3). A
    ConfigError naming the template when a label is three or more tokens, or two labels are the same tokens."""
    context = render_score(template, tokenizer, "a question", "a reply", few_shot=False)
    found = label_token_ids(tokenizer, context, template.labels, MAX_LABEL_TOKENS)
    if found is not None:
        return found
    base = encode_text(tokenizer, context)
    tails = [encode_text(tokenizer, context + label)[len(base):] for label in template.labels]
    shown = "; ".join(f"{label!r} -> {tokenizer.convert_ids_to_tokens(t)}" for label, t in zip(template.labels, tails))
    raise ConfigError(
        f"{template.source}: labels {list(template.labels)!r} are not each one or two tokens, all different, after "
        f"answer_prefix = {template.answer_prefix!r} for the tokenizer of the judge {judge} (each label's tokens: "
        f"{shown}); choose labels of at most two tokens for this tokenizer (digits usually are), or end "
        "answer_prefix so that they are")


# ----------------------------------------------------------------------------------------------------
# The math: label probabilities (deviation 1), expected score, rescaling


def label_log_probs(first: torch.Tensor, second: dict[int, torch.Tensor], label_ids: Sequence[Sequence[int]]
                    ) -> torch.Tensor:
    """(B, L) log P(label), normalised over the labels. first: (B, V) next-token logits after the input; second:
    {a: (B, V) logits after the input and token a} for each first token a of a two-token label. One-token label
    [a]: p(a) * (1 - sum_b p(b | a) over two-token labels [a, b]); two-token label [a, b]: p(a) * p(b | a)."""
    logp = torch.log_softmax(first.float(), dim=-1)  # (B, V)
    logp2 = {a: torch.log_softmax(z.float(), dim=-1) for a, z in second.items()}  # each (B, V)
    cols = []
    for ids in label_ids:
        a = ids[0]
        if len(ids) == 2:
            cols.append(logp[:, a] + logp2[a][:, ids[1]])
        else:
            longer = [other[1] for other in label_ids if len(other) == 2 and other[0] == a]
            stop = 1.0 - logp2[a][:, longer].exp().sum(-1).clamp(max=1.0) if longer else None  # (B,)
            cols.append(logp[:, a] if stop is None else logp[:, a] + torch.log(stop))
    return torch.log_softmax(torch.stack(cols, dim=-1), dim=-1)  # (B, L)


def expected_score(log_probs: torch.Tensor, values: Sequence[float]) -> torch.Tensor:
    """(B,) E[s] = sum_s value(s) * P(s) over the labels, from their (B, L) log-probs."""
    return log_probs.exp() @ torch.tensor(values, dtype=log_probs.dtype, device=log_probs.device)


def rescale(expected: float, lo: float, hi: float) -> float:
    """An expected score in [lo, hi] on [-1, 1]: (E - lo) / (hi - lo) * 2 - 1 (Lee et al. 2023, Sec. 2.3)."""
    return (expected - lo) / (hi - lo) * 2.0 - 1.0


# ----------------------------------------------------------------------------------------------------
# The local back-end


class LocalScoreJudge(JudgeModel):
    """A local causal-LM directory as a score judge: each (prompt, reply) rendered with the score template,
    batched and left-padded, the last position only; per batch one forward, plus one per distinct first token of
    a two-token label (deviation 1). Deterministic: eval mode, dropout off.

    expected_scores: E[s] in [lo, hi] (the labels' smallest and largest value); scores: the same rescaled to
    [-1, 1], the reward. cache: a JudgeCache or a path to one (None = no cache); it holds E[s]."""

    def __init__(self, path: str | Path, template: ScoreTemplate | None = None, rt: Runtime | None = None, *,
                 batch_size: int = 16, cache: JudgeCache | str | Path | None = None):
        super().__init__(path, rt, batch_size=batch_size, cache=cache)
        self.template = template if template is not None else load_score_template()
        # a template whose labels do not fit this tokenizer fails here, not mid-run
        self.cut, self.label_ids = score_label_ids(self.tokenizer, self.template, str(self.path))
        self.values = self.template.values
        self.lo, self.hi = min(self.values), max(self.values)

    def options(self) -> dict:
        """The settings besides the input that decide a score (part of its cache key, apart from the pairwise
        judge's)."""
        return {"judgement": "score", "dtype": str(self.rt.dtype)}

    def expected_scores(self, prompts: Sequence, replies: Sequence, few_shot: bool = True) -> list[float]:
        """E[s] of each (prompt, reply), in [lo, hi]. Cached inputs make no model call; each distinct input is
        scored once; the cache is written per batch."""
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts and {len(replies)} replies; one reply per prompt")
        texts = [render_score(self.template, self.tokenizer, p, r, few_shot) for p, r in zip(prompts, replies)]
        options, content = self.options(), self.template.content_hash
        keys = [judgement_key(self.identity, content, t, options) for t in texts]
        done = {k: p for k, (p, _) in self.cache.get(keys).items()} if self.cache is not None else {}
        todo = [k for k in dict.fromkeys(keys) if k not in done]
        self.stats.cached += len(keys) - len(todo)
        text_of = dict(zip(keys, texts))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            expected = self._expected([text_of[k] for k in batch])
            done.update(zip(batch, expected))
            if self.cache is not None:
                self.cache.put([(k, e, "") for k, e in zip(batch, expected)])  # committed per batch
        return [done[k] for k in keys]

    def scores(self, prompts: Sequence, replies: Sequence, few_shot: bool = True) -> list[float]:
        """The reward of each (prompt, reply): its expected score rescaled to [-1, 1] (lo -> -1, hi -> 1)."""
        return [rescale(e, self.lo, self.hi) for e in self.expected_scores(prompts, replies, few_shot)]

    def _expected(self, contexts: list[str]) -> list[float]:
        """E[s] after each context: one forward for the first token, then one new position per first token of a
        two-token label (on the first forward's KV cache)."""
        seqs = [encode_text(self.tokenizer, c[: len(c) - self.cut]) for c in contexts]
        heads = list(dict.fromkeys(ids[0] for ids in self.label_ids if len(ids) == 2))
        first, second = self.next_token_logits_then(seqs, heads)  # (B, V), each (B, V): the second token on the cache
        self.stats.judged += len(seqs)
        return expected_score(label_log_probs(first, second, self.label_ids), self.values).tolist()
