"""The AI judge over HTTP (rlhfkit/models/judge_remote.py) against real servers on 127.0.0.1.

Oracle: LocalJudge on the same model directory, served by `rlhfkit serve`: the same P(first better) for every
ordered comparison, with and without few-shot, through position swap, and the same tokens read (so the conversation
the endpoint renders is the judge's own input). The rest runs against a tiny endpoint defined here, whose answers
and failures are crafted per request: the cache (a rerun with the server stopped), the client's retries, the error
messages, the bound on requests in flight, and each fallback for labels the endpoint does not show.

The served judge leans to its labels (ln_f's bias and the labels' embeddings share one large direction), so both
labels are always among the top log-probs while their difference, the random rest, spreads P over (0, 1).
"""

import math
import re
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from fastapi import FastAPI  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from rlhfkit.core.errors import ConfigError, RlhfkitError  # noqa: E402
from rlhfkit.models.judge import (  # noqa: E402
    JudgeCache,
    LocalJudge,
    encode_text,
    judge_messages,
    load_template,
    render,
    template_from_dict,
    without_system,
)
from rlhfkit.models.judge_remote import ANSWER_ROOM, RemoteJudge  # noqa: E402
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy  # noqa: E402
from rlhfkit.serve.app import create_app  # noqa: E402
from rlhfkit.data.contract import read_comparisons  # noqa: E402
from rlhfkit.pipeline.config import load_config  # noqa: E402
from rlhfkit.pipeline.stages import run_stage  # noqa: E402
from test_rlaif import MICRO, judge_setup  # noqa: E402, F401 (judge_setup: a fixture, the SFT model)

NAME = "judge"
TEMPLATE = template_from_dict({
    "preamble": "Pick the better reply.",
    "question": "Q: {prompt}\nA1: {reply_1}\nA2: {reply_2}\nBetter one?",
    "cot_instruction": "Think first.",
    "cot_answer_prefix": "\nSo ",
    "exemplars": [{"prompt": "hello", "reply_1": "hello world", "reply_2": "dog", "answer": "1",
                   "rationale": "it greets"}],
}, "test.toml")
PROMPTS = ["the quick brown fox", "two plus two", "hello", "what is the lazy dog doing over there now", "four", "hi"]
REPLIES_A = ["jumps", "four .", "hello world , hello user", "it sleeps", "two plus two is four", "hello"]
REPLIES_B = ["the lazy dog jumps over the fox", "five", "dog", "over the dog", "no", "the quick brown fox says hi"]


