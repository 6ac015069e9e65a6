"""The AI judge over HTTP: any OpenAI-compatible chat endpoint (OpenAI, vLLM, `rlhfkit serve`) as a PairJudge.

    judge = RemoteJudge("http://127.0.0.1:8000/v1", "my-judge", load_template(), cache="judgements.sqlite")
    judgements = judge.judge(prompts, replies_a, replies_b, swap=True)   # as LocalJudge (rlhfkit.models.judge)

The same judgement as LocalJudge, read from the endpoint's log-probs instead of the model's logits: each ordered
comparison is sent as the conversation `render` builds for a chat template (judge_messages: preamble as system
message, exemplars as user/assistant turns, the question), with max_tokens = 1, temperature = 0, logprobs = true and
top_logprobs = K, and

    P(first better) = exp l_1 / (exp l_1 + exp l_2),    l_i = the log-prob of label i as the first reply token

which equals LocalJudge's softmax over the two labels' logits (a log-softmax shifts both by the same constant);
tests/test_judge_remote.py checks the two agree on a model served by `rlhfkit serve`.

Chain of thought: one greedy call generates the rationale with log-probs on; the labels are read at the first
generated token after the answer line's text that is not whitespace alone (the answer line's text is
`cot_answer_prefix` without surrounding whitespace, where LocalJudge stops its rationale), and the rationale is the
text before the answer line. Self-consistency (cot_samples > 1, Lee et al. 2023): one request asks for cot_samples
choices (`n`) sampled at cot_temperature with a `seed` drawn from the input's cache key (as LocalJudge seeds its
draws), each choice read as above; P is their mean, the rationales are kept separated by a line '~~~'.

Requests run on a pool of `max_concurrency` threads, so at most that many are in flight; the official client retries
429, 5xx and connection errors with exponential backoff (honouring Retry-After) up to `max_retries` times, each
attempt bounded by `timeout_s`; then an RlhfkitError names the endpoint and what to check. Judgements are cached as
LocalJudge's are (JudgeCache, judgement_key), written from the calling thread (an SQLite connection belongs to its
thread) as each request completes, so a run that dies keeps every answer it received.

Deviations from LocalJudge (and from Lee et al. 2023, who read the logits themselves):
1. An endpoint shows only the K most probable tokens. When one label is among them and the other is not, the other's
   log-prob is taken as the smallest shown (an upper bound on it): P is then less extreme than the truth, never
   more. Counted in `stats.bounded`.
2. When neither label is shown (or the endpoint returns no log-probs), P is read from the answer's text: the first
   label 1.0, the second 0.0, anything else 0.5. Counted in `stats.from_text`. With chain of thought, a model that
   never writes the answer line gets 0.5 (an endpoint cannot be made to continue a reply, so the answer line cannot
   be forced as LocalJudge forces it).
3. A label is matched by its token's text without surrounding whitespace, and the log-probs of its spellings ("1",
   " 1") are summed: an endpoint shows token texts, not ids, and a chat model may answer with or without a space
   (LocalJudge reads one token id; judge.py deviation 3).
4. A chat template has no place for an answer prefix: a template with a non-empty `answer_prefix` is refused
   (LocalJudge appends it after the opened assistant turn).
5. The preamble is sent as a system message; an endpoint whose chat template refuses a system role answers 400 with
   a message about it, and from then on the preamble leads the first user message (as LocalJudge does when the
   tokenizer's template refuses one; `merge_system`). The cache key stays the conversation as built. Likewise a 400
   that asks for `max_completion_tokens` (OpenAI's newer models refuse `max_tokens`) switches the length parameter.
6. The rationale's tokens are read where they were generated (LocalJudge re-tokenises the rationale as text).

Layer: models (imports core; within models: judge). `openai` is imported when a RemoteJudge is made.
"""

from __future__ import annotations

import json
import math
import os
import string
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple, Sequence
from urllib.parse import urlparse

