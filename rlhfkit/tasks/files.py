"""A task made of your files: SFT demonstrations and prompts read from disk ([data] in the config), on top of a
built-in task or of none (`task = "none"`).

    [data]
    sft = "data/sft.jsonl"          # demonstrations: prompt/completion, or whole conversations (`messages`)
    prompts = "data/prompts.jsonl"  # prompts for feedback, online RL and evaluation (held-out split below)

Any format rlhfkit.data.load reads (JSONL, JSON, Parquet, a `datasets` directory; docs/data.md). Records are
split by item id (a hash of the prompt when the file has none) into training and held-out parts with the same
rule as the reward model's comparisons, so a prompt is never on both sides: the held-out prompts are the
evaluation's, the held-out demonstrations measure SFT's held-out loss. A file replaces what the built-in task
would have generated; gold scores and metrics stay the built-in task's (with `task = "none"` there are none:
the feedback comes from people or from a preference file, and the evaluation reports the reward model's score
and the KL).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhfkit.core.errors import ConfigError, DataError, RlhfkitError
from rlhfkit.data.batching import truncate_prompt
from rlhfkit.data.load import load_demonstrations, load_prompts
from rlhfkit.data.splits import is_heldout
from rlhfkit.tasks.base import Task


def _split(records, fraction: float, seed: int):
    train = [r for r in records if not is_heldout(r.item_id, fraction, seed)]
    heldout = [r for r in records if is_heldout(r.item_id, fraction, seed)]
    return train, heldout


def _draw(pool: list, n: int, rng: random.Random) -> list:
    """n items from `pool` in a random order, without repeats until every item has been drawn once."""
    out = []
    while len(out) < n:
        out += rng.sample(pool, min(len(pool), n - len(out)))
    return out


def _key(prompt) -> str:
    """A prompt (text or a conversation) as a dictionary key."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


