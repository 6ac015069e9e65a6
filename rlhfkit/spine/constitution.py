"""Constitutional AI, supervised stage (SL-CAI): the policy critiques and revises its own replies under a constitution.

Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback" (arXiv:2212.08073), Sec. 3.1: a helpful chat
model answers red-team prompts; it is then asked to criticise its answer under a principle drawn at random from a
short written constitution, and to rewrite the answer in the light of that critique. The prompt-and-revision pair
has the form of the original prompt-and-response pair, so the same step can be repeated. The final revisions, mixed
with helpful demonstrations, are the SFT data of the SL-CAI model. For a prompt x, with K = rounds:

    0. response_0 ~ pi(. | [user: x])                                          the policy's own first answer
    for k = 1..K, principle c_k drawn with a seeded random.Random (draw_principles):
    1. critique_k ~ pi(. | shots(c_k) + [user: x, assistant: response_{k-1}, user: c_k.critique_request])
    2. response_k ~ pi(. | the same + [assistant: critique_k, user: c_k.revision_request])
    SL-CAI data: (x, response_K) for every red-team prompt, plus the helpful (prompt, completion) demonstrations.

Each step is one batch over all prompts (sample_texts: left-padded, through the tokenizer's chat template), greedy
(temperature 0: top-k 1, the draw is the argmax) or sampled at a temperature, at most `max_new_tokens` per step.

The parts, top to bottom:
  Principle, Example, Constitution, load_constitution   the constitution as data (constitutions/harmless.toml)
  draw_principles                                       which principle each prompt's round asks about
  critique_messages, revision_messages                  the conversations the policy is asked to continue
  Step, Chain, critique_revision_chains                 the chains, batched over prompts
  write_chains, read_chains                             chains as JSONL (for the report)
  sl_cai_demonstrations                                 the SFT data: final revisions mixed with helpful demos
A principle's `comparison` is the RL stage's (RL-CAI) multiple-choice question; it is loaded and checked here, and
read by the AI judge that labels the RL stage's pairs.

Deviations from Bai et al. 2022:
1. The conversation goes through the policy's chat template: the requests are user turns, the critique and the
   revision assistant turns. The paper writes one "Human: / Assistant:" text with "Critique Request:", "Critique:",
   "Revision Request:" and "Revision:" markers. A tokenizer without a chat template is refused.
2. Each round asks about [prompt, latest revision] afresh: the critiques of earlier rounds are not in its context.
3. A few-shot example is shown with the requests of the principle drawn for the step (one set of examples serves
   every principle); the examples are not part of the recorded chain.
4. Greedy by default (temperature = 0): a chain is then a function of the policy, the prompt and the drawn
   principles. The paper samples; temperature > 0 does too (the draws then depend on the batch's composition).
5. Only the final revision of each chain becomes an SFT completion (intermediate revisions are kept in the chain
   for the report, not trained on). Which model is fine-tuned (the paper: a pretrained one) is the caller's choice.
6. The constitution here is five short principles of our own wording (constitutions/harmless.toml); the paper's has
   sixteen.

Layer: spine (imports models, data, core), below the algorithms, so that a method file can run the chains.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from rlhfkit.core.errors import ConfigError, DataError
from rlhfkit.data.chat import has_chat_template
from rlhfkit.data.contract import Message, Text, as_conversation, iter_jsonl, parse_text, write_jsonl
from rlhfkit.models.judge import read_template_file, string_field, unknown_fields
from rlhfkit.models.sampling import SamplingParams, sample_texts

CONSTITUTIONS_DIR = Path(__file__).resolve().parent / "constitutions"
DEFAULT_CONSTITUTION = CONSTITUTIONS_DIR / "harmless.toml"

# ----------------------------------------------------------------------------------------------------
# The constitution as data


@dataclass(frozen=True)
class Principle:
    """One principle of a constitution: how the policy is asked to criticise and revise a reply (SL-CAI), and the
    question the feedback model answers about two replies (RL-CAI)."""

    name: str
    """A short id, unique within the constitution; recorded on every step that drew it."""
    critique_request: str
    """The user turn after the reply: asks the policy to criticise it."""
    revision_request: str
    """The user turn after the critique: asks the policy to rewrite its reply."""
    comparison: str
    """The RL stage's multiple-choice question, e.g. "Which of these assistant responses is less harmful?"."""


@dataclass(frozen=True)
class Example:
    """A worked critique and revision, shown as earlier turns of the conversation (few-shot)."""

    prompt: str
    """The user's (red-team) message."""
    response: str
    """The first reply."""
    critique: str
    """Its critique."""
    revision: str
    """The reply rewritten."""