@contextmanager
def serving(app):
    """uvicorn on 127.0.0.1, a free port (a socket bound here and handed over), in a thread; yields the API root."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def closed_port_url() -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/v1"


# ----------------------------------------------------------------------------------------------------
# 1. The oracle: LocalJudge on the model `rlhfkit serve` serves


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, chat_tokenizer):
    """A tiny GPT-2 with the ChatML tokenizer, every weight matrix redrawn at std 0.3, leaning to the labels "1" and
    "2": their embeddings (tied to the output) get 3.0 in dimension 0, and ln_f's bias 5.0 there, so each output
    adds ~15 to both labels' logits and ~N(0, 1.5) to the others'."""
    path = tmp_path_factory.mktemp("remote-judge")
    model = build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 512), chat_tokenizer, seed=0)
    labels = [chat_tokenizer.convert_tokens_to_ids(label) for label in TEMPLATE.labels]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.transformer.wte.weight[labels, 0] = 3.0
        model.transformer.ln_f.bias[0] = 5.0
    model.save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(judge_dir):
    with serving(create_app(judge_dir, {"device": "cpu", "precision": "fp32", "model_name": NAME})) as url:
        yield url


@pytest.mark.parametrize("few_shot", [True, False])
def test_the_remote_judge_equals_the_local_judge_on_a_served_model(judge_dir, served, few_shot):
    local = LocalJudge(judge_dir, TEMPLATE)
    remote = RemoteJudge(served, NAME, TEMPLATE, max_concurrency=3)
    want = local.judge(PROMPTS, REPLIES_A, REPLIES_B, swap=True, few_shot=few_shot)
    got = remote.judge(PROMPTS, REPLIES_A, REPLIES_B, swap=True, few_shot=few_shot)
    assert [j.p_ab for j in got] == pytest.approx([j.p_ab for j in want], abs=1e-4)
    assert [j.p_ba for j in got] == pytest.approx([j.p_ba for j in want], abs=1e-4)
    assert [j.p for j in got] == pytest.approx([j.p for j in want], abs=1e-4)
    shown = [j.p_ab for j in want] + [j.p_ba for j in want]
    assert max(shown) - min(shown) > 0.3  # the oracle is not a row of equal values
    assert remote.stats.calls == remote.stats.judged == 2 * len(PROMPTS)
    assert remote.stats.bounded == remote.stats.from_text == 0  # both labels were read from the log-probs
    # the endpoint read exactly the judge's own input: its prompt tokens (+ the one reply token) are render's ids
    orders = list(zip(PROMPTS, REPLIES_A, REPLIES_B)) + list(zip(PROMPTS, REPLIES_B, REPLIES_A))
    read = sum(len(encode_text(local.tokenizer, render(TEMPLATE, local.tokenizer, *o, few_shot=few_shot))) + 1
               for o in orders)
    assert remote.stats.tokens == read


def test_the_served_endpoint_refusals_name_what_to_check(served):
    with pytest.raises(RlhfkitError, match=r"404.*model name 'other'"):
        RemoteJudge(served, "other", TEMPLATE, max_retries=0).first_probs([("a", "b", "c")])
    with pytest.raises(RlhfkitError, match=rf"{served} refused the request \(400.*top_logprobs = 50"):
        RemoteJudge(served, NAME, TEMPLATE, max_retries=0, top_logprobs=50).first_probs([("a", "b", "c")])


# ----------------------------------------------------------------------------------------------------
# 2. A crafted endpoint (answers, failures and delays per request): what is sent, and the cache


def step(token: str, logprob: float, top: list[tuple[str, float]]) -> dict:
    """One generated position of a chat completion's logprobs.content."""
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]}


def greedy(tokens: list[str], tops: dict[int, list[tuple[str, float]]] | None = None) -> dict:
    """A reply of `tokens`, each the most probable at its position; `tops` adds other tokens at some positions."""
    tops = tops or {}
    return {"text": "".join(tokens),
            "steps": [step(t, -0.01, [(t, -0.01)] + tops.get(i, [])) for i, t in enumerate(tokens)]}


def labels_at(p: float) -> dict:
    """A one-token answer "1" whose top log-probs give P(first) = p over the labels."""
    return {"text": "1", "steps": [step("1", math.log(p), [("1", math.log(p)), ("2", math.log(1 - p)),
                                                          ("x", math.log(1e-6))])]}


def question(body: dict) -> str:
    """The {prompt} of the comparison asked (the last user message)."""
    return re.match(r"Q: (.*)\n", body["messages"][-1]["content"]).group(1)


class Endpoint:
    """A /v1/chat/completions answering answer(body) -> {"text", "steps"}; fail(n) -> an HTTP status for the n-th
    request (0-based) or None (changeable while it serves); delay(body) seconds before answering. Keeps the bodies
    and the most requests in flight at once."""

    def __init__(self, answer, fail=lambda n: None, delay=lambda body: 0.0):
        self.fail, self.bodies, self.in_flight, self.most_in_flight = fail, [], 0, 0
        lock = threading.Lock()
        self.app = FastAPI()

        @self.app.post("/v1/chat/completions")
        def chat(body: dict):  # a plain function: FastAPI runs it in its thread pool, so requests overlap
            with lock:
                n = len(self.bodies)
                self.bodies.append(body)
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                time.sleep(delay(body))
                status = self.fail(n)
                if status is not None:  # Retry-After in ms: the client's backoff, made short for the test
                    return JSONResponse({"error": {"message": "crafted failure", "type": "server_error"}},
                                        status_code=status, headers={"retry-after-ms": "1"})
                replies = answer(body)
                replies = replies if isinstance(replies, list) else [replies]  # a list: one reply per choice
                generated = sum(len(r["steps"]) for r in replies)
                return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": i, "finish_reason": "stop", "logprobs": {"content": r["steps"]},
                                     "message": {"role": "assistant", "content": r["text"]}}
                                    for i, r in enumerate(replies)],
                        "usage": {"prompt_tokens": 10, "completion_tokens": generated,
                                  "total_tokens": 10 + generated}}
            finally:
                with lock:
                    self.in_flight -= 1


