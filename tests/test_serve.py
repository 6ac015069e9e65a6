"""`rlhfkit serve` (rlhfkit/serve): OpenAI's schemas; greedy output equal to an argmax loop and to rlhfkit's own
sampler; returned log-probs equal to log-softmax of the model's logits computed here; a seed fixes the output and
equals rlhfkit's sampler with that seed; each refusal a 4xx in OpenAI's error shape; a LoRA adapter directory
serves its merged model; concurrent requests are safe; a real server on 127.0.0.1 answers the official client."""

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from rlhfkit.data.batching import pad_left, stop_ids  # noqa: E402
from rlhfkit.data.chat import encode_chat_prompt  # noqa: E402
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy  # noqa: E402
from rlhfkit.models.sampling import SamplingParams, decode_responses, sample  # noqa: E402
from rlhfkit.serve.app import create_app  # noqa: E402

NAME = "tiny"
N_CTX = 128
HOST = "http://127.0.0.1"  # the guard answers only to loopback names (TestClient's default is "testserver")
PROMPT = "the quick brown"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


def _sharp_model(arch, tokenizer, seed=1):
    """A tiny model whose weight matrices are redrawn at std 0.3, so next-token logits have std ~2: a shifted
    position or a wrong token changes a log-prob by far more than rounding, and greedy is not a tie-break."""
    model = build_tiny_policy(TinyModelSpec(arch, 2, 32, 4, N_CTX), tokenizer, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, chat_tokenizer):
    """{arch: directory} of sharp tiny models with the ChatML tokenizer, saved as a user's model is."""
    dirs = {}
    for arch in ("gpt2", "llama"):
        path = tmp_path_factory.mktemp(f"serve-{arch}")
        _sharp_model(arch, chat_tokenizer).save_pretrained(path)
        chat_tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="module")
def served(model_dirs):
    """{arch: TestClient} of servers with small bounds (so the bound checks are cheap to reach)."""
    return {arch: TestClient(create_app(path, {"device": "cpu", "model_name": NAME, "max_n": 4, "max_prompts": 3}),
                             base_url=HOST) for arch, path in model_dirs.items()}


@pytest.fixture(scope="module")
def client(served):
    return served["gpt2"]