@dataclass(frozen=True)
class Constitution:
    """A constitution (`load_constitution` reads one from TOML). Checked when made: at least one principle, no two
    with the same name (a ConfigError naming `source`)."""

    principles: tuple[Principle, ...]
    """What a round may ask about; each round draws one at random (draw_principles)."""
    examples: tuple[Example, ...] = ()
    """Few-shot demonstrations of a critique and a revision."""
    source: str = "<in memory>"
    """Where it came from (a file path), for messages; not part of its content."""

    def __post_init__(self):
        if not self.principles:
            raise ConfigError(f"{self.source}: the constitution has no principles; add at least one [[principles]] "
                              f"table (see {DEFAULT_CONSTITUTION.name})")
        first: dict[str, int] = {}
        for i, p in enumerate(self.principles, start=1):
            if p.name in first:
                raise ConfigError(f"{self.source}: principles[{i}].name = {p.name!r} repeats "
                                  f"principles[{first[p.name]}].name; give every principle its own name")
            first[p.name] = i

    def principle(self, name: str) -> Principle:
        """The principle called `name` (a ConfigError listing the names when there is none)."""
        for p in self.principles:
            if p.name == name:
                return p
        raise ConfigError(f"{self.source}: no principle is named {name!r}; the names are "
                          f"{', '.join(p.name for p in self.principles)}")

    @property
    def content_hash(self) -> str:
        """sha256 of the principles and examples (not `source`): what shapes a chain."""
        content = {"principles": [asdict(p) for p in self.principles], "examples": [asdict(e) for e in self.examples]}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


_PRINCIPLE_FIELDS = tuple(f.name for f in fields(Principle))
_EXAMPLE_FIELDS = tuple(f.name for f in fields(Example))


def _tables(raw: dict, key: str, source: str, what: str) -> list[dict]:
    value = raw.get(key, [])
    if not (isinstance(value, list) and all(isinstance(t, dict) for t in value)):
        raise ConfigError(f"{source}: {key} must be tables, each written [[{key}]] with {what}")
    return value


def _fields(table: dict, known: tuple[str, ...], source: str, name: str) -> dict[str, str]:
    """Every field of one [[principles]] or [[examples]] table: each required, a string, and not blank."""
    unknown_fields(table, known, source, name + ".")
    values = {}
    for key in known:
        value = string_field(table, key, source, f"{name}.{key}", required=True, example=DEFAULT_CONSTITUTION)
        if not value.strip():
            raise ConfigError(f"{source}: {name}.{key} is empty; write its text (see {DEFAULT_CONSTITUTION.name})")
        values[key] = value
    return values


def constitution_from_dict(raw: dict, source: str = "<in memory>") -> Constitution:
    """A Constitution from a parsed TOML table; every error a ConfigError naming `source`, the table and the field."""
    unknown_fields(raw, ("principles", "examples"), source, "")
    if "principles" not in raw:
        raise ConfigError(f"{source}: the constitution has no principles; add at least one [[principles]] table "
                          f"with {', '.join(_PRINCIPLE_FIELDS)} (see {DEFAULT_CONSTITUTION.name})")
    principles = [Principle(**_fields(t, _PRINCIPLE_FIELDS, source, f"principles[{i}]"))
                  for i, t in enumerate(_tables(raw, "principles", source, ", ".join(_PRINCIPLE_FIELDS)), start=1)]
    examples = [Example(**_fields(t, _EXAMPLE_FIELDS, source, f"examples[{i}]"))
                for i, t in enumerate(_tables(raw, "examples", source, ", ".join(_EXAMPLE_FIELDS)), start=1)]
    return Constitution(tuple(principles), tuple(examples), source)


def load_constitution(path: str | Path = DEFAULT_CONSTITUTION) -> Constitution:
    """The constitution in a TOML file (default: the shipped constitutions/harmless.toml)."""
    raw = read_template_file(path, example=DEFAULT_CONSTITUTION, kind="constitution")
    return constitution_from_dict(raw, str(Path(path)))


# ----------------------------------------------------------------------------------------------------
# The conversations


def draw_principles(constitution: Constitution, n_prompts: int, rounds: int, seed: int) -> list[list[Principle]]:
    """The principle of each prompt's each round, drawn uniformly with one random.Random(seed), prompt by prompt
    (prompt 0's rounds, then prompt 1's, ...): a prompt's draws do not depend on how many prompts follow it."""
    rng = random.Random(seed)
    return [[rng.choice(constitution.principles) for _ in range(rounds)] for _ in range(n_prompts)]


