"""The feedback web app: people rank completions (or give each a thumb up or down) in a browser; the
export is the trainers' data contract.

Nothing here is imported by the core: `rlhfkit label ...` and the pipeline's human-feedback hook import
it on demand, and it needs the `app` extra (fastapi, uvicorn, jinja2, python-multipart, markdown-it-py).
Layer: labelapp, above tasks, feedback and evaluation, below pipeline (whose human feedback stage runs it).
May import: feedback, models, data, core (torch only where it samples completions, imported there).

Modules, one concern each:
    db          SQLite connection (WAL, durable commits) and schema.sql
    security    password hashing and rules, invitations, sessions, sign-in tickets, CSRF
    project     creating a project (imported completions or sampled from a policy), adding people
    assignment  handing out items (overlap, leases, per-labeler shuffle), skips and submissions
    stats       progress, agreement (pairwise, Kendall tau, Krippendorff alpha), per-labeler figures, Elo
    export      comparisons.jsonl + rankings.jsonl, or thumbs.jsonl (rlhfkit.data.contract), and a summary
    app         the FastAPI application factory: settings, error handlers, security headers
    guard       allowed host names and request-body limits, checked before any route reads a byte
    deps        per-request plumbing: DB connection, signed-in user, roles, CSRF, cookies, sign-in throttle
    api         the JSON API (/api/...), described by the OpenAPI schema
    pages       the HTML pages (Jinja2 templates in templates/, script and styles in static/)
    cli         `rlhfkit label serve|create|add-labeler|export|status`
    hook        the pipeline's `feedback.labeler = "human"` step
"""

DB_NAME = "labels.sqlite3"