from rlhfkit.core.errors import ConfigError, RlhfkitError
from rlhfkit.models.judge import (
    JudgeCache,
    Judgement,
    JudgeStats,
    JudgeTemplate,
    judge_messages,
    judge_pairs,
    judgement_key,
    load_template,
    same_answer_format,
    without_system,
)

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # a server here needs no real key (rlhfkit serve, vLLM by default)
PLACEHOLDER_KEY = "EMPTY"  # vLLM's convention for "no key"; the client refuses to start without one
ANSWER_ROOM = 8  # tokens after cot_max_tokens for the answer line and the label ("\nAnswer: 1" is ~4 tokens)
MAX_SHOWN = 300  # characters of an endpoint's error message quoted in ours


class Reading(NamedTuple):
    """One answered request: P(the reply shown first is better), the rationale, how P was read, tokens billed."""

    p_first: float
    rationale: str
    how: str  # "logprobs" (both labels shown), "bounded" (deviation 1) or "text" (deviation 2)
    tokens: int


class RemoteJudge:
    """An OpenAI-compatible chat endpoint as a pairwise judge (PairJudge; module docstring).

    base_url: the API root, e.g. http://127.0.0.1:8000/v1. model: the model name the endpoint serves.
    template: the judge prompt (default: the shipped pairwise.toml); its answer_prefix must be "".
    api_key_env: the environment variable holding the key (unset: a placeholder for localhost, else a ConfigError).
    cache: a JudgeCache or a path to one (None = no cache). max_concurrency: requests in flight at most.
    timeout_s: one attempt's limit. max_retries: the client's retries of 429, 5xx, timeouts and connection errors.
    top_logprobs: K, the most probable tokens the endpoint shows (OpenAI allows 20). cot_max_tokens: the rationale's
    length, as LocalJudge's (the request allows ANSWER_ROOM more for the answer line). cot_samples > 1: that many
    rationales per input sampled at cot_temperature, their readings averaged (self-consistency)."""

    def __init__(self, base_url: str, model: str, template: JudgeTemplate | None = None, *,
                 api_key_env: str = "OPENAI_API_KEY", cache: JudgeCache | str | Path | None = None,
                 max_concurrency: int = 4, timeout_s: float = 60.0, max_retries: int = 5, top_logprobs: int = 20,
                 cot_max_tokens: int = 96, cot_samples: int = 1, cot_temperature: float = 0.7):
        if (max_concurrency < 1 or timeout_s <= 0 or max_retries < 0 or top_logprobs < 1 or cot_max_tokens < 1
                or cot_samples < 1 or not cot_temperature > 0):
            raise ConfigError(f"remote judge: max_concurrency = {max_concurrency}, timeout_s = {timeout_s}, "
                              f"max_retries = {max_retries}, top_logprobs = {top_logprobs}, cot_max_tokens = "
                              f"{cot_max_tokens}, cot_samples = {cot_samples}, cot_temperature = {cot_temperature}; "
                              "give max_concurrency, top_logprobs, cot_max_tokens and cot_samples >= 1, timeout_s "
                              "and cot_temperature > 0 and max_retries >= 0")
        self.base_url = base_url.rstrip("/")
        host = urlparse(self.base_url).hostname
        if urlparse(self.base_url).scheme not in ("http", "https") or not host:
            raise ConfigError(f"remote judge: base_url = {base_url!r} is not an http(s) URL; give the API root, e.g. "
                              "http://127.0.0.1:8000/v1")
        if not model:
            raise ConfigError(f"remote judge: no model name for {self.base_url}; give the name it serves "
                              f"(GET {self.base_url}/models lists them)")
        self.model, self.api_key_env = model, api_key_env
        self.template = template if template is not None else load_template()
        if self.template.answer_prefix:
            raise ConfigError(f"{self.template.source}: answer_prefix = {self.template.answer_prefix!r}, but an "
                              "OpenAI-compatible judge is sent chat messages, which have no place for text the "
                              "assistant's answer starts with; set answer_prefix = \"\" (ask for the bare label in "
                              "the question) or judge with a local model")
        self.identity = f"openai:{self.base_url}:{model}"
        self.cache = JudgeCache(cache) if isinstance(cache, (str, Path)) else cache
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self.top_logprobs, self.cot_max_tokens = top_logprobs, cot_max_tokens
        self.cot_samples, self.cot_temperature = cot_samples, cot_temperature
        self.merge_system = False  # set once the endpoint has refused a system message (deviation 5)
        self.budget_param = "max_tokens"  # "max_completion_tokens" once the endpoint has asked for it
        self.stats = JudgeStats()
        try:
            import openai
        except ImportError:
            raise ConfigError("the remote judge needs the official OpenAI client: "
                              "pip install 'rlhfkit[openai]'") from None
        self._openai = openai
        self.client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key(host), max_retries=max_retries,
                                    timeout=timeout_s)

    def _api_key(self, host: str) -> str:
        key = os.environ.get(self.api_key_env, "")
        if key:
            return key
        if host in LOCAL_HOSTS:
            return PLACEHOLDER_KEY
        raise ConfigError(f"remote judge {self.base_url}: the environment variable {self.api_key_env} holding its API "
                          f"key is not set; export {self.api_key_env}=... (or name another variable with api_key_env)")

    def options(self, cot: bool) -> dict:
        """The settings besides the input that decide a judgement (part of its cache key)."""
        options = {"cot": cot, "cot_max_tokens": self.cot_max_tokens if cot else None,
                   "top_logprobs": self.top_logprobs}
        if cot and self.cot_samples > 1:  # (absent otherwise: the keys of greedy judgements stay as they were)
            options.update(cot_samples=self.cot_samples, cot_temperature=self.cot_temperature)
        return options

    def first_probs(self, items: Sequence[tuple], *, few_shot: bool = True, cot: bool = False,
                    template: JudgeTemplate | None = None) -> list[tuple[float, str]]:
        """(P(the reply shown first is better), rationale) for each (prompt, reply_1, reply_2), in input order; ""
        without cot. Cached inputs make no request; each distinct input is asked once; each answer is cached as
        it arrives."""
        if cot and not self.template.cot_instruction:
            raise ConfigError(f"{self.template.source}: chain of thought needs a cot_instruction (what to write "
                              "before the answer); add one to the template or judge without chain of thought")
        tpl = same_answer_format(self.template, template)  # another question (a principle's), the same answers
        conversations = [judge_messages(tpl, p, r1, r2, few_shot, cot) for p, r1, r2 in items]
        options, template_hash = self.options(cot), tpl.content_hash
        keys = [judgement_key(self.identity, template_hash, json.dumps(c, ensure_ascii=False), options)
                for c in conversations]
        done = self.cache.get(keys) if self.cache is not None else {}
        todo = [k for k in dict.fromkeys(keys) if k not in done]
        self.stats.cached += len(keys) - len(todo)
        conversation_of = dict(zip(keys, conversations))

        def keep(key: str, reading: Reading) -> None:  # the calling thread only: stats and SQLite are not shared
            done[key] = (reading.p_first, reading.rationale)
            self.stats.calls += 1
            self.stats.judged += 1
            self.stats.tokens += reading.tokens
            self.stats.bounded += reading.how == "bounded"
            self.stats.from_text += reading.how == "text"
            if self.cache is not None:
                self.cache.put([(key, reading.p_first, reading.rationale)])  # committed: a later failure keeps it

        if todo:
            pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(todo)), thread_name_prefix="judge")
            futures: dict[Future, str] = {pool.submit(self._ask, conversation_of[k], cot, int(k[:15], 16)): k
                                          for k in todo}
            try:
                for future in as_completed(futures):
                    keep(futures[future], future.result())
            except BaseException as e:
                # a failed request: those in flight finish and their answers are kept; Ctrl-C does not wait for them
                pool.shutdown(wait=isinstance(e, Exception), cancel_futures=True)
                for future, key in futures.items():
                    if key not in done and future.done() and not future.cancelled() and future.exception() is None:
                        keep(key, future.result())
                raise
            pool.shutdown()
        return [done[k] for k in keys]

    def judge(self, prompts: Sequence, replies_a: Sequence, replies_b: Sequence, *, swap: bool = True,
              few_shot: bool = True, cot: bool = False) -> list[Judgement]:
        """judge_pairs with this judge (a Judgement per pair)."""
        return judge_pairs(self, prompts, replies_a, replies_b, swap=swap, few_shot=few_shot, cot=cot)

    # ------------------------------------------------------------------------------------------------
    # One request (on a worker thread)

    def _ask(self, messages: list[dict], cot: bool, seed: int) -> Reading:
        """One chat completion with log-probs, read as P(first better): greedy, or with self-consistency
        cot_samples choices sampled with `seed` (the input's), their readings averaged."""
        n = self.cot_samples if cot else 1
        sampled = {"n": n, "temperature": self.cot_temperature, "seed": seed % 2**31} if n > 1 else {"temperature": 0}

        budget = self.cot_max_tokens + ANSWER_ROOM if cot else 1

        def create():
            conversation = without_system(messages) if self.merge_system else messages
            return self.client.chat.completions.create(
                model=self.model, messages=conversation, logprobs=True, top_logprobs=self.top_logprobs,
                **{self.budget_param: budget}, **sampled)

        try:
            for _ in range(3):  # at most two adaptations to what the endpoint refuses, each once per judge
                try:
                    response = create()
                    break
                except self._openai.BadRequestError as e:
                    said = str(e).lower()
                    if not self.merge_system and messages[0]["role"] == "system" and "system" in said:
                        self.merge_system = True  # deviation 5: its chat template refuses a system role
                    elif self.budget_param == "max_tokens" and "max_completion_tokens" in said:
                        self.budget_param = "max_completion_tokens"  # OpenAI's newer models refuse max_tokens
                    else:
                        raise
        except self._openai.OpenAIError as e:
            raise self._failure(e) from None
        if len(response.choices) < n:
            raise RlhfkitError(f"judge endpoint {self.base_url} answered with {len(response.choices)} choice(s) for "
                               f"n = {n}; check that it serves chat completions for {self.model!r}"
                               + (" and several choices per request (or set judge.cot_samples = 1)" if n > 1 else ""))
        tokens = response.usage.total_tokens if response.usage is not None else 0
        readings = [self._read(choice, cot) for choice in response.choices[:n]]
        hows = {how for _, _, how in readings}
        how = "text" if "text" in hows else "bounded" if "bounded" in hows else "logprobs"  # the least exact
        return Reading(sum(p for p, _, _ in readings) / n, "\n~~~\n".join(r for _, r, _ in readings), how, tokens)

    def _read(self, choice, cot: bool) -> tuple[float, str, str]:
        """(P(first better), rationale, how) of one choice: the labels' log-probs at the answer (after the answer
        line with cot), else the answer's text (deviations 1 and 2)."""
        steps = list(choice.logprobs.content or []) if choice.logprobs is not None else []
        text = choice.message.content or ""
        labels = self.template.labels
        if not cot:
            rationale, step, answer = "", 0 if steps else None, text
        else:
            rationale, step, answer = answer_line(steps, text, self.template.cot_answer_prefix.strip())
        found = label_probability(steps[step], labels) if step is not None else None
        if found is not None:
            return found[0], rationale, found[1]
        return text_probability(answer, labels), rationale, "text"

    def _failure(self, e: Exception) -> RlhfkitError:
        """What went wrong with the endpoint once the client gave up, and what to check (never the raw exception)."""
        o, url = self._openai, self.base_url
        tries = f"after {self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'}"
        if isinstance(e, o.APITimeoutError):
            return RlhfkitError(f"judge endpoint {url} did not answer within timeout_s = {self.timeout_s} s, {tries}; "
                                "check that the server is up and not overloaded, or raise timeout_s")
        if isinstance(e, o.APIConnectionError):
            cause = e.__cause__ or e.__context__
            return RlhfkitError(f"judge endpoint {url} could not be reached {tries} ({type(cause or e).__name__}); "
                                "check that the server is running and that base_url (scheme, host, port, the /v1 "
                                "path) is right")
        if not isinstance(e, o.APIStatusError):
            return RlhfkitError(f"judge endpoint {url} gave an answer the OpenAI client could not read "
                                f"({type(e).__name__}: {str(e)[:MAX_SHOWN]}); check that it is OpenAI-compatible")
        status, said = e.status_code, str(getattr(e, "message", e))[:MAX_SHOWN]
        if status in (401, 403):
            return RlhfkitError(f"judge endpoint {url} refused the API key ({status}: {said}); check the key in the "
                                f"environment variable {self.api_key_env}")
        if status == 404:
            return RlhfkitError(f"judge endpoint {url}: 404 ({said}); check the model name {self.model!r} (GET "
                                f"{url}/models lists what it serves) and that base_url ends with the API root (/v1)")
        if status == 429 or status >= 500:
            return RlhfkitError(f"judge endpoint {url} still failing {tries} ({status}: {said}); check the server's "
                                "log or the account's rate limits, lower max_concurrency, or raise max_retries")
        return RlhfkitError(f"judge endpoint {url} refused the request ({status}: {said}); check that it serves chat "
                            f"completions with logprobs and top_logprobs = {self.top_logprobs} (lower top_logprobs "
                            "if it allows fewer), and that its chat template accepts a system message")