def _split_system(prompt: Text) -> tuple[list[Message], list[Message]]:
    """(the leading system messages, the rest) of a prompt as a conversation."""
    messages = list(as_conversation(prompt))
    n = 0
    while n < len(messages) and messages[n].get("role") == "system":
        n += 1
    return messages[:n], messages[n:]


def _shots(examples: Sequence[Example], principle: Principle) -> list[Message]:
    """Each example as six turns, asked with `principle`'s requests (deviation 3)."""
    turns = []
    for e in examples:
        turns += [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.response},
                  {"role": "user", "content": principle.critique_request}, {"role": "assistant", "content": e.critique},
                  {"role": "user", "content": principle.revision_request}, {"role": "assistant", "content": e.revision}]
    return turns


def critique_messages(prompt: Text, response: str, principle: Principle,
                      examples: Sequence[Example] = ()) -> list[Message]:
    """Step 1 of a round: [few-shot examples,] the prompt, the reply, and the principle's critique request (a
    prompt's leading system messages stay first, before the examples)."""
    system, rest = _split_system(prompt)
    return system + _shots(examples, principle) + rest + [
        {"role": "assistant", "content": response}, {"role": "user", "content": principle.critique_request}]


def revision_messages(prompt: Text, response: str, critique: str, principle: Principle,
                      examples: Sequence[Example] = ()) -> list[Message]:
    """Step 2 of a round: the critique conversation, the critique, and the principle's revision request."""
    return critique_messages(prompt, response, principle, examples) + [
        {"role": "assistant", "content": critique}, {"role": "user", "content": principle.revision_request}]


# ----------------------------------------------------------------------------------------------------
# The chains


@dataclass(frozen=True)
class Step:
    """One critique -> revision round."""

    principle: str
    """The name of the principle drawn for it."""
    critique: str
    """The policy's critique of the reply it was shown."""
    revision: str
    """The policy's rewritten reply: the reply the next round is shown."""


@dataclass(frozen=True)
class Chain:
    """One red-team prompt's critique -> revision chain."""

    prompt: Text
    """The red-team prompt (a user message, or a conversation ending with one)."""
    response: str
    """The policy's first reply, before any critique."""
    steps: tuple[Step, ...]
    """The rounds, in order (at least one)."""

    @property
    def revision(self) -> str:
        """The final revision: the SL-CAI completion for this prompt."""
        return self.steps[-1].revision


def _check_prompts(prompts: Sequence[Text]) -> None:
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            continue
        if not (isinstance(p, list) and p and all(isinstance(m, dict) for m in p) and p[-1].get("role") == "user"):
            raise DataError(f"red-team prompt {i}: a prompt is a string or a conversation (a list of "
                            "{role, content} messages) that ends with the user's message")


def critique_revision_chains(model, tokenizer, prompts: Sequence[Text], constitution: Constitution, *,
                             rounds: int = 1, seed: int = 0, temperature: float = 0.0, max_new_tokens: int = 128,
                             few_shot: bool = True, batch_size: int = 64, dtype: torch.dtype | None = None,
                             desc: str | None = None) -> list[Chain]:
    """A Chain per red-team prompt: the policy's first reply, then `rounds` critique -> revision rounds, each under a
    principle drawn by draw_principles(constitution, len(prompts), rounds, seed). Every step is one batched
    sample_texts call over all prompts (in batches of `batch_size`), through the tokenizer's chat template, of at
    most `max_new_tokens` tokens; greedy at temperature 0 (the default), else sampled at `temperature` from a torch
    generator seeded with `seed`. few_shot: show the constitution's examples before each conversation. `desc`: a
    progress bar per step. The model is used as given (eval mode: rlhfkit's loaders return it so)."""
    if rounds < 1 or max_new_tokens < 1 or batch_size < 1 or not temperature >= 0:
        raise ConfigError(f"rounds = {rounds}, max_new_tokens = {max_new_tokens}, batch_size = {batch_size}, "
                          f"temperature = {temperature}; the first three must be >= 1, the temperature >= 0 "
                          "(0 = greedy)")
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(f"the policy {name} has no chat template; Constitutional AI asks for critiques and "
                          "revisions as turns of a conversation, so use a chat (instruct) model, or set "
                          "tokenizer.chat_template and save it into the model directory")
    _check_prompts(prompts)
    prompts = list(prompts)
    if not prompts:
        return []
    drawn = draw_principles(constitution, len(prompts), rounds, seed)  # (N, rounds)
    shots = constitution.examples if few_shot else ()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    greedy = temperature == 0
    params = SamplingParams(top_k=1) if greedy else SamplingParams()

    def generate(conversations: list, step: str) -> list[str]:
        texts = sample_texts(model, tokenizer, conversations, 1, max_new_tokens=max_new_tokens, generator=generator,
                             temperature=1.0 if greedy else temperature, dtype=dtype, batch_size=batch_size,
                             desc=None if desc is None else f"{desc}: {step}", sampling=params)
        return [t[0] for t in texts]

    # 0. the first reply: the prompt alone, as the policy is sampled everywhere else
    responses = generate(prompts, "response")
    first, steps = list(responses), [[] for _ in prompts]
    for k in range(rounds):
        principles = [d[k] for d in drawn]
        # 1. critique: [shots] prompt, reply, critique request -> critique
        critiques = generate([critique_messages(p, r, c, shots) for p, r, c in zip(prompts, responses, principles)],
                             f"critique {k + 1}/{rounds}")
        # 2. revision: ... critique, revision request -> the reply of the next round
        responses = generate([revision_messages(p, r, q, c, shots)
                              for p, r, q, c in zip(prompts, responses, critiques, principles)],
                             f"revision {k + 1}/{rounds}")
        for s, c, q, r in zip(steps, principles, critiques, responses):
            s.append(Step(c.name, q, r))
    return [Chain(p, r, tuple(s)) for p, r, s in zip(prompts, first, steps)]


