"""The FastAPI application factory of `rlhfkit serve` (Flask-tutorial style, as rlhfkit.labelapp.app): one app per
model directory, the model loaded once when the app is made.

    app = create_app(model_dir, {"device": "cpu", "max_n": 4})   # a test's settings
    app = create_app(model_dir, serve_settings(args))            # `rlhfkit serve` (rlhfkit.serve.cli)

Routes: GET /v1/models (and /v1/models/{id}), POST /v1/completions, POST /v1/chat/completions, GET /health. The
handlers are plain functions (FastAPI runs them in its thread pool) and take the engine's one lock, so concurrent
requests are safe and run one at a time. Every refusal has OpenAI's error shape,
{"error": {"message", "type", "param", "code"}}, so the official client raises its usual exceptions:
400 for a bad parameter (never 422), 401 without the API key when one is required, 404 for an unknown model or
route, 413 for a body over the limit, 503 when too many requests wait (the client retries).

The guard (a pure ASGI middleware, as the labeling app's) runs before any route reads a byte: the Host header
(a server on loopback answers only to loopback names, so a web page cannot reach it by DNS rebinding), the API key,
and the body size (a declared Content-Length over the limit is refused unread; a streamed body is counted and cut).

Layer: serve (imports serve.protocol, serve.engine, core).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.core.hosts import host_name, normalise_hosts
from rlhfkit.serve.engine import Busy, Engine
from rlhfkit.serve.protocol import (APIError, ChatRequest, CompletionRequest, Limits, chat_body, chat_job,
                                    check_model, clip, completion_body, completion_job, model_card, models_body,
                                    validation_error)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """Settings of one server; `rlhfkit serve`'s options (cli.serve_settings) and tests set them through
    create_app's `settings`."""

    model_dir: Path
    model_name: str = ""  # the name clients send as `model` (default: model_dir as given, as vLLM names it)
    device: str = "auto"  # 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...
    precision: str = "auto"  # the pipeline's `precision`: 'auto' (bf16 autocast where supported), 'fp32', 'bf16'
    max_batch: int = 64  # rows (prompts x n) sampled at once; more are sampled in turn
    max_n: int = 16  # choices per prompt
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_top_logprobs: int = 20  # top_logprobs (chat) and logprobs (completions)
    chat_max_tokens: int = 512  # a chat request without max_tokens gets this many at most (or what the context leaves)
    max_body_bytes: int = 2**20  # a larger request body is refused (413) unread
    max_waiting: int = 32  # requests that may wait for the model behind the one running; then 503
    allowed_hosts: list[str] = field(default_factory=lambda: list(LOOPBACK_HOSTS))  # Host names served ("*": any)
    api_key: str | None = None  # when set, requests to /v1 need `Authorization: Bearer KEY`
    limits: Limits = field(init=False)  # derived

    def __post_init__(self):
        self.model_dir = Path(self.model_dir)
        self.model_name = self.model_name or str(self.model_dir)
        for name in ("max_batch", "max_n", "max_prompts", "chat_max_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise RlhfkitError(f"serve: {name} = {getattr(self, name)}; give at least 1")
        if not 0 <= self.max_top_logprobs <= 100 or self.max_waiting < 0:
            raise RlhfkitError("serve: max_top_logprobs must be in [0, 100] and max_waiting at least 0")
        self.limits = Limits(max_n=self.max_n, max_prompts=self.max_prompts, max_top_logprobs=self.max_top_logprobs,
                             chat_max_tokens=self.chat_max_tokens)


def create_app(model_dir: str | Path, settings: dict | None = None) -> FastAPI:
    config = ServeConfig(model_dir=Path(model_dir), **(settings or {}))
    engine = Engine.load(config.model_dir, config.device, config.precision, config.max_batch, config.max_waiting)
    name = config.model_name

    app = FastAPI(title="rlhfkit serve", version="1", docs_url=None, redoc_url=None,
                  description=f"OpenAI-compatible completions and chat completions of {name} (docs/serve.md).")
    app.state.config, app.state.engine = config, engine

    @app.get("/health")
    def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    def models():
        return models_body(name, engine)

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str):
        check_model(model_id, name)
        return model_card(name, engine)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        check_model(req.model, name)
        job = completion_job(req, engine, config.limits)
        choices = engine.generate(job.prompts, n=job.n, max_tokens=job.max_tokens, temperature=job.temperature,
                                  sampling=job.sampling, seed=job.seed, top_logprobs=job.top_logprobs)
        return completion_body(name, job, choices, engine)

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        check_model(req.model, name)
        job = chat_job(req, engine, config.limits)
        choices = engine.generate(job.prompts, n=job.n, max_tokens=job.max_tokens, temperature=job.temperature,
                                  sampling=job.sampling, seed=job.seed, top_logprobs=job.top_logprobs)
        return chat_body(name, job, choices, engine)

    install_error_handlers(app)
    app.add_middleware(RequestGuard, config=config)
    return app


def error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(APIError(status, message, param, code).body(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        e = validation_error(list(exc.errors()))
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Busy)
    async def on_busy(request: Request, exc: Busy):
        return error(503, str(exc), None, "server_busy", headers={"Retry-After": "1"})

    @app.exception_handler(RlhfkitError)
    async def on_user_error(request: Request, exc: RlhfkitError):  # e.g. the sampler's own checks
        return error(400, str(exc), None, "invalid_request")

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):  # a bug: said in OpenAI's shape too (the traceback is logged)
        return error(500, f"internal error ({type(exc).__name__}); the server's log has the traceback", None,
                     "internal_error")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        what = {404: "not found", 405: "method not allowed"}.get(exc.status_code)
        message = f"{what}: {request.method} {clip(request.scope['path'], 100)}" if what else str(exc.detail)
        return error(exc.status_code, message, None, what.replace(" ", "_") if what else None,
                     headers=getattr(exc, "headers", None))


# ----------------------------------------------------------------------------------------------------
# The guard: Host, API key and body size, before any route reads a byte


class BodyTooLarge(StarletteHTTPException):
    """Raised by the counting `receive` when a streamed body passes the limit (an HTTPException, so FastAPI's body
    parsing passes it on and the handler answers 413)."""

    def __init__(self, limit: int):
        super().__init__(413, too_large(limit))


def too_large(limit: int) -> str:
    return f"request body too large: at most {limit} bytes here (rlhfkit serve --max-body-kb sets the limit)"


class RequestGuard:
    def __init__(self, app: ASGIApp, config: ServeConfig):
        self.app, self.config = app, config
        self.hosts = normalise_hosts(config.allowed_hosts)
        self.any_host = "*" in self.hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            refusal.headers["Connection"] = "close"  # the unread body must not be taken for the next request
            await refusal(scope, receive, send)
            return
        limit, received = self.config.max_body_bytes, 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)

    def refusal(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        if not self.any_host and host_name(headers.get("host")) not in self.hosts:
            return error(400, "this server does not answer to the host name in the request's Host header; if it is "
                              "the server's address, add it with `rlhfkit serve --allowed-host NAME`", None, "bad_host")
        key = self.config.api_key
        if key and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return error(401, "missing or wrong API key: send `Authorization: Bearer KEY`", None, "invalid_api_key")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return error(400, "invalid Content-Length header", None, "invalid_request")
        if length is not None and int(length) > self.config.max_body_bytes:
            return error(413, too_large(self.config.max_body_bytes), None, "request_too_large")
        return None
