"""`rlhfkit serve`: an OpenAI-compatible HTTP server for a policy directory, so a trained policy can be tried, judged,
or used as a judge by any OpenAI client (docs/serve.md).

Nothing here is imported by the core: `rlhfkit serve` imports it on demand, and it needs the `app` extra (fastapi,
uvicorn). Layer: serve, beside labelapp (neither imports the other), above tasks, feedback and evaluation.
May import: models, data, core (torch, transformers through models).

Modules, one concern each:
    engine    the model loaded once (rlhfkit.models.load), its lock, generation with rlhfkit's sampler, log-probs
    protocol  OpenAI's request bodies, their checks and bounds, the response bodies and the error shape
    app       the FastAPI application factory: routes, error handlers, the guard (Host, API key, body size)
    cli       `rlhfkit serve MODEL_DIR [--host] [--port] [--device] [--dtype] [--max-batch] ...`
"""
