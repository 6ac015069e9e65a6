"""Conversations through a tokenizer's chat template: token ids, and a loss mask on the assistant turns.

How a conversation is cut (why not tokenise the whole rendering once): the template is rendered
incrementally, and the text each assistant message adds is its own segment. For a completion whose first
assistant message follows `prompt`,

    render(prompt, add_generation_prompt=True)   -> the prompt segment, exactly what the sampler is given
    render(prompt + [reply])[len(previous):]     -> the reply segment: content + end-of-turn (+ newline)

and so on for later turns. Each segment is tokenised on its own with add_special_tokens=False (the template
writes BOS itself when the model wants one, so there is never a second BOS), so the prompt's ids are the
same ids the policy is sampled from, and the boundary of every assistant turn is exact for any tokenizer.

The loss mask is 1 on the tokens of each assistant message of the completion up to and including its
first stop token (EOS or the template's end-of-turn token, e.g. <|im_end|>, <|eot_id|>): what the policy
must learn to produce, and where the sampler stops. What a template writes after that token (Qwen's
newline) is kept in the ids but not learned. A template whose turns end with no stop token gets EOS
appended, as plain-text completions do (rlhfkit.data.batching.encode_completion). Assistant messages
inside the prompt are context, not learned (TRL's prompt-completion rule).

Templates that render earlier turns differently once a later turn is added (some strip the reasoning of
past assistant turns) cannot be cut this way; encode_chat says so.
"""

from __future__ import annotations

from rlhfkit.core.errors import DataError, RlhfkitError
from rlhfkit.data.contract import Message

_SENTINEL = "rlhfkitsentinelreply"  # a reply whose end shows what the template writes after a turn


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[Message], add_generation_prompt: bool) -> str:
    """The template's text for `messages` (a DataError, not a Jinja traceback, when it refuses them)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError (e.g. "roles must alternate user/assistant"), and the like
        raise DataError(f"the tokenizer's chat template refused the conversation {_brief(messages)}: {e}") from None


def _brief(messages: list[Message]) -> str:
    return "[" + ", ".join(f"{m['role']}: {m['content'][:20]!r}" for m in messages) + "]"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids a reply ends with: EOS, and the template's end-of-turn token when it writes one (the first
    special token after an assistant message's content). The sampler stops on any of them."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not has_chat_template(tokenizer):
        return stops
    text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], False)
    after = text[text.index(_SENTINEL) + len(_SENTINEL):] if _SENTINEL in text else ""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for i in _ids(tokenizer, after):
        if i in special:
            return stops + [i] if i not in stops else stops
        if tokenizer.decode([i]).strip():
            break  # plain text ends the turn: no end-of-turn token
    return stops


def encode_chat_prompt(tokenizer, prompt: list[Message]) -> list[int]:
    """The ids the policy is sampled from: the prompt rendered with the assistant's turn opened."""
    return _ids(tokenizer, render(tokenizer, prompt, add_generation_prompt=True))


def chat_segments(tokenizer, prompt: list[Message], completion: list[Message]) -> list[tuple[str, bool]]:
    """The rendering of prompt + completion cut into (text, is_reply) segments, in order; is_reply marks the
    text each assistant message of the completion adds (its content and end-of-turn markup)."""
    if not prompt:
        raise DataError("a conversation needs at least one message before the reply")
    messages = list(prompt) + list(completion)
    segments, done = [], ""
    for i in range(len(prompt), len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        after = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise RlhfkitError(
                "the tokenizer's chat template renders earlier turns differently once a later turn is added, so "
                f"the assistant turns of {_brief(messages)} cannot be cut out of its text; use a template whose "
                "rendering of a conversation only grows as messages are added")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    rest = render(tokenizer, messages, add_generation_prompt=False)[len(done):]
    if rest:  # turns after the last reply (a trailing user message): context only
        segments.append((rest, False))
    return [(text, reply) for text, reply in segments if text]


def encode_chat(tokenizer, prompt: list[Message], completion: list[Message],
                stop_ids: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation: mask 1 on the completion's assistant turns, up to and including
    each turn's first stop id (default end_of_turn_ids). The first ids equal encode_chat_prompt(prompt)."""
    stops = set(end_of_turn_ids(tokenizer) if stop_ids is None else stop_ids)
    ids, mask = [], []
    for text, reply in chat_segments(tokenizer, prompt, completion):
        seg = _ids(tokenizer, text)
        if not reply:
            ids += seg
            mask += [0] * len(seg)
            continue
        end = next((n + 1 for n, i in enumerate(seg) if i in stops), None)
        if end is None and tokenizer.eos_token_id is not None:  # a template without end-of-turn tokens
            seg, end = seg + [tokenizer.eos_token_id], len(seg) + 1
        end = len(seg) if end is None else end
        ids += seg
        mask += [1] * end + [0] * (len(seg) - end)
    return ids, mask