def _oracle_model(path):
    """The directory's model loaded by transformers directly (not through rlhfkit)."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _stops(tokenizer):
    return {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}


@torch.no_grad()
def _greedy_oracle(model, prompt_ids, max_tokens, stops):
    """Argmax token by token, the whole sequence recomputed each step (no KV cache): (reply ids, per-step log-softmax
    rows (T, V)) from ONE forward over prompt + reply at the end."""
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt in stops:
            break
    reply = ids[len(prompt_ids):]
    logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)[len(prompt_ids) - 1:-1]  # (Tr, V): row t predicts reply[t]
    return reply, logp


def _post(client, path, **body):
    r = client.post(path, json={"model": NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------------------------------
# Schemas, greedy and log-probs against oracles


def test_models_endpoint(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [NAME]
    assert body["data"][0]["object"] == "model" and isinstance(body["data"][0]["created"], int)
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_completions_greedy_and_logprobs_equal_the_oracle(arch, served, model_dirs, chat_tokenizer):
    tok = chat_tokenizer
    body = _post(served[arch], "/v1/completions", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == NAME
    (choice,) = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"} and choice["index"] == 0
    prompt_ids = tok(PROMPT)["input_ids"]  # a raw-text prompt: the tokenizer's own special tokens, no template
    reply, logp = _greedy_oracle(_oracle_model(model_dirs[arch]), prompt_ids, 10, _stops(tok))
    ended = reply[-1] in _stops(tok)
    assert choice["finish_reason"] == ("stop" if ended else "length")
    assert choice["text"] == tok.decode(reply[:-1] if ended else reply, skip_special_tokens=False)
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(reply),
                             "total_tokens": len(prompt_ids) + len(reply)}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(reply)
    expected = logp.gather(1, torch.tensor(reply).unsqueeze(1)).squeeze(1)
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), expected, atol=1e-4)
    assert max(expected.tolist()) < -0.05  # the oracle is not vacuous: no step is certain
    for t, top in enumerate(lp["top_logprobs"]):
        # the sampled token (the argmax, greedy) and the k most probable: 3 entries, the best one the sampled token's
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp["token_logprobs"][t])
        assert sorted(top.values(), reverse=True) == pytest.approx(logp[t].topk(3).values.tolist(), abs=1e-4)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chat_greedy_and_logprobs_equal_the_oracle(arch, served, model_dirs, chat_tokenizer):
    tok = chat_tokenizer
    body = _post(served[arch], "/v1/chat/completions", messages=CHAT, max_completion_tokens=12, temperature=0,
                 logprobs=True, top_logprobs=4)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    prompt_ids = encode_chat_prompt(tok, CHAT)  # the chat template, the assistant's turn opened
    model = _oracle_model(model_dirs[arch])
    reply, logp = _greedy_oracle(model, prompt_ids, 12, _stops(tok))
    content = choice["logprobs"]["content"]
    assert len(content) == len(reply) == body["usage"]["completion_tokens"]
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    for t, entry in enumerate(content):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] == pytest.approx(logp[t, reply[t]].item(), abs=1e-4)
        values = [e["logprob"] for e in entry["top_logprobs"]]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert values == pytest.approx(logp[t].topk(4).values.tolist(), abs=1e-4)
        # greedy: the sampled token is the argmax, so it heads its own top list, with the same log-prob and bytes
        assert entry["top_logprobs"][0]["bytes"] == entry["bytes"] and values[0] == pytest.approx(entry["logprob"])
    # the tokens' bytes spell the reply (the token that ended it, when one did, is not part of the text); a random
    # model's reply may hold bytes that are no UTF-8, shown as U+FFFD in the text as the tokenizer decodes them
    ended = choice["finish_reason"] == "stop"
    spelled = b"".join(bytes(e["bytes"]) for e in (content[:-1] if ended else content))
    assert spelled.decode("utf-8", errors="replace") == choice["message"]["content"]
    if ended:
        assert bytes(content[-1]["bytes"]).decode() in ("<|im_end|>", "</s>")


def test_greedy_equals_rlhfkit_sampler_and_text_parts_equal_a_string(client, model_dirs, chat_tokenizer):
    """temperature 0 is what rlhfkit's own sampler gives with top_k = 1, for a text prompt and for a conversation;
    a prompt as token ids answers as the same prompt as text; content parts read as their joined text."""
    tok = chat_tokenizer
    model = _oracle_model(model_dirs["gpt2"])
    for prompt_ids, path, body in (
        (tok(PROMPT)["input_ids"], "/v1/completions", {"prompt": PROMPT}),
        (encode_chat_prompt(tok, CHAT), "/v1/chat/completions", {"messages": CHAT}),
    ):
        q, qm = pad_left([prompt_ids], tok.eos_token_id)
        s = sample(model, q, qm, max_new_tokens=9, eos_token_id=stop_ids(tok), pad_token_id=tok.eos_token_id,
                   generator=torch.Generator().manual_seed(0), sampling=SamplingParams(top_k=1), tokenizer=tok)
        (expected,) = decode_responses(tok, s)
        got = _post(client, path, max_tokens=9, temperature=0, **body)["choices"][0]
        assert got.get("text", got.get("message", {}).get("content")) == expected
    as_ids = _post(client, "/v1/completions", prompt=tok(PROMPT)["input_ids"], max_tokens=9, temperature=0)
    as_text = _post(client, "/v1/completions", prompt=PROMPT, max_tokens=9, temperature=0)
    assert as_ids["choices"][0]["text"] == as_text["choices"][0]["text"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    plain = [{"role": "user", "content": "hello world"}]
    a = _post(client, "/v1/chat/completions", messages=parts, max_tokens=6, temperature=0)
    b = _post(client, "/v1/chat/completions", messages=plain, max_tokens=6, temperature=0)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_seed_fixes_the_sample_and_equals_rlhfkit_sampler(client, model_dirs, chat_tokenizer):
    tok = chat_tokenizer
    body = dict(prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.95, n=3, seed=123)
    first = [c["text"] for c in _post(client, "/v1/completions", **body)["choices"]]
    again = [c["text"] for c in _post(client, "/v1/completions", **body)["choices"]]
    other = [c["text"] for c in _post(client, "/v1/completions", **{**body, "seed": 124})["choices"]]
    assert first == again and first != other and len(set(first)) > 1  # n choices differ from each other
    # the same draws as rlhfkit's sampler: the prompt n times, a generator seeded with the seed
    q, qm = pad_left([tok(PROMPT)["input_ids"]] * 3, tok.eos_token_id)
    s = sample(_oracle_model(model_dirs["gpt2"]), q, qm, max_new_tokens=8, eos_token_id=stop_ids(tok),
               pad_token_id=tok.eos_token_id, temperature=0.9, generator=torch.Generator().manual_seed(123),
               sampling=SamplingParams(top_p=0.95), tokenizer=tok)
    assert first == decode_responses(tok, s)
    chat = dict(messages=CHAT, max_tokens=8, seed=7, n=2)
    twice = [_post(client, "/v1/chat/completions", **chat)["choices"] for _ in range(2)]
    assert twice[0] == twice[1]


def test_stop_strings_several_prompts_and_finish_reasons(client, chat_tokenizer):
    greedy = _post(client, "/v1/completions", prompt=PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert len(greedy) > 6
    stop = greedy[3:6]
    cut = greedy[: greedy.find(stop)]
    got = _post(client, "/v1/completions", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "zzzz"])
    assert got["choices"][0]["text"] == cut and got["choices"][0]["finish_reason"] == "stop"
    short = _post(client, "/v1/completions", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0)["choices"][0]
    assert short["finish_reason"] == "length" and len(short["logprobs"]["tokens"]) == 1
    assert len(short["logprobs"]["top_logprobs"][0]) == 1  # logprobs = 0: the sampled token alone
    # two prompts, n = 2: four choices, prompt i's at 2i and 2i + 1; prompt tokens counted once per prompt
    two = _post(client, "/v1/completions", prompt=[PROMPT, "hello"], max_tokens=5, temperature=0, n=2)
    texts = [c["text"] for c in two["choices"]]
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3] and texts[0] == texts[1] and texts[2] == texts[3]
    alone = _post(client, "/v1/completions", prompt="hello", max_tokens=5, temperature=0)["choices"][0]["text"]
    assert texts[2] == alone and texts[0] == greedy[: len(texts[0])]
    lengths = [len(chat_tokenizer(p)["input_ids"]) for p in (PROMPT, "hello")]
    assert two["usage"]["prompt_tokens"] == sum(lengths)


# ----------------------------------------------------------------------------------------------------
# Refusals: each a 4xx in OpenAI's error shape


def _raw(client, path, content, **headers):
    return client.post(path, content=content, headers={"content-type": "application/json", **headers})


ERRORS = [  # (endpoint, body, status, param, code)
    ("completions", "{", 400, None, "invalid_json"),
    ("completions", "[1, 2]", 400, None, "invalid_request"),
    ("completions", {"model": "gpt-4", "prompt": "a"}, 404, "model", "model_not_found"),
    ("completions", {"model": NAME}, 400, "prompt", "missing_required_parameter"),
    ("completions", {"prompt": "a", "n": 5}, 400, "n", "invalid_value"),
    ("completions", {"prompt": "a", "n": 0}, 400, "n", "invalid_value"),
    ("completions", {"prompt": "a", "max_tokens": N_CTX}, 400, "max_tokens", "context_length_exceeded"),
    ("completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("completions", {"prompt": [5] * N_CTX}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": ["a", "b", "c", "d"]}, 400, "prompt", "invalid_value"),
    ("completions", {"prompt": [10**6]}, 400, "prompt", "invalid_value"),
    ("completions", {"prompt": []}, 400, "prompt", "invalid_value"),
    ("completions", {"prompt": [[5, 6], []]}, 400, "prompt", "invalid_value"),
    ("completions", '{"model": "tiny", "prompt": "a", "temperature": NaN}', 400, "temperature", "invalid_value"),
    ("completions", {"prompt": [1, "a"]}, 400, "prompt", "invalid_type"),
    ("completions", {"prompt": "a", "temperature": "1"}, 400, "temperature", "invalid_type"),
    ("completions", {"prompt": "a", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("completions", {"prompt": "a", "n": True}, 400, "n", "invalid_type"),
    ("completions", {"prompt": "a", "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    ("completions", {"prompt": "a", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("completions", {"prompt": "a", "stop": 3}, 400, "stop", "invalid_type"),
    ("completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("completions", {"prompt": "a", "stop": [""]}, 400, "stop", "invalid_value"),
    ("completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs", "invalid_value"),
    ("completions", {"prompt": "a", "echo": True}, 400, "echo", "unsupported_value"),
    ("completions", {"prompt": "a", "stream": True}, 400, "stream", "unsupported_value"),
    ("completions", {"prompt": "a", "best_of": 3}, 400, "best_of", "unsupported_value"),
    ("completions", {"prompt": "a", "frequency_penalty": 0.5}, 400, "frequency_penalty", "unsupported_value"),
    ("completions", {"prompt": "a", "logit_bias": {"5": 10}}, 400, "logit_bias", "unsupported_value"),
    ("completions", {"prompt": "a", "tools": []}, 400, "tools", "unsupported_parameter"),
    ("chat", {"messages": []}, 400, "messages", "invalid_value"),
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages", "invalid_type"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "messages",
     "invalid_type"),
    ("chat", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
    ("chat", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
    ("chat", {"messages": CHAT, "max_completion_tokens": 10**6}, 400, "max_completion_tokens",
     "context_length_exceeded"),
    ("chat", {"messages": [{"role": "user", "content": "x " * N_CTX}]}, 400, "messages", "context_length_exceeded"),
    ("chat", {"messages": CHAT, "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_value"),
    ("chat", {"messages": CHAT, "functions": [{"name": "f"}]}, 400, "functions", "unsupported_parameter"),
]


@pytest.mark.parametrize("endpoint, body, status, param, code", ERRORS,
                         ids=[f"{e}-{c}-{p}-{i}" for i, (e, _, _, p, c) in enumerate(ERRORS)])
def test_refusals_have_openai_error_shape(client, endpoint, body, status, param, code):
    path = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}[endpoint]
    content = body if isinstance(body, str) else json.dumps({"model": NAME, **body})
    r = _raw(client, path, content)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code) and error["message"]
    assert len(error["message"]) <= 400


def test_body_size_host_routes_and_api_key(client, model_dirs):
    big = json.dumps({"model": NAME, "prompt": "a" * (2**20 + 10)})
    r = _raw(client, "/v1/completions", big)  # declared Content-Length over the limit: refused unread
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it streams, cut off at the limit
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(40):
            yield b"a" * 2**15
        yield b'"}'

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
    r = TestClient(client.app).get("/v1/models")  # Host: testserver, not a name this server answers to
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_host"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    crashing = TestClient(client.app, base_url=HOST, raise_server_exceptions=False)
    engine = client.app.state.engine
    saved = engine.generate
    engine.generate = lambda *a, **k: 1 / 0  # a bug in the server: still OpenAI's error shape, a 500
    try:
        r = crashing.post("/v1/completions", json={"model": NAME, "prompt": "a"})
    finally:
        engine.generate = saved
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    keyed = TestClient(create_app(model_dirs["gpt2"], {"device": "cpu", "model_name": NAME, "api_key": "s3cret"}),
                       base_url=HOST)
    r = keyed.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_chat_needs_a_chat_template(tmp_path, tokenizer, sharp_policy):
    """The digits tokenizer has no chat template: chat is refused with a 400 that says what to do; completions
    serve."""
    sharp_policy("gpt2").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    c = TestClient(create_app(tmp_path, {"device": "cpu", "model_name": NAME}), base_url=HOST)
    r = c.post("/v1/chat/completions", json={"model": NAME, "messages": CHAT})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
    assert "/v1/completions" in r.json()["error"]["message"]
    assert _post(c, "/v1/completions", prompt="1 2 3 =", max_tokens=4, temperature=0)["choices"][0]["text"]


# ----------------------------------------------------------------------------------------------------
# Concurrency, the model's sampling defaults, LoRA


def test_concurrent_requests_match_sequential_ones_and_a_full_queue_is_503(client):
    bodies = [dict(prompt=PROMPT, max_tokens=6, temperature=1.0, n=2, seed=s) for s in range(6)]
    sequential = [_post(client, "/v1/completions", **b)["choices"] for b in bodies]
    results = [None] * len(bodies)

    def call(i):
        results[i] = _post(client, "/v1/completions", **bodies[i])["choices"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == sequential
    engine = client.app.state.engine
    saved, engine.max_waiting = engine.max_waiting, 0
    engine.lock.acquire()  # the model is "running" someone else's request
    try:
        waiting = threading.Thread(target=call, args=(0,))
        waiting.start()
        deadline = time.time() + 10
        while engine.pending < 1 and time.time() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy" and r.headers["retry-after"]
        assert r.json()["error"]["type"] == "server_error"
    finally:
        engine.lock.release()
        engine.max_waiting = saved
    waiting.join(30)
    assert results[0] == sequential[0] and engine.pending == 0


def test_generation_config_gives_the_defaults(tmp_path, model_dirs):
    """The model's generation_config.json sets the sampling defaults (as the pipeline takes them): top_k = 1 makes
    any temperature greedy, and a request's own top_k wins."""
    import shutil

    path = tmp_path / "m"
    shutil.copytree(model_dirs["gpt2"], path)
    (path / "generation_config.json").write_text(json.dumps({"top_k": 1}))
    c = TestClient(create_app(path, {"device": "cpu", "model_name": NAME}), base_url=HOST)
    greedy = _post(c, "/v1/completions", prompt=PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
    sampled = _post(c, "/v1/completions", prompt=PROMPT, max_tokens=8, temperature=1.5, n=4, seed=1)["choices"]
    assert all(ch["text"] == greedy for ch in sampled)
    free = _post(c, "/v1/completions", prompt=PROMPT, max_tokens=8, temperature=1.5, n=4, seed=1, top_k=0)["choices"]
    assert any(ch["text"] != greedy for ch in free)


def test_a_lora_adapter_directory_serves_its_merged_model(tmp_path, model_dirs, chat_tokenizer):
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(str(model_dirs["gpt2"]), dtype=torch.float32)
    torch.manual_seed(0)  # init_lora_weights=False: B is random, so the adapter changes the model from step 0
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    adapted = peft.get_peft_model(base, lora)
    adapter = tmp_path / "adapter"
    adapted.save_pretrained(adapter)
    chat_tokenizer.save_pretrained(adapter)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    c = TestClient(create_app(adapter, {"device": "cpu", "model_name": NAME}), base_url=HOST)
    got = _post(c, "/v1/completions", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)["choices"][0]
    prompt_ids = chat_tokenizer(PROMPT)["input_ids"]
    # the oracle: peft's model in memory, the adapter applied at each forward (not merged, not loaded by rlhfkit)
    reply, logp = _greedy_oracle(adapted.eval(), prompt_ids, 8, _stops(chat_tokenizer))
    assert len(got["logprobs"]["token_logprobs"]) == len(reply)
    assert torch.allclose(torch.tensor(got["logprobs"]["token_logprobs"]),
                          logp.gather(1, torch.tensor(reply).unsqueeze(1)).squeeze(1), atol=1e-4)
    _, base_logp = _greedy_oracle(_oracle_model(model_dirs["gpt2"]), prompt_ids, 1, set())
    assert abs(base_logp[0, reply[0]].item() - logp[0, reply[0]].item()) > 1e-2  # the adapter changed the model


# ----------------------------------------------------------------------------------------------------
# A real server and the official client; the command line


@pytest.fixture
def live_server(model_dirs):
    """uvicorn on 127.0.0.1 on a free port (a socket bound here and handed over: no race for the port), in a
    background thread; yields its base URL."""
    import uvicorn

    app = create_app(model_dirs["gpt2"], {"device": "cpu", "model_name": NAME, "max_n": 4})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_the_official_openai_client_against_a_real_server(live_server, client):
    openai = pytest.importorskip("openai", reason="the official client is the `openai` extra: "
                                                  "pip install 'rlhfkit[openai]'")
    api = openai.OpenAI(base_url=live_server, api_key="x", max_retries=0, timeout=30)
    assert [m.id for m in api.models.list().data] == [NAME]
    done = api.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    expected = _post(client, "/v1/completions", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    assert done.choices[0].text == expected["choices"][0]["text"]
    assert done.choices[0].logprobs.token_logprobs == pytest.approx(
        expected["choices"][0]["logprobs"]["token_logprobs"])
    assert done.usage.completion_tokens == expected["usage"]["completion_tokens"]
    chat = api.chat.completions.create(model=NAME, messages=CHAT, max_completion_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
    first = chat.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 3 and first.top_logprobs[0].logprob == pytest.approx(first.logprob)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.total_tokens > 0
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=NAME, prompt=PROMPT, n=50)
    assert e.value.code == "invalid_value" and e.value.param == "n"
    with pytest.raises(openai.NotFoundError) as e:
        api.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert e.value.code == "model_not_found"


def test_cli_serve(model_dirs, monkeypatch, capsys, tmp_path):
    import rlhfkit.serve.cli as serve_cli
    from rlhfkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "serve" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f in out for f in ("--host", "--port", "--device", "--dtype", "--max-batch"))
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(model_dirs["gpt2"]), "--port", "0"]) == 2
    assert "--port 0" in capsys.readouterr().err
    runs = []
    monkeypatch.setattr(serve_cli.uvicorn, "run", lambda app, **kw: runs.append((app, kw)))
    assert main(["serve", str(model_dirs["gpt2"]), "--device", "cpu", "--port", "8123", "--dtype", "float32",
                 "--served-model-name", "policy"]) == 0
    out = capsys.readouterr().out
    assert "serving `policy`" in out and "http://127.0.0.1:8123/v1" in out and "with chat template" in out
    (app, kw), = runs
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123 and app.state.config.model_name == "policy"
    assert app.state.engine.dtype is None  # float32: no autocast


def test_import_rlhfkit_loads_no_web_stack():
    code = ("import sys, rlhfkit, rlhfkit.cli\n"
            "print(' '.join(m for m in ('fastapi', 'uvicorn', 'starlette', 'openai', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr
