"""The FastAPI application factory (Flask-tutorial style): one app per project directory.

    app = create_app(project_dir, {"scrypt_n": 2**4, "session_seconds": 5})  # a test's settings
    app = create_app(project_dir, serve_config(args))                          # `rlhfkit label serve`

The app is assembled here from its parts: `pages` (HTML for people), `api` (JSON under /api, the only
part in the OpenAPI schema), `deps` (connection, user, CSRF), `guard` (allowed host names and body-size
limits, checked before any route reads a byte), and the error handlers and security headers below. A
strict Content-Security-Policy (scripts and styles only from /static, no inline code) backs up Jinja2's
autoescaping: even a `<script>` that slipped through would not run.
"""

import re
import secrets
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt
from markupsafe import Markup, escape
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.core.errors import RlhfkitError
from rlhfkit.labelapp import api, db, pages, project, security
from rlhfkit.labelapp.assignment import AppError
from rlhfkit.labelapp.deps import CookieNames, LoginRequired, LoginThrottle, cookie_names
from rlhfkit.labelapp.guard import LOOPBACK_HOSTS, RequestGuard
from rlhfkit.labelapp.pages import clip, error_response

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

@dataclass
class AppConfig:
    """Settings of one running app; `serve`'s options (cli.serve_config) and tests set them through
    create_app's `settings`."""

    project_dir: Path
    session_seconds: float = 8 * 3600  # a working day; then sign in again
    invite_seconds: float = project.INVITE_SECONDS
    scrypt_n: int = security.SCRYPT_N  # tests lower it: hashing cost is not what they test
    cookie_secure: bool = False  # set True behind HTTPS (the default serve address is loopback)
    elo_rounds: int = 200  # bootstrap rounds for the lead page's Elo intervals
    # per (client address, name), or per sign-in ticket, within login_window_seconds; then 429 for that pair
    max_failed_logins: int = 10
    max_failed_logins_per_client: int = 50  # per client address, any names, within the window, then 429
    login_window_seconds: float = 900
    base_url: str = "http://127.0.0.1:8000"  # invitation links are built from this, never from a request's Host
    allowed_hosts: list[str] = field(default_factory=lambda: list(LOOPBACK_HOSTS))  # Host headers served ("*": any)
    max_body_bytes: int = 2**20  # any request body (JSON calls, forms); a larger one is refused (413) unread
    max_upload_bytes: int = 64 * 2**20  # the lead's project upload (POST /lead/create with a lead session)
    # Reverse proxies whose X-Forwarded-For (the client's address) and X-Forwarded-Proto the app believes.
    # None by default: believed from anyone else, the header lets any client pick the address its failed
    # sign-ins are counted against (uvicorn's own default believes 127.0.0.1, i.e. every local client).
    forwarded_allow_ips: list[str] = field(default_factory=list)
    cookies: CookieNames = field(init=False)  # derived: per-project names (deps.cookie_names)

    def __post_init__(self):
        self.cookies = cookie_names(self.project_dir, self.cookie_secure)


# Markdown for guidelines: raw HTML off (written by the lead, but still never executed), and
# markdown-it's link validation drops javascript: URLs.
_markdown = MarkdownIt("commonmark", {"html": False})


def render_markdown(text: str) -> Markup:
    return Markup(_markdown.render(text or ""))


# Direction controls (the "Trojan Source" characters, CVE-2021-42574, and U+061C) are invisible but reorder
# the text around them, so a reply can read as something other than what it is ("\u202eSU 000,01" shows
# as "10,000 US"). People rank what they see: the pages show each as its code point in a box instead.
# Only the display changes; the stored text, the JSON API and the export keep the characters.
DIRECTION_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def show_controls(text: str | None) -> Markup:
    """Escaped text with each direction control replaced by a visible <span class="control">U+XXXX</span>."""
    return Markup(DIRECTION_CONTROLS.sub(
        lambda m: f'<span class="control" title="invisible direction control">U+{ord(m.group()):04X}</span>',
        str(escape(text or ""))))


def create_app(project_dir: str | Path, settings: dict | None = None) -> FastAPI:
    config = AppConfig(project_dir=Path(project_dir), **(settings or {}))
    db.init_db(db.db_path(config.project_dir))

    app = FastAPI(title="rlhfkit labeling", version="1", docs_url=None, redoc_url=None,
                  description="JSON API of the rlhfkit labeling app. State-changing calls need the X-CSRF-Token "
                              "header returned by POST /api/session. Errors: {\"error\": message}.")
    package = resources.files("rlhfkit.labelapp")
    templates = Jinja2Templates(directory=str(package / "templates"))  # autoescape is on for .html
    templates.env.filters["markdown"] = render_markdown
    templates.env.filters["show_controls"] = show_controls
    app.state.config = config
    app.state.templates = templates
    app.state.throttle = LoginThrottle(config.max_failed_logins, config.max_failed_logins_per_client,
                                       config.login_window_seconds)
    # Sign-in verifies against this when a name is unknown or has no password yet: the same work either way.
    app.state.dummy_hash = security.hash_password(secrets.token_urlsafe(32), config.scrypt_n)
    with db.opened(config.project_dir) as conn, db.transaction(conn):
        app.state.ticket_key = security.app_key(conn, "sign-in tickets")
    app.mount("/static", StaticFiles(directory=str(package / "static")), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    install_error_handlers(app)
    # Before any route: a wrong Host or an oversized body is refused unread (inside the security headers
    # below, which are added later and so wrap it).
    app.add_middleware(RequestGuard, config=config)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        # Invitation links must not leak to other sites via Referer; `same-origin` sends it to this app only.
        # (`no-referrer` also made browsers send `Origin: null` on the app's own form posts, hiding the
        # header that tells a sign-in form posted from another port apart: deps.check_origin.)
        response.headers["Referrer-Policy"] = "same-origin"
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    # Outermost, so every part (the guard, the throttle, the sign-in origin check) sees the client's
    # address and scheme that a trusted proxy forwarded; `serve` turns uvicorn's own handling off.
    if config.forwarded_allow_ips:
        # imported here: the app runs under any ASGI server, uvicorn's middleware is needed only for this
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=config.forwarded_allow_ips)
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal is a 4xx with a message: JSON {"error": ...} under /api, an error page elsewhere.
    Messages are clipped (pages.clip): no error answer echoes a large input back."""
    answer = error_response

    @app.exception_handler(AppError)
    async def on_app_error(request: Request, exc: AppError):
        return answer(request, exc.status, exc.message)

    @app.exception_handler(RlhfkitError)
    async def on_user_error(request: Request, exc: RlhfkitError):
        return answer(request, 400, str(exc))

    @app.exception_handler(LoginRequired)
    async def on_login_required(request: Request, exc: LoginRequired):
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        # One readable line per problem ("body.rankings: Field required") instead of pydantic's raw dump;
        # a location can hold a client's dict key, so each part is clipped too.
        problems = [f"{'.'.join(clip(str(p), 40) for p in e.get('loc', ()))}: {clip(str(e.get('msg', 'invalid')), 200)}"
                    for e in exc.errors()]
        return answer(request, 422, "invalid request: " + "; ".join(problems[:5]))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        api_path = request.scope["path"].startswith("/api/")
        if exc.status_code == 404 and not api_path:
            return answer(request, 404, "Page not found.")
        if exc.status_code in (404, 405):
            message = {404: "not found", 405: "method not allowed"}[exc.status_code]
            message = f"{message}: {request.method} {clip(request.scope['path'], 100)}"
        else:
            message = str(exc.detail)
        return answer(request, exc.status_code, message, headers=getattr(exc, "headers", None))
