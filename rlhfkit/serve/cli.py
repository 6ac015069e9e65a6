"""`rlhfkit serve MODEL_DIR`: an OpenAI-compatible HTTP server for a policy directory (docs/serve.md).

    rlhfkit serve runs/x/ppo/model                      # http://127.0.0.1:8000/v1, loopback only
    rlhfkit serve runs/x/sft/model --port 8001 --device cuda --dtype bfloat16 --served-model-name sft
    RLHFKIT_API_KEY=... rlhfkit serve runs/x/ppo/model --host 0.0.0.0 --api-key-env RLHFKIT_API_KEY

The web stack is the `app` extra (fastapi, uvicorn); without it the command says what to install.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlhfkit.core.errors import ConfigError, RlhfkitError

WEB_MODULES = {"fastapi", "uvicorn", "starlette", "pydantic"}
try:  # the `app` extra: imported here, at the top, and reported by main() when missing
    import uvicorn

    from rlhfkit.serve.app import LOOPBACK_HOSTS, create_app
    MISSING = None
except ModuleNotFoundError as e:
    if not e.name or e.name.split(".")[0] not in WEB_MODULES:
        raise
    MISSING = e.name

DTYPES = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16"}  # --dtype -> the pipeline's `precision`
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhfkit serve",
        description="Serve a policy directory (a plain model directory, or a LoRA adapter directory, merged into its "
                    "base) over OpenAI's API: GET /v1/models, POST /v1/completions and /v1/chat/completions, with "
                    "logprobs. Generation is rlhfkit's own sampler; temperature 0 is greedy. Point any OpenAI client "
                    "at http://HOST:PORT/v1. Needs the app extra: pip install 'rlhfkit[app]'.")
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path,
                   help="a model directory rlhfkit reads or writes (e.g. runs/x/ppo/model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="bfloat16 runs under autocast with fp32 weights, as training does (default auto: bfloat16 "
                        "on a GPU that supports it, else float32)")
    p.add_argument("--max-batch", type=int, default=64, help="rows (prompts x n) sampled at once (default 64)")
    p.add_argument("--max-n", type=int, default=16, help="largest n (choices per prompt) a request may ask for")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="largest logprobs (completions) / top_logprobs (chat) a request may ask for (default 20)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the name clients send as `model` (default: MODEL_DIR as given)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body, in KiB (default 1024)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another host name the server answers to (repeatable; '*' for any); loopback names and "
                        "--host always are")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require `Authorization: Bearer KEY`, KEY read from the environment variable VAR")
    return p


def serve_settings(args) -> dict:
    """create_app's settings (app.ServeConfig fields) from the options, checked."""
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: choose a port between 1 and 65535")
    for option, value in (("--max-batch", args.max_batch), ("--max-n", args.max_n),
                          ("--max-body-kb", args.max_body_kb)):
        if value < 1:
            raise ConfigError(f"{option} {value}: give at least 1")
    if not 0 <= args.max_logprobs <= 100:
        raise ConfigError(f"--max-logprobs {args.max_logprobs}: give 0 to 100")
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is not set (or empty)")
    wildcard = args.host in WILDCARD_HOSTS
    hosts = [*LOOPBACK_HOSTS, *([] if wildcard else [args.host]), *args.allowed_host]
    if wildcard and not args.allowed_host:
        hosts.append("*")  # every interface, no names given: any Host header
    return {"model_name": args.served_model_name or str(args.model_dir), "device": args.device,
            "precision": DTYPES[args.dtype], "max_batch": args.max_batch, "max_n": args.max_n,
            "max_top_logprobs": args.max_logprobs, "max_body_bytes": args.max_body_kb * 1024,
            "allowed_hosts": hosts, "api_key": api_key}


def url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if MISSING is not None:
        print(f"error: `rlhfkit serve` needs the web app's packages ({MISSING} is missing); install them with: "
              "pip install 'rlhfkit[app]'", file=sys.stderr)
        return 2
    try:
        settings = serve_settings(args)
        print(f"[rlhfkit] loading {args.model_dir} ...", flush=True)
        app = create_app(args.model_dir, settings)
    except RlhfkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(startup_line(app, args), flush=True)
    if args.host in WILDCARD_HOSTS and settings["api_key"] is None:
        print("[rlhfkit] note: listening on every interface without --api-key-env: anyone who reaches this port can "
              "use the model", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def startup_line(app, args) -> str:
    """What is served where: the name clients send, the directory, its size, device, precision, context, chat
    template, and the sampling defaults its generation_config.json brought."""
    engine, config = app.state.engine, app.state.config
    kind = "a LoRA adapter merged into its base" if not (config.model_dir / "config.json").is_file() else "a model"
    dtype = {None: "fp32"}.get(engine.dtype, str(engine.dtype).replace("torch.", ""))
    line = (f"[rlhfkit] serving `{config.model_name}` ({config.model_dir}: {kind}, {engine.parameters():,} parameters, "
            f"{engine.device}, {dtype}, context {engine.context} tokens, "
            f"{'with' if engine.has_chat_template else 'no'} chat template) at {url(args.host, args.port)}")
    d = engine.defaults
    defaults = [f"{k}={v}" for k, v, off in (("top_k", d.top_k, 0), ("top_p", d.top_p, 1.0), ("min_p", d.min_p, 0.0),
                                               ("repetition_penalty", d.repetition_penalty, 1.0),
                                               ("stop", list(d.stop), [])) if v != off]
    if defaults:
        line += (f"\n[rlhfkit] sampling defaults from its generation_config.json (a request's own values win): "
                 f"{', '.join(defaults)}")
    return line


if __name__ == "__main__":
    sys.exit(main())
