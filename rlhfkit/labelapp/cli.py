"""`rlhfkit label ...`: the labeling app's command line (the main CLI forwards here).

    rlhfkit label create PROJECT_DIR (--completions F | --policy DIR --prompts F) [--mode ranking|thumbs] [options]
                         [--temperature 1.0] [--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R] [--stop S]
    rlhfkit label serve PROJECT_DIR [--host 127.0.0.1] [--port 8000] [--base-url URL] [--allowed-host NAME]
                        [--cookie-secure] [--max-body-kb 1024] [--max-upload-mb 64] [--forwarded-allow-ips ADDRS]
    rlhfkit label add-labeler PROJECT_DIR NAME [--lead] [--password-stdin]
    rlhfkit label export PROJECT_DIR --out DIR [--min-agreement X] [--complete-only]
    rlhfkit label status PROJECT_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from rlhfkit.core.errors import ConfigError, RlhfkitError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DEFAULT_MAX_BODY_KB, DEFAULT_MAX_UPLOAD_MB = 1024, 64  # any request body; the lead's project upload
WILDCARD_HOSTS = ("0.0.0.0", "::")
WEB_MODULES = {"fastapi", "starlette", "uvicorn", "jinja2", "multipart", "python_multipart", "markdown_it", "pydantic"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfkit label", description="The labeling web app for human rankings.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create", help="create a labeling project from completions or a policy")
    p.add_argument("project_dir", type=Path)
    p.add_argument("--completions", type=Path, help='JSONL of {"prompt", "completions"[, "model_ids"][, "item_id"]}')
    p.add_argument("--policy", type=Path, help="policy directory to sample K completions per prompt from")
    p.add_argument("--prompts", type=Path, help="prompts file (one per line, or JSONL with 'prompt'); with --policy")
    p.add_argument("--mode", choices=("ranking", "thumbs"), default="ranking",
                   help="what labelers give: a ranking of the replies, or a thumb up/down on each (for KTO)")
    p.add_argument("--k", type=int, default=4,
                   help="completions per prompt when sampling (2-9; 1-9 with --mode thumbs)")
    p.add_argument("--overlap", type=int, default=1, help="labelers per item")
    p.add_argument("--criteria", default="overall", help="comma-separated, e.g. helpfulness,harmlessness")
    p.add_argument("--strength", action="store_true", help="ask how much better each rank is (margins)")
    p.add_argument("--guidelines", type=Path, help="Markdown file shown to labelers")
    p.add_argument("--name", default=None, help="project name (default: the directory's name)")
    p.add_argument("--lease-minutes", type=float, default=30, help="unanswered items return to the pool after this")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest completion sampled from the policy")
    # The pipeline's [sampling] filters, so people can rank what a run would sample; unset = the policy's
    # generation_config.json (as `rlhfkit run` with policy.path), else off.
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (as feedback.temperature)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most probable tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=float, default=None, help="keep tokens at least this x the top one's probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 makes repeated tokens less likely")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a completion at this text (repeatable)")

    p = sub.add_parser("serve", help="run the web app")
    p.add_argument("project_dir", type=Path)
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--base-url", default=None, help="the address people open, e.g. https://labels.example.org "
                   "(invitation links use it; default http://HOST:PORT; required with --host 0.0.0.0)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another host name the app answers to (repeatable; '*' for any)")
    p.add_argument("--cookie-secure", action="store_true",
                   help="send the session cookie over HTTPS only (on by itself with an https --base-url)")
    p.add_argument("--max-body-kb", type=int, default=DEFAULT_MAX_BODY_KB, help="largest request body, in KiB")
    p.add_argument("--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_MB,
                   help="largest project upload (the lead's completions or prompts file), in MiB")
    p.add_argument("--forwarded-allow-ips", default="", metavar="ADDRS",
                   help="comma-separated addresses of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto "
                        "the app believes (default: none, the connection's address counts; '*': any)")

    p = sub.add_parser("add-labeler", help="add a labeler (or lead) and print their invitation link")
    p.add_argument("project_dir", type=Path)
    p.add_argument("name")
    p.add_argument("--lead", action="store_true", help="give this person the lead's role")
    p.add_argument("--password-stdin", action="store_true", help="read a password from stdin instead of inviting")
    p.add_argument("--base-url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}", help="the app's address, for the link")

    p = sub.add_parser("export", help="write comparisons.jsonl and rankings.jsonl")
    p.add_argument("project_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--min-agreement", type=float, default=None, help="leave out items whose labelers agree less")
    p.add_argument("--complete-only", action="store_true", help="only items that have all `overlap` answers")

    p = sub.add_parser("status", help="progress and agreement")
    p.add_argument("project_dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except RlhfkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system refusal the checks did not foresee (permissions, a full disk)
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        # Only `serve` needs the web stack; everything else runs on the core install.
        if e.name and e.name.split(".")[0] in WEB_MODULES:
            print(f"error: `rlhfkit label {args.command}` needs the web app's packages ({e.name} is missing); "
                  "install them with: pip install 'rlhfkit[app]'", file=sys.stderr)
            return 2
        raise


def _require_project(project_dir: Path) -> None:
    from rlhfkit.labelapp import db

    if not db.db_path(project_dir).is_file():
        raise ConfigError(f"{project_dir}: no labeling project here; create one with `rlhfkit label create {project_dir} ...`")


def _sampling(args):
    """The sampling filters of `create --policy`: each flag given, else the policy's generation_config.json, else
    off; checked here (a flag's name in the error), not as a traceback from the sampler."""
    from rlhfkit.core.generation import generation_defaults
    from rlhfkit.models.sampling import SamplingParams

    values = generation_defaults(Path(args.policy) / "generation_config.json")
    given = {"top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
             "repetition_penalty": args.repetition_penalty, "stop": args.stop}
    values.update({k: v for k, v in given.items() if v is not None})
    checks = [("temperature", args.temperature, args.temperature > 0, "above 0"),
              ("top-k", values.get("top_k", 0), values.get("top_k", 0) >= 0, "at least 0 (0 = off)"),
              ("top-p", values.get("top_p", 1.0), 0 < values.get("top_p", 1.0) <= 1, "in (0, 1] (1 = off)"),
              ("min-p", values.get("min_p", 0.0), 0 <= values.get("min_p", 0.0) < 1, "in [0, 1) (0 = off)"),
              ("repetition-penalty", values.get("repetition_penalty", 1.0), values.get("repetition_penalty", 1.0) > 0,
               "above 0 (1 = off)")]
    for flag, value, ok, want in checks:
        if not ok:
            origin = "" if given.get(flag.replace("-", "_")) is not None or flag == "temperature" else \
                f" (from {Path(args.policy) / 'generation_config.json'})"
            raise ConfigError(f"--{flag} {value}{origin}: give a value {want}")
    return SamplingParams(int(values.get("top_k", 0)), float(values.get("top_p", 1.0)), float(values.get("min_p", 0.0)),
                          float(values.get("repetition_penalty", 1.0)), tuple(values.get("stop", ())))


def cmd_create(args) -> int:
    from rlhfkit.labelapp import project

    if (args.completions is None) == (args.policy is None):
        raise ConfigError("create: give exactly one of --completions FILE or --policy DIR (with --prompts FILE)")
    if args.policy is not None and args.prompts is None:
        raise ConfigError("create: --policy needs --prompts FILE")
    if not (math.isfinite(args.lease_minutes) and 0 < args.lease_minutes <= project.MAX_LEASE_SECONDS / 60):
        raise ConfigError(f"--lease-minutes {args.lease_minutes}: give a number of minutes above 0 and at most "
                          f"{project.MAX_LEASE_SECONDS // 60} (7 days)")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    guidelines = "" if args.guidelines is None else project.read_text(args.guidelines, "guidelines file")
    settings = project.ProjectSettings(
        name=args.name or args.project_dir.resolve().name, criteria=[c.strip() for c in args.criteria.split(",") if c.strip()],
        k=args.k, overlap=args.overlap, ask_strength=args.strength, guidelines=guidelines,
        lease_seconds=max(1, round(args.lease_minutes * 60)), mode=args.mode,
    ).validate()
    if args.completions is not None:
        items, source = project.load_completions(args.completions, args.mode), str(args.completions)
    else:
        items = project.sample_items(args.policy, project.load_prompts(args.prompts), args.k, seed=args.seed,
                                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     sampling=_sampling(args))
        source = str(args.policy)
    n = project.create_project(args.project_dir, settings, items, source)
    print(f"created {args.project_dir} with {n} items; next: `rlhfkit label add-labeler {args.project_dir} NAME`"
          f" and `rlhfkit label serve {args.project_dir}`")
    return 0


def cmd_add_labeler(args) -> int:
    from rlhfkit.labelapp import db, project

    db.init_db(db.db_path(args.project_dir))
    with db.opened(args.project_dir) as conn, db.transaction(conn):
        token = project.add_person(conn, args.name, "lead" if args.lead else None)
        if args.password_stdin:
            project.set_password(conn, args.name, sys.stdin.readline().rstrip("\n"))
    with db.opened(args.project_dir) as conn:
        role = conn.execute("SELECT role FROM users WHERE name = ?", (args.name,)).fetchone()["role"]
    if args.password_stdin:
        print(f"added {role} {args.name} with the given password")
    else:
        print(f"added {role} {args.name}; send them this one-time link (valid 7 days) to choose a password:")
        print(f"  {args.base_url.rstrip('/')}/invite/{token}")
    return 0


def lead_invitation_if_needed(project_dir: Path, base_url: str) -> str | None:
    """An invitation link for a first lead, when the project has no lead at all.

    A lead who was invited but has not signed up keeps their link: printing a fresh one at every start
    would silently invalidate the one already sent (`add-labeler NAME --lead` makes a new one on purpose).
    """
    from rlhfkit.labelapp import db, project

    with db.opened(project_dir) as conn, db.transaction(conn):
        if conn.execute("SELECT 1 FROM users WHERE role = 'lead'").fetchone():
            return None
        token = project.add_person(conn, "lead", "lead")
    return f"{base_url.rstrip('/')}/invite/{token}"


def serve_config(args) -> dict:
    """The app's settings (app.AppConfig fields) from `serve`'s options."""
    from rlhfkit.labelapp.guard import LOOPBACK_HOSTS

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: choose a port between 1 and 65535")
    wildcard = args.host in WILDCARD_HOSTS
    if args.base_url is None:
        if wildcard:
            raise ConfigError(f"--host {args.host} listens on every interface: give --base-url http://NAME:{args.port}, "
                              "the address people open (invitation links use it; other host names are refused)")
        base_url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
    else:
        base_url = args.base_url.rstrip("/")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--base-url {args.base_url!r}: give the address people open, e.g. https://labels.example.org")
    for option, value in (("--max-body-kb", args.max_body_kb), ("--max-upload-mb", args.max_upload_mb)):
        if value < 1:
            raise ConfigError(f"{option} {value}: give at least 1")
    hosts = {*LOOPBACK_HOSTS, urlsplit(base_url).hostname, *args.allowed_host, *([] if wildcard else [args.host])}
    return {"base_url": base_url, "allowed_hosts": sorted(hosts),
            "cookie_secure": args.cookie_secure or base_url.startswith("https://"),
            "max_body_bytes": args.max_body_kb * 1024, "max_upload_bytes": args.max_upload_mb * 2**20,
            "forwarded_allow_ips": [a.strip() for a in args.forwarded_allow_ips.split(",") if a.strip()]}


def cmd_serve(args) -> int:
    import uvicorn

    from rlhfkit.labelapp import db
    from rlhfkit.labelapp.app import create_app

    config = serve_config(args)
    db.init_db(db.db_path(args.project_dir))
    base = config["base_url"]
    link = lead_invitation_if_needed(args.project_dir, base)
    print(f"labeling app for {args.project_dir} at {base}/  (labelers sign in there)")
    if link:
        print(f"a lead account 'lead' was created; the lead opens this one-time link to choose a password:\n  {link}")
    if os.environ.get("FORWARDED_ALLOW_IPS") and not config["forwarded_allow_ips"]:
        print("note: FORWARDED_ALLOW_IPS is ignored; name the reverse proxy with --forwarded-allow-ips ADDRS",
              file=sys.stderr)
    sys.stdout.flush()
    # proxy_headers=False: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1, letting any local
    # client pick the address its failed sign-ins count against. The app believes only the proxies its
    # settings name (AppConfig.forwarded_allow_ips).
    uvicorn.run(create_app(args.project_dir, config), host=args.host, port=args.port, log_level="warning",
                proxy_headers=False)
    return 0


def cmd_export(args) -> int:
    from rlhfkit.labelapp.export import export_project

    _require_project(args.project_dir)
    summary = export_project(args.project_dir, args.out, min_agreement=args.min_agreement,
                             complete_only=args.complete_only)
    if summary.get("mode") == "thumbs":
        print(f"wrote {summary['thumbs']} thumbs ({summary['thumbs_up']} up) from {summary['items_exported']} items "
              f"to {args.out}")
    else:
        print(f"wrote {summary['comparisons']} comparisons and {summary['rankings']} rankings from "
              f"{summary['items_exported']} items to {args.out}")
    if summary["items_dropped_low_agreement"]:
        print(f"left out {len(summary['items_dropped_low_agreement'])} item(s) below agreement {args.min_agreement}")
    return 0


def cmd_status(args) -> int:
    from rlhfkit.labelapp import db, project, stats

    _require_project(args.project_dir)
    with db.opened(args.project_dir) as conn:
        settings = project.get_settings(conn)
        if settings is None:
            raise ConfigError(f"{args.project_dir}: the project has not been created yet")
        figures = stats.project_stats(conn, settings)
    print(f"{settings.name}: {figures['items_complete']}/{figures['items']} items complete "
          f"(overlap {settings.overlap}), {figures['submissions']} "
          f"{'items judged with thumbs' if settings.mode == 'thumbs' else 'rankings'}, {figures['skips']} skips")
    for c, fig in figures["criteria"].items():
        print(f"  {c}: " + ", ".join(f"{k}={'-' if v is None else f'{v:.3f}' if isinstance(v, float) else v}"
                                     for k, v in fig.items()))
    for p in figures["labelers"]:
        agree = p["agreement_with_consensus"]
        up = "" if p["up_rate"] is None else f"  share up {p['up_rate']:.2f}"
        print(f"  {p['role']:7s} {p['name']:20s} done {p['submitted']:4d}  skipped {p['skipped']:3d}  "
              f"agreement {'-' if agree is None else f'{agree:.2f}'}{up}")
    if figures["elo"]:
        print(json.dumps(figures["elo"], indent=1))
    if figures.get("up_rate_by_model"):
        print(json.dumps(figures["up_rate_by_model"], indent=1))
    return 0


COMMANDS = {"create": cmd_create, "serve": cmd_serve, "add-labeler": cmd_add_labeler, "export": cmd_export,
            "status": cmd_status}

if __name__ == "__main__":
    sys.exit(main())