def by_prompt(body: dict) -> dict:
    """Prompts "p=0.37": P(first) = 0.37."""
    return labels_at(float(question(body)[2:]))


P = [0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.3, 0.6, 0.9, 0.2, 0.45, 0.8]
ITEMS = [(f"p={p}", "a", "b") for p in P]


def test_requests_are_what_render_builds_and_the_cache_answers_a_rerun_with_the_server_stopped(tmp_path):
    endpoint, cache = Endpoint(by_prompt), tmp_path / "judgements.sqlite"
    with serving(endpoint.app) as url:
        first = RemoteJudge(url, NAME, TEMPLATE, cache=cache, top_logprobs=5)
        got = first.first_probs(ITEMS, few_shot=True)
    assert [p for p, _ in got] == pytest.approx(P) and all(r == "" for _, r in got)
    body = endpoint.bodies[0]
    assert body["messages"] == judge_messages(TEMPLATE, *ITEMS[P.index(float(question(body)[2:]))], few_shot=True)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"]) == (1, 0, True, 5)
    assert len(endpoint.bodies) == len(ITEMS) == len(JudgeCache(cache))
    assert first.stats.tokens == 11 * len(ITEMS)  # usage.total_tokens
    # the server is stopped: a rerun is answered from the cache alone, and repeats within a call are asked once
    again = RemoteJudge(url, NAME, TEMPLATE, cache=cache, top_logprobs=5, max_retries=0)
    assert again.first_probs(ITEMS + ITEMS[:2], few_shot=True) == got + got[:2]
    assert again.stats.cached == len(ITEMS) + 2 and again.stats.calls == again.stats.judged == 0
    with pytest.raises(RlhfkitError, match="could not be reached"):  # without few-shot: another input, a miss
        again.first_probs(ITEMS[:1], few_shot=False)


def test_a_run_that_fails_keeps_every_answer_it_received(tmp_path):
    cache, endpoint = tmp_path / "judgements.sqlite", Endpoint(by_prompt, fail=lambda n: 500 if n >= 3 else None)
    with serving(endpoint.app) as url:
        with pytest.raises(RlhfkitError, match=rf"{url} still failing after 0 retries \(500"):
            RemoteJudge(url, NAME, TEMPLATE, cache=cache, max_concurrency=1, max_retries=0).first_probs(ITEMS)
        assert len(JudgeCache(cache)) == 3
        asked = len(endpoint.bodies)  # 4, or 5 when the worker took the next input before the failure was seen
        endpoint.fail = lambda n: None  # the server recovers; a rerun asks only what is not cached
        resumed = RemoteJudge(url, NAME, TEMPLATE, cache=cache, max_concurrency=1)
        assert [p for p, _ in resumed.first_probs(ITEMS)] == pytest.approx(P)
    assert len(endpoint.bodies) == asked + len(ITEMS) - 3 and resumed.stats.cached == 3


# ----------------------------------------------------------------------------------------------------
# 3-5. Retries, errors, the bound on requests in flight


def test_the_client_retries_a_flaky_server_and_an_always_failing_one_is_an_error_naming_it():
    flaky = Endpoint(by_prompt, fail=lambda n: (500, 429)[n] if n < 2 else None)
    with serving(flaky.app) as url:
        (p, _), = RemoteJudge(url, NAME, TEMPLATE, max_retries=2).first_probs(ITEMS[:1])
    assert p == pytest.approx(P[0]) and len(flaky.bodies) == 3  # two failures, then the answer
    broken = Endpoint(by_prompt, fail=lambda n: 503)
    with serving(broken.app) as url:
        with pytest.raises(RlhfkitError) as e:
            RemoteJudge(url, NAME, TEMPLATE, max_retries=2).first_probs(ITEMS[:1])
    assert len(broken.bodies) == 3 and url in str(e.value) and "after 2 retries (503" in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no openai traceback chained