class DataTask(Task):
    """The built-in task `base` (or none) with prompts and demonstrations read from files."""

    def __init__(self, base: Task | None, data, seed: int, tokenizer=None):
        self.base, self.data = base, data
        self.name = base.name if base is not None else "data"
        self.max_new_tokens = data.max_new_tokens or (base.max_new_tokens if base is not None else 64)
        self.gold_metric_names = base.gold_metric_names if base is not None else ()
        self._prompts = self._demos = None
        if data.prompts:
            train, heldout = _split(load_prompts(data.prompts), data.heldout_fraction, seed)
            if not train or not heldout:
                raise RlhfkitError(f"data.prompts = {data.prompts!r}: {len(train)} training and {len(heldout)} held-out "
                                   f"prompts at data.heldout_fraction = {data.heldout_fraction}; both need at least "
                                   "one (give more prompts, or change the fraction)")
            self._prompts = ([r.prompt for r in train], [r.prompt for r in heldout])
            self._record_fields = [r.fields for r in train] + [r.fields for r in heldout]
        if data.sft:
            train, heldout = _split(load_demonstrations(data.sft), data.heldout_fraction, seed)
            if not train or not heldout:
                raise RlhfkitError(f"data.sft = {data.sft!r}: {len(train)} training and {len(heldout)} held-out "
                                   f"demonstrations at data.heldout_fraction = {data.heldout_fraction}; both need at "
                                   "least one (give more demonstrations, or change the fraction)")
            self._demos = ([(r.prompt, r.completion) for r in train], [(r.prompt, r.completion) for r in heldout])
        self.truncated = {"prompts": 0, "sft": 0}  # how many prompts data.max_prompt_length cut (the preflight says)
        if tokenizer is not None and data.max_prompt_length:
            self._truncate(tokenizer, data.max_prompt_length, data.truncation_side)
        self._fields = self._fields_by_prompt() if self._prompts else {}

    def _fields_by_prompt(self) -> dict:
        """Each prompt's other fields by its (truncated) text: a reward function is handed the fields of the prompt
        it scores. Two records of one prompt with different fields could not be told apart: refused."""
        by_key: dict[str, dict] = {}
        for prompt, fields in zip(self._prompts[0] + self._prompts[1], self._record_fields):
            if not fields:
                continue
            key = _key(prompt)
            if by_key.setdefault(key, fields) != fields:
                shown = str(prompt).replace("\n", " ")[:80]
                raise DataError(f"data.prompts = {self.data.prompts!r}: the prompt {shown!r} appears with different "
                                f"fields ({by_key[key]} and {fields}); reward functions get a prompt's fields by its "
                                "text, so give each prompt once, or the same fields each time")
        return by_key

    def prompt_fields(self, prompt) -> dict:
        return self._fields.get(_key(prompt), {}) if self._fields else {}

    def _truncate(self, tokenizer, max_length: int, side: str) -> None:
        """Cut every prompt (and every demonstration's prompt) to max_length tokens (data.truncation_side)."""
        def cut(prompt, key):
            try:
                prompt, was_cut = truncate_prompt(tokenizer, prompt, max_length, side)
            except DataError as e:
                raise DataError(f"data.{key} = {getattr(self.data, key)!r}: {e}") from None
            self.truncated[key] += was_cut
            return prompt

        if self._prompts:
            self._prompts = tuple([cut(p, "prompts") for p in part] for part in self._prompts)
        if self._demos:
            self._demos = tuple([(cut(p, "sft"), c) for p, c in part] for part in self._demos)

    def _need_base(self, what: str):
        if self.base is None:
            raise RlhfkitError(f"task = 'none' has no {what}; " + {
                "tokenizer": "set policy.path to a local model directory (with its tokenizer)",
                "prompts": "set data.prompts to a prompt file",
                "demonstrations": "set data.sft to a demonstrations file",
                "gold scorer": "simulated labelers need one: use feedback.labeler = 'human' or a preference file "
                               "(reward.data)",
            }[what])
        return self.base

    def build_tokenizer(self):
        return self._need_base("tokenizer").build_tokenizer()

    def prompts(self, n: int, rng: random.Random) -> list:
        return _draw(self._prompts[0], n, rng) if self._prompts else self._need_base("prompts").prompts(n, rng)

    def all_prompts(self) -> list:
        """Every prompt the run can sample on: the file's training and held-out prompts (the base task's sample
        of 256 without a prompt file)."""
        if self._prompts:
            return self._prompts[0] + self._prompts[1]
        return self._need_base("prompts").prompts(256, random.Random(0))

    def heldout_prompts(self, n: int, rng: random.Random) -> list:
        """Up to n held-out prompts (all of them when the file's held-out part is smaller)."""
        if self._prompts:
            pool = self._prompts[1]
            return rng.sample(pool, min(n, len(pool)))
        return self._need_base("prompts").heldout_prompts(n, rng)

    def demonstrations(self, n: int, rng: random.Random) -> list:
        return list(self._demos[0]) if self._demos else self._need_base("demonstrations").demonstrations(n, rng)

    def sft_split(self, n: int, rng: random.Random):
        if self._demos:
            return list(self._demos[0]), list(self._demos[1])
        return self._need_base("demonstrations").sft_split(n, rng)

    def gold_score(self, prompt, completion: str) -> float:
        return self._need_base("gold scorer").gold_score(prompt, completion)

    def gold_metrics(self, prompts: list, completions: list[str]) -> dict[str, float]:
        return self.base.gold_metrics(prompts, completions) if self.base is not None else {}

    @property
    def context_length(self) -> int:
        if self.base is None:
            raise ConfigError("task = 'none' needs policy.path (a model that brings its own context length)")
        return self.base.context_length

    def sft_loss_floor(self) -> float | None:
        return None if self._demos or self.base is None else self.base.sft_loss_floor()

    def toxicity_examples(self, n: int, rng: random.Random) -> list[tuple[str, int]] | None:
        """The base task's labelled replies (its gold rule judges replies, whatever the prompts); none without one."""
        return self.base.toxicity_examples(n, rng) if self.base is not None else None

    def default_overrides(self) -> dict:
        return self.base.default_overrides() if self.base is not None else {}

    def pretrained_overrides(self) -> dict:
        return self.base.pretrained_overrides() if self.base is not None else {}


def check_data_paths(data) -> None:
    """Fail before anything runs when a [data] file is missing."""
    for key in ("sft", "prompts"):
        path = getattr(data, key)
        if path and not Path(path).exists():
            raise ConfigError(f"data.{key} = {path!r}: no such file or directory")