# ----------------------------------------------------------------------------------------------------
# Reading an answer (pure functions of the response's log-probs and text)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def label_probability(step, labels: tuple[str, str]) -> tuple[float, str] | None:
    """(P(first label), how) at one generated position (an OpenAI ChatCompletionTokenLogprob): the softmax over the
    two labels' log-probs among the position's top tokens and the token generated there, each label's spellings
    summed (deviation 3); "bounded" when one label is missing (deviation 1); None when neither is shown."""
    shown = {t.token: t.logprob for t in step.top_logprobs}
    shown.setdefault(step.token, step.logprob)  # the generated token: in the top list at temperature 0 anyway
    found = [[lp for token, lp in shown.items() if token.strip() == label] for label in labels]
    if not found[0] and not found[1]:
        return None
    if found[0] and found[1]:
        l1, l2 = _logsumexp(found[0]), _logsumexp(found[1])
        how = "logprobs"
    else:
        if not step.top_logprobs:
            return None  # nothing to bound the missing label by
        floor = min(t.logprob for t in step.top_logprobs)  # the K-th most probable: the missing label is at most it
        l1 = _logsumexp(found[0]) if found[0] else floor
        l2 = _logsumexp(found[1]) if found[1] else floor
        how = "bounded"
    return 1.0 / (1.0 + math.exp(l2 - l1)), how