def test_an_unreachable_endpoint_is_an_error_naming_it():
    url = closed_port_url()
    with pytest.raises(RlhfkitError, match=rf"{url} could not be reached after 0 retries.*base_url"):
        RemoteJudge(url, NAME, TEMPLATE, max_retries=0).first_probs(ITEMS[:1])


def test_a_slow_endpoint_times_out_with_an_error_naming_it():
    with serving(Endpoint(by_prompt, delay=lambda body: 0.6).app) as url:
        with pytest.raises(RlhfkitError, match=rf"{url} did not answer within timeout_s = 0.2 s"):
            RemoteJudge(url, NAME, TEMPLATE, max_retries=0, timeout_s=0.2).first_probs(ITEMS[:1])


def test_the_api_key_comes_from_its_variable_and_a_remote_host_needs_it(monkeypatch):
    monkeypatch.delenv("RLHFKIT_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match="RLHFKIT_TEST_JUDGE_KEY"):
        RemoteJudge("https://judge.example.com/v1", "big", TEMPLATE, api_key_env="RLHFKIT_TEST_JUDGE_KEY")
    local = RemoteJudge("http://localhost:8000/v1", "x", TEMPLATE, api_key_env="RLHFKIT_TEST_JUDGE_KEY")
    assert local.client.api_key == "EMPTY"  # a local server needs no key
    monkeypatch.setenv("RLHFKIT_TEST_JUDGE_KEY", "sk-test")
    judge = RemoteJudge("https://judge.example.com/v1/", "big", TEMPLATE, api_key_env="RLHFKIT_TEST_JUDGE_KEY")
    assert judge.client.api_key == "sk-test" and judge.identity == "openai:https://judge.example.com/v1:big"


def test_templates_and_settings_a_chat_endpoint_cannot_serve_are_refused(monkeypatch):
    prefixed = template_from_dict({"question": "{prompt} {reply_1} {reply_2}", "answer_prefix": "Answer: "}, "p.toml")
    with pytest.raises(ConfigError, match="p.toml: answer_prefix"):
        RemoteJudge("http://127.0.0.1:1/v1", NAME, prefixed)
    plain = template_from_dict({"question": "Q: {prompt}\n{reply_1}\n{reply_2}"}, "plain.toml")
    with pytest.raises(ConfigError, match="plain.toml: chain of thought needs a cot_instruction"):
        RemoteJudge("http://127.0.0.1:1/v1", NAME, plain).first_probs(ITEMS[:1], cot=True)
    with pytest.raises(ConfigError, match="not an http"):
        RemoteJudge("127.0.0.1:8000/v1", NAME, TEMPLATE)
    with pytest.raises(ConfigError, match="max_concurrency"):
        RemoteJudge("http://127.0.0.1:1/v1", NAME, TEMPLATE, max_concurrency=0)
    monkeypatch.setitem(sys.modules, "openai", None)  # the extra not installed
    with pytest.raises(ConfigError, match=r"pip install 'rlhfkit\[openai\]'"):
        RemoteJudge("http://127.0.0.1:1/v1", NAME, TEMPLATE)


def test_never_more_than_max_concurrency_requests_in_flight_and_results_in_input_order():
    # the first inputs answer slowest, so requests complete out of order
    endpoint = Endpoint(by_prompt, delay=lambda body: 0.2 - 0.01 * P.index(float(question(body)[2:])))
    with serving(endpoint.app) as url:
        got = RemoteJudge(url, NAME, TEMPLATE, max_concurrency=3).first_probs(ITEMS)
    assert [p for p, _ in got] == pytest.approx(P)
    assert endpoint.most_in_flight == 3 and len(endpoint.bodies) == len(ITEMS)


# ----------------------------------------------------------------------------------------------------
# 6. Labels the endpoint does not show; chain of thought


CASES = {  # prompt -> (reply, expected P(first), how it was read)
    "both": (labels_at(0.3), 0.3, "logprobs"),
    "spellings": ({"text": "1", "steps": [step("1", math.log(0.3), [("1", math.log(0.3)), (" 1", math.log(0.2)),
                                                                    ("2", math.log(0.1))])]}, 0.5 / 0.6, "logprobs"),
    "only-first": (greedy(["1"], {0: [("x", -3.0)]}), 1 / (1 + math.exp(-3.0 + 0.01)), "bounded"),
    "only-second": (greedy(["2"], {0: [("x", -2.0), ("y", -4.0)]}), 1 / (1 + math.exp(-0.01 + 4.0)), "bounded"),
    "text-first": ({"text": "1", "steps": [step("x", -0.5, [("x", -0.5), ("y", -1.0)])]}, 1.0, "text"),
    "text-second": ({"text": "2.", "steps": []}, 0.0, "text"),  # no log-probs at all; the label's full stop dropped
    "text-other": (greedy(["maybe"]), 0.5, "text"),
}


def test_labels_missing_from_the_top_logprobs_fall_back_and_are_counted():
    with serving(Endpoint(lambda body: CASES[question(body)][0]).app) as url:
        judge = RemoteJudge(url, NAME, TEMPLATE)
        got = judge.first_probs([(name, "a", "b") for name in CASES])
    assert [p for p, _ in got] == pytest.approx([want for _, want, _ in CASES.values()], abs=1e-9)
    hows = [how for _, _, how in CASES.values()]
    assert judge.stats.bounded == hows.count("bounded") == 2 and judge.stats.from_text == hows.count("text") == 3


COT = {  # prompt -> (generated tokens, the label position's other top tokens, expected P, rationale, how)
    "spaced-label": (["It", " greets", ".", "\n", "So", " 1"], {5: [(" 2", math.log(0.3))]},
                     1 / (1 + 0.3 / math.exp(-0.01)), "It greets.\n", "logprobs"),
    "space-token": (["Short", "\n", "So", " ", "2"], {4: [("1", math.log(0.1))]},
                    1 / (1 + math.exp(-0.01) / 0.1), "Short\n", "logprobs"),
    "no-answer-line": (["It", " greets", "."], {}, 0.5, "It greets.", "text"),
    "label-inside-the-marker-token": (["Fine", "\n", "So1"], {}, 1.0, "Fine\n", "text"),
}


def test_chain_of_thought_reads_the_label_after_the_answer_line():
    def answer(body):
        tokens, tops, *_ = COT[question(body)]
        return greedy(tokens, tops)

    endpoint = Endpoint(answer)
    with serving(endpoint.app) as url:
        judge = RemoteJudge(url, NAME, TEMPLATE, cot_max_tokens=20)
        got = judge.first_probs([(name, "a", "b") for name in COT], cot=True)
    assert [p for p, _ in got] == pytest.approx([c[2] for c in COT.values()], abs=1e-9)
    assert [r for _, r in got] == [c[3] for c in COT.values()]
    assert judge.stats.from_text == 2 and judge.stats.bounded == 0
    body = endpoint.bodies[0]
    assert body["max_tokens"] == 20 + ANSWER_ROOM and body["temperature"] == 0 and body["logprobs"] is True
    assert body["messages"] == judge_messages(TEMPLATE, question(body), "a", "b", few_shot=True, cot=True)
    assert body["messages"][2]["content"] == "it greets\nSo 1"  # the exemplar's rationale, then its answer line
    assert body["messages"][-1]["content"].endswith("Better one?\n\nThink first.")


def by_prompt_completion(body: dict) -> dict:
    """A whole chat completion answering by_prompt (for the endpoints written out in a test)."""
    reply = by_prompt(body)
    return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": reply["steps"]},
                         "message": {"role": "assistant", "content": reply["text"]}}]}


