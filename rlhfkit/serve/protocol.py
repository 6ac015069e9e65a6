"""OpenAI's wire format for `rlhfkit serve`: the request bodies (typed, strict), their checks against the model and
the server's bounds, and the response bodies.

    job = completion_job(request, engine, limits)      # or chat_job: prompts as ids, n, max_tokens, sampling, ...
    choices = engine.generate(job.prompts, ...)         # rlhfkit.serve.engine
    body = completion_body(name, job, choices, engine)  # or chat_body: OpenAI's JSON

Every parameter of OpenAI's two endpoints is in one of three groups (docs/serve.md has the table):
- supported: model, prompt / messages, max_tokens (chat: max_completion_tokens too), temperature, top_p, n, stop,
  seed, logprobs (completions: an int k; chat: true with top_logprobs k); vLLM's extras top_k, min_p and
  repetition_penalty (rlhfkit's SamplingParams);
- accepted at their no-op value only: stream (false), echo (false), best_of (1 or n), suffix (null),
  frequency_penalty and presence_penalty (0), logit_bias ({}), response_format ({"type": "text"}); any other value
  is a 400 naming the parameter, never silently ignored; `user` is accepted and has no effect;
- anything else (tools, functions, audio, ...) is a 400 "unsupported parameter", since a request that asks for
  something the server would not do must not get an answer that looks as if it had.

Layer: serve (imports serve.engine, models, core).
"""

from __future__ import annotations

import codecs
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.models.sampling import SamplingParams
from rlhfkit.serve.engine import Choice, Engine

MAX_MESSAGE = 400  # characters of an error message: no answer echoes a large input back
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI reports a vanishing probability as -9999


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class APIError(Exception):
    """A refusal in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, clip(message), param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param, code)


@dataclass(frozen=True)
class Limits:
    """The server's bounds on one request (rlhfkit.serve.app.ServeConfig holds the values)."""

    max_n: int = 16  # choices per prompt
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_top_logprobs: int = 20  # OpenAI's bound for chat's top_logprobs (5 for legacy logprobs; vLLM allows 20)
    max_stop: int = 4  # stop strings (OpenAI's bound)
    max_stop_chars: int = 100  # characters of one stop string (the sampler decodes ~4 tokens a character each step)
    completion_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    chat_max_tokens: int = 512  # /v1/chat/completions without it: this, or what the context leaves if less


# ----------------------------------------------------------------------------------------------------
# Request bodies. strict: a string is never taken for a number, nor a bool for an int.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Sampled(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # [0, 2]; 0 = greedy; default 1
    top_p: float | None = None  # (0, 1]; default the model's generation_config.json, else 1
    top_k: int | None = None  # vLLM's extra: 0 or -1 = off
    min_p: float | None = None  # vLLM's extra: [0, 1)
    repetition_penalty: float | None = None  # vLLM's extra: > 0, 1 = off
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None  # false only
    frequency_penalty: float | None = None  # 0 only
    presence_penalty: float | None = None  # 0 only
    logit_bias: dict[str, float] | None = None  # {} only
    user: str | None = None  # no effect


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # k: each token's log-prob and the k most probable
    echo: bool | None = None  # false only
    best_of: int | None = None  # 1 or n only
    suffix: str | None = None  # null only


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # no effect (chat templates do not read it)


class ChatRequest(_Sampled):
    messages: list[Message]
    max_completion_tokens: int | None = None  # wins over max_tokens (OpenAI's newer name)
    logprobs: bool | None = None
    top_logprobs: int | None = None  # needs logprobs = true
    response_format: dict | None = None  # {"type": "text"} only


# What a parameter must be, for the type errors of the union-typed ones (pydantic lists every branch).
EXPECTED = {
    "prompt": "give a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "give a string or a list of strings",
    "messages": "give a list of {\"role\", \"content\"} messages; roles: system, developer, user, assistant; content: "
                "a string or a list of {\"type\": \"text\", \"text\"} parts",
}


def validation_error(errors: list[dict]) -> APIError:
    """One 400 for pydantic's (or the JSON decoder's) errors, naming the first parameter at fault."""
    first = errors[0] if errors else {"type": "invalid", "loc": ("body",), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})",
                        None, "invalid_json")
    if not loc:
        return APIError(400, "the body must be a JSON object of the endpoint's parameters", None, "invalid_request")
    param = clip(loc[0], 60)
    if kind == "extra_forbidden" and len(loc) == 1:
        return APIError(400, f"unsupported parameter: {param} (docs/serve.md lists what rlhfkit serve supports)",
                        param, "unsupported_parameter")
    if kind == "missing" and len(loc) == 1:
        return APIError(400, f"{param}: required", param, "missing_required_parameter")
    if param in EXPECTED:
        return bad(param, EXPECTED[param], "invalid_type")
    where = ".".join(clip(p, 40) for p in loc)
    return APIError(400, f"{where}: {clip(str(first.get('msg', 'invalid')), 200)}", param, "invalid_type")


# ----------------------------------------------------------------------------------------------------
# Checks: a request becomes a Job the engine runs