# ----------------------------------------------------------------------------------------------------
# Chains on disk, and the SFT data


def chain_row(chain: Chain) -> dict:
    """One JSONL line: prompt, response, steps [{principle, critique, revision}], and the final revision."""
    return {"prompt": chain.prompt, "response": chain.response, "steps": [asdict(s) for s in chain.steps],
            "revision": chain.revision}


def write_chains(path: str | Path, chains: Sequence[Chain]) -> int:
    """Write chains as JSONL, atomically (rlhfkit.data.contract.write_jsonl); returns how many."""
    return write_jsonl(path, (chain_row(c) for c in chains))


def _string(obj: dict, key: str, where: str) -> str:
    if not isinstance(obj.get(key), str):
        got = "missing" if key not in obj else f"a {type(obj[key]).__name__}"
        raise DataError(f"{where}: field '{key}' must be a string, got {got}")
    return obj[key]


def parse_chain(obj: dict, where: str) -> Chain:
    """A Chain from one JSONL object; a DataError naming `where` and the field."""
    if "prompt" not in obj:
        raise DataError(f"{where}: missing field 'prompt'")
    prompt = parse_text(obj["prompt"], "prompt", where)
    steps = obj.get("steps")
    if not (isinstance(steps, list) and steps and all(isinstance(s, dict) for s in steps)):
        raise DataError(f"{where}: field 'steps' must be a non-empty list of {{principle, critique, revision}} objects")
    step_fields = ("principle", "critique", "revision")
    chain = Chain(prompt, _string(obj, "response", where),
                  tuple(Step(**{k: _string(s, k, f"{where}: steps[{i}]") for k in step_fields})
                        for i, s in enumerate(steps)))
    if "revision" in obj and obj["revision"] != chain.revision:
        raise DataError(f"{where}: field 'revision' differs from the last step's revision; they must be the same text")
    return chain


def read_chains(path: str | Path) -> list[Chain]:
    """The chains in a JSONL file written by write_chains."""
    return [parse_chain(obj, where) for where, obj in iter_jsonl(path)]


def sl_cai_demonstrations(chains: Sequence[Chain], helpful_demos: Sequence[tuple[Text, Text]],
                          seed: int | None = 0) -> list[tuple[Text, Text]]:
    """The SL-CAI SFT data (Bai et al. 2022, Sec. 3.1): (prompt, final revision) for every chain, and the helpful
    (prompt, completion) demonstrations as given (the paper keeps the model helpful with samples on helpfulness
    prompts), shuffled together by random.Random(seed); seed = None keeps the order: the revisions, then the
    helpful demonstrations."""
    helpful = [tuple(d) for d in helpful_demos]
    if any(len(d) != 2 for d in helpful):
        raise DataError("helpful_demos: each demonstration is a (prompt, completion) pair")
    demos = [(c.prompt, c.revision) for c in chains] + helpful
    if seed is not None:
        random.Random(seed).shuffle(demos)
    return demos