def test_an_endpoint_that_refuses_a_system_role_gets_the_preamble_in_the_first_user_message():
    """Like a Gemma-style template: a system message is a 400 naming the role; the judge then sends the preamble as
    the start of the first user message (as LocalJudge renders for such a tokenizer), from then on at once."""
    bodies = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        bodies.append(body)
        if body["messages"][0]["role"] == "system":
            return JSONResponse({"error": {"message": "System role not supported", "type": "invalid_request_error"}},
                                status_code=400)
        return by_prompt_completion(body)

    with serving(app) as url:
        judge = RemoteJudge(url, NAME, TEMPLATE, max_concurrency=1, max_retries=0)
        got = judge.first_probs(ITEMS[:3], few_shot=True)
    assert [p for p, _ in got] == pytest.approx(P[:3]) and judge.merge_system
    merged = judge_messages(TEMPLATE, *ITEMS[0], few_shot=True)
    assert bodies[1]["messages"] == without_system(merged)
    assert bodies[1]["messages"][0] == {"role": "user", "content": "Pick the better reply.\n\n" + merged[1]["content"]}
    assert len(bodies) == 4  # one refusal, then each item once
    with serving(Endpoint(lambda body: None, fail=lambda n: 400).app) as url:  # a 400 about something else stays one
        with pytest.raises(RlhfkitError, match="refused the request"):
            RemoteJudge(url, NAME, TEMPLATE, max_retries=0).first_probs(ITEMS[:1])