@dataclass
class Job:
    prompts: list[list[int]]  # token ids, one list per prompt
    n: int
    max_tokens: int
    temperature: float
    sampling: SamplingParams
    seed: int
    top_logprobs: int | None  # None: no log-probs


def check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(404, f"The model `{clip(name, 100)}` does not exist: this server serves `{served}` "
                            "(GET /v1/models)", "model", "model_not_found")


def _no_op_values(req: _Sampled) -> None:
    """The parameters accepted only at the value that asks for nothing."""
    if req.stream:
        raise bad("stream", "streaming is not supported; send stream=false (or leave it out)", "unsupported_value")
    for param in ("frequency_penalty", "presence_penalty"):
        if getattr(req, param) not in (None, 0):
            raise bad(param, "only 0 is supported; rlhfkit's sampler has repetition_penalty (> 1 makes tokens "
                             "already in the text less likely) instead", "unsupported_value")
    if req.logit_bias:
        raise bad("logit_bias", "not supported; send {} or leave it out", "unsupported_value")


def _sampling(req: _Sampled, engine: Engine, limits: Limits) -> tuple[float, SamplingParams, int, int]:
    """(temperature, SamplingParams, n, seed): each parameter given, else the model's generation_config.json
    default (engine.defaults), else off; temperature 1 unless given (rlhfkit never takes it from the file)."""
    d = engine.defaults
    n = 1 if req.n is None else req.n
    if not 1 <= n <= limits.max_n:
        raise bad("n", f"{n}: give 1 to {limits.max_n} (the server's --max-n)")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0 <= temperature <= 2:
        raise bad("temperature", f"{temperature}: give a value in [0, 2] (0 = greedy)")
    top_p = d.top_p if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise bad("top_p", f"{top_p}: give a value in (0, 1] (1 = off)")
    top_k = d.top_k if req.top_k is None else req.top_k
    if top_k < -1:
        raise bad("top_k", f"{top_k}: give a number of tokens, or 0 or -1 for off")
    min_p = d.min_p if req.min_p is None else req.min_p
    if not 0 <= min_p < 1:
        raise bad("min_p", f"{min_p}: give a value in [0, 1) (0 = off)")
    penalty = d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty
    if not 0 < penalty <= 10:
        raise bad("repetition_penalty", f"{penalty}: give a value in (0, 10] (1 = off)")
    stop = d.stop if req.stop is None else ((req.stop,) if isinstance(req.stop, str) else tuple(req.stop))
    if len(stop) > limits.max_stop:
        raise bad("stop", f"{len(stop)} stop strings: give at most {limits.max_stop}")
    if any(not 0 < len(s) <= limits.max_stop_chars for s in stop):
        raise bad("stop", f"each stop string needs 1 to {limits.max_stop_chars} characters")
    seed = secrets.randbits(63) if req.seed is None else req.seed
    return temperature, SamplingParams(max(top_k, 0), top_p, min_p, penalty, stop), n, seed


def _max_tokens(given: int | None, param: str, prompts: list[list[int]], engine: Engine, default: int,
                prompt_param: str) -> int:
    """The reply's token budget: `given`, or `default` capped by what the context leaves; prompt + reply within the
    model's context (OpenAI's `context_length_exceeded`)."""
    if min(len(p) for p in prompts) == 0:
        raise bad(prompt_param, "an empty prompt: give at least one token")
    longest = max(len(p) for p in prompts)
    if longest >= engine.context:
        raise APIError(400, f"{prompt_param}: the prompt is {longest} tokens; this model's context is {engine.context} "
                            "tokens, which must hold the prompt and at least one reply token",
                       prompt_param, "context_length_exceeded")
    if given is None:
        return min(default, engine.context - longest)
    if given < 1:
        raise bad(param, f"{given}: give at least 1")
    if longest + given > engine.context:
        raise APIError(400, f"{param}: this model's context is {engine.context} tokens; the prompt is {longest} "
                            f"tokens and {param} = {given} asks for {given} more; give at most "
                            f"{engine.context - longest}", param, "context_length_exceeded")
    return given


def completion_job(req: CompletionRequest, engine: Engine, limits: Limits) -> Job:
    _no_op_values(req)
    if req.echo:
        raise bad("echo", "echo is not supported; send echo=false (or leave it out)", "unsupported_value")
    if req.suffix is not None:
        raise bad("suffix", "not supported; leave it out", "unsupported_value")
    temperature, sampling, n, seed = _sampling(req, engine, limits)
    if req.best_of is not None and req.best_of not in (1, n):
        raise bad("best_of", f"{req.best_of}: only 1 (or n) is supported; rank samples yourself", "unsupported_value")
    prompts = _completion_prompts(req.prompt, engine, limits)
    k = req.logprobs
    if k is not None and not 0 <= k <= limits.max_top_logprobs:
        raise bad("logprobs", f"{k}: give 0 to {limits.max_top_logprobs} (the number of most probable tokens)")
    max_tokens = _max_tokens(req.max_tokens, "max_tokens", prompts, engine, limits.completion_max_tokens, "prompt")
    return Job(prompts, n, max_tokens, temperature, sampling, seed, k)