def text_probability(answer: str, labels: tuple[str, str]) -> float:
    """P(first label) from an answer's text (deviation 2): its first word, as written or without punctuation around
    it, is the first label 1.0, the second 0.0, anything else 0.5."""
    words = answer.split()
    if not words:
        return 0.5
    for word in (words[0], words[0].strip(string.punctuation)):
        if word in labels:
            return 1.0 if word == labels[0] else 0.0
    return 0.5


def _token_bytes(step) -> bytes:
    return bytes(step.bytes) if step.bytes is not None else step.token.encode("utf-8")


def answer_line(steps: list, text: str, marker: str) -> tuple[str, int | None, str]:
    """(rationale, step, after) of a chain-of-thought reply: the text before the first `marker` (the answer line's
    text), the index of the first generated position after the marker that is not whitespace alone, whose top
    tokens hold the label (None when there is none: no marker, a token that runs from the marker into the label, or
    the reply ending there), and the text after the marker (for deviation 2). Positions are found on the tokens'
    bytes, so a token holding part of a character does not shift them."""
    cut = text.find(marker) if marker else -1
    rationale = text[:cut] if cut >= 0 else text
    after = text[cut + len(marker):] if cut >= 0 else ""
    generated = b"".join(_token_bytes(s) for s in steps)
    at = generated.find(marker.encode("utf-8")) if marker else -1
    if at < 0:
        return rationale, None, after
    end, position = at + len(marker.encode("utf-8")), 0
    for i, step in enumerate(steps):
        position += len(_token_bytes(step))
        if position >= end:
            if generated[end:position].strip():
                return rationale, None, after  # the token runs from the marker into the label
            label = i + 1
            while label < len(steps) and not _token_bytes(steps[label]).strip():
                label += 1  # the space after "Answer:" written as a token of its own
            return rationale, label if label < len(steps) else None, after
    return rationale, None, after