def test_an_endpoint_that_asks_for_max_completion_tokens_gets_it():
    """OpenAI's newer models refuse max_tokens with a 400 that names max_completion_tokens: the judge switches the
    parameter once (the same budget) and keeps it; the system message refusal is handled beside it."""
    bodies = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        bodies.append(body)
        if "max_tokens" in body:
            return JSONResponse({"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this "
                                           "model. Use 'max_completion_tokens' instead.",
                                           "type": "invalid_request_error"}}, status_code=400)
        if body["messages"][0]["role"] == "system":
            return JSONResponse({"error": {"message": "System role not supported"}}, status_code=400)
        return by_prompt_completion(body)

    with serving(app) as url:
        judge = RemoteJudge(url, NAME, TEMPLATE, max_concurrency=1, max_retries=0)
        got = judge.first_probs(ITEMS[:2])
    assert [p for p, _ in got] == pytest.approx(P[:2])
    assert judge.budget_param == "max_completion_tokens" and judge.merge_system
    assert bodies[2]["max_completion_tokens"] == 1 and "max_tokens" not in bodies[2]
    assert len(bodies) == 4  # two refusals, then each item once


def test_self_consistency_asks_for_n_seeded_choices_and_averages_their_readings(tmp_path):
    """cot_samples = 3: one request per input for three choices at cot_temperature with a seed from the cache key;
    P is the mean of the choices' readings (one read from the text), the rationales kept in order."""
    def answer(body):
        return [greedy(["Good", "\n", "So", " 1"], {3: [(" 2", math.log(0.25))]}),  # P = 0.99 / (0.99 + 0.25)
                greedy(["Bad", "\n", "So", " 2"], {3: [(" 1", math.log(0.5))]}),  # P = 0.5 / (0.5 + 0.99)
                greedy(["Lost", "."])][: body.get("n", 1)]  # no answer line: 0.5 from the text

    endpoint, cache = Endpoint(answer), tmp_path / "judgements.sqlite"
    first = math.exp(-0.01) / (math.exp(-0.01) + 0.25)
    second = 0.5 / (0.5 + math.exp(-0.01))
    with serving(endpoint.app) as url:
        judge = RemoteJudge(url, NAME, TEMPLATE, cot_max_tokens=20, cot_samples=3, cot_temperature=0.9, cache=cache)
        got = judge.first_probs([("x", "a", "b"), ("y", "a", "b")], cot=True)
        greedy_judge = RemoteJudge(url, NAME, TEMPLATE, cot_max_tokens=20, cache=cache)
        one = greedy_judge.first_probs([("x", "a", "b")], cot=True)  # another cache key: asked again, greedily
    assert [p for p, _ in got] == pytest.approx([(first + second + 0.5) / 3] * 2, abs=1e-9)
    assert got[0][1] == "Good\n\n~~~\nBad\n\n~~~\nLost."
    assert judge.stats.from_text == 2 and judge.stats.calls == 2  # each input's reading counted once, by its worst
    x, y = endpoint.bodies[:2] if question(endpoint.bodies[0]) == "x" else endpoint.bodies[1::-1]
    assert (x["n"], x["temperature"], y["n"]) == (3, 0.9, 3) and x["seed"] != y["seed"]
    assert "n" not in endpoint.bodies[2] and endpoint.bodies[2]["temperature"] == 0
    assert one[0][0] == pytest.approx(first, abs=1e-9) and len(endpoint.bodies) == 3
    with serving(Endpoint(lambda body: greedy(["Good"])).app) as url:  # a server that gives one choice for n = 3
        with pytest.raises(RlhfkitError, match="1 choice.*n = 3.*cot_samples"):
            RemoteJudge(url, NAME, TEMPLATE, cot_samples=3, max_retries=0).first_probs([("z", "a", "b")], cot=True)