def _completion_prompts(prompt, engine: Engine, limits: Limits) -> list[list[int]]:
    """The prompt as lists of ids: a string, a list of strings, token ids, or a list of lists of ids."""
    if isinstance(prompt, str):
        prompts = [engine.encode_text(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [engine.encode_text(p) if isinstance(p, str) else list(p) for p in prompt]
    if not prompts:
        raise bad("prompt", "an empty list: give at least one prompt")
    if len(prompts) > limits.max_prompts:
        raise bad("prompt", f"{len(prompts)} prompts: give at most {limits.max_prompts} in one request")
    if any(not 0 <= i < engine.vocab_size for p in prompts for i in p):
        raise bad("prompt", f"a token id outside this model's vocabulary (0 to {engine.vocab_size - 1})")
    return prompts


def chat_job(req: ChatRequest, engine: Engine, limits: Limits) -> Job:
    _no_op_values(req)
    if req.response_format not in (None, {"type": "text"}):
        raise bad("response_format", "only {\"type\": \"text\"} is supported", "unsupported_value")
    temperature, sampling, n, seed = _sampling(req, engine, limits)
    if not engine.has_chat_template:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions with a text prompt, or "
                            "set tokenizer.chat_template and save it into the model directory", "messages",
                       "no_chat_template")
    if not req.messages:
        raise bad("messages", "an empty list: give at least one message")
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                for m in req.messages]
    try:
        prompt = engine.encode_chat(messages)
    except RlhfkitError as e:  # the template refused the conversation (e.g. roles that do not alternate)
        raise bad("messages", str(e), "invalid_messages") from None
    k = None
    if req.top_logprobs is not None and not req.logprobs:
        raise bad("top_logprobs", "needs logprobs = true")
    if req.logprobs:
        k = 0 if req.top_logprobs is None else req.top_logprobs
        if not 0 <= k <= limits.max_top_logprobs:
            raise bad("top_logprobs", f"{k}: give 0 to {limits.max_top_logprobs}")
    given, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                    else (req.max_tokens, "max_tokens"))
    max_tokens = _max_tokens(given, param, [prompt], engine, limits.chat_max_tokens, "messages")
    return Job([prompt], n, max_tokens, temperature, sampling, seed, k)


# ----------------------------------------------------------------------------------------------------
# Response bodies


def _usage(job: Job, choices: list[list[Choice]]) -> dict:
    prompt = sum(len(p) for p in job.prompts)  # each prompt once, however many choices it has (as OpenAI counts)
    completion = sum(len(c.token_ids) for row in choices for c in row)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def _legacy_logprobs(choice: Choice, engine: Engine) -> dict:
    """The completions endpoint's logprobs: parallel lists, each step's top tokens as {text: logprob}, which holds
    the sampled token too (OpenAI: "up to logprobs + 1 elements")."""
    tokens, offsets, tops, chars = [], [], [], 0
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # a character split across tokens counts once
    for token_id, top in zip(choice.token_ids, choice.top_logprobs):
        text, raw = engine.token(token_id)
        tokens.append(text)
        offsets.append(chars)  # characters of the reply before this token
        chars += len(utf8.decode(bytes(raw)))
        entry = {engine.token(i)[0]: _lp(v) for i, v in top}
        entry.setdefault(text, _lp(choice.logprobs[len(tops)]))
        tops.append(entry)
    return {"tokens": tokens, "token_logprobs": [_lp(v) for v in choice.logprobs], "top_logprobs": tops,
            "text_offset": offsets}


def _chat_logprobs(choice: Choice, engine: Engine) -> dict:
    """The chat endpoint's logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    content = []
    for token_id, value, top in zip(choice.token_ids, choice.logprobs, choice.top_logprobs):
        text, raw = engine.token(token_id)
        content.append({"token": text, "logprob": _lp(value), "bytes": raw,
                        "top_logprobs": [{"token": engine.token(i)[0], "logprob": _lp(v), "bytes": engine.token(i)[1]}
                                         for i, v in top]})
    return {"content": content, "refusal": None}


def completion_body(name: str, job: Job, choices: list[list[Choice]], engine: Engine) -> dict:
    flat = [c for row in choices for c in row]  # prompt i's choices are i*n .. i*n + n - 1, as OpenAI orders them
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": name,
        "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                     "logprobs": None if job.top_logprobs is None else _legacy_logprobs(c, engine)}
                    for i, c in enumerate(flat)],
        "usage": _usage(job, choices), "system_fingerprint": None,
    }


def chat_body(name: str, job: Job, choices: list[list[Choice]], engine: Engine) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                     "finish_reason": c.finish_reason,
                     "logprobs": None if job.top_logprobs is None else _chat_logprobs(c, engine)}
                    for i, c in enumerate(choices[0])],
        "usage": _usage(job, choices), "system_fingerprint": None,
    }


def models_body(name: str, engine: Engine) -> dict:
    return {"object": "list", "data": [model_card(name, engine)]}


def model_card(name: str, engine: Engine) -> dict:
    return {"id": name, "object": "model", "created": engine.created, "owned_by": "rlhfkit",
            "max_model_len": engine.context}