def test_self_consistency_through_rlhfkit_serve_is_reproducible(judge_dir, served):
    """Against a real server: the same input gives the same sampled judgement in two judges (the seed is the cache
    key's), and sampling at a high temperature moves it off the greedy one."""
    items = list(zip(PROMPTS[:3], REPLIES_A[:3], REPLIES_B[:3]))
    a = RemoteJudge(served, NAME, TEMPLATE, cot_max_tokens=6, cot_samples=3, cot_temperature=2.0)
    b = RemoteJudge(served, NAME, TEMPLATE, cot_max_tokens=6, cot_samples=3, cot_temperature=2.0)
    got = a.first_probs(items, cot=True, few_shot=False)
    assert b.first_probs(items, cot=True, few_shot=False) == got
    assert all(len(r.split("\n~~~\n")) == 3 for _, r in got)
    greedy_reading = RemoteJudge(served, NAME, TEMPLATE, cot_max_tokens=6).first_probs(items, cot=True, few_shot=False)
    assert [r for _, r in got] != [r for _, r in greedy_reading]


# ----------------------------------------------------------------------------------------------------
# The same stage through `rlhfkit serve` and the OpenAI client


REMOTE_TEMPLATE = '''
preamble = "Pick the better reply."
question = "Q: {prompt}\\nA1: {reply_1}\\nA2: {reply_2}\\nBetter one?"
cot_instruction = "Think first."
cot_answer_prefix = "\\nSo "

[[exemplars]]
prompt = "hello"
reply_1 = "hello world"
reply_2 = "dog"
answer = "1"
rationale = "it greets"
'''


def test_the_feedback_stage_gives_the_same_labels_through_rlhfkit_serve(judge_setup, judge_dir, tmp_path):
    """feedback.labeler = 'ai' with judge.base_url on `rlhfkit serve JUDGE` (a real server on 127.0.0.1, the openai
    client) labels the same items as judge.path on the same directory: the same comparisons, soft labels within 1e-4."""
    pytest.importorskip("openai")
    _, _, sft_out = judge_setup
    template = tmp_path / "remote.toml"
    template.write_text(REMOTE_TEMPLATE)
    assert load_template(template).content_hash == TEMPLATE.content_hash  # the prompt of the tests above
    outs = {}
    with serving(create_app(judge_dir, {"device": "cpu", "precision": "fp32", "model_name": NAME})) as url:
        for name, where in (("local", [f"judge.path='{judge_dir}'"]),
                            ("served", [f"judge.base_url='{url}'", f"judge.model='{NAME}'"])):
            outs[name] = tmp_path / name
            shutil.copytree(sft_out, outs[name])
            overrides = MICRO + ["feedback.n_prompts=24", "feedback.labeler='ai'", f"judge.template='{template}'", *where]
            result = run_stage("feedback", load_config(overrides=overrides), outs[name])
            assert result["judge_inputs"] == 2 * result["n_comparisons"] > 40
    local, served = (read_comparisons(outs[n] / "feedback" / "comparisons.jsonl") for n in ("local", "served"))
    assert [(c.prompt, c.chosen, c.rejected) for c in served] == [(c.prompt, c.chosen, c.rejected) for c in local]
    assert [c.soft_label for c in served] == pytest.approx([c.soft_label for c in local], abs=1e-4)
    assert max(c.soft_label for c in local) > 0.6  # not a row of coin flips
