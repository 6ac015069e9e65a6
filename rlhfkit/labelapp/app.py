"""The FastAPI application factory (Flask-tutorial style): one app per project directory.

    app = create_app(project_dir, test_config={"scrypt_n": 2**4, "session_seconds": 5})

The app is assembled here from its parts: `pages` (HTML for people), `api` (JSON under /api, the only
part in the OpenAPI schema), `deps` (connection, user, CSRF), and the error handlers and security headers
below. A strict Content-Security-Policy (scripts and styles only from /static, no inline code) backs up
Jinja2's autoescaping: even a `<script>` that slipped through would not run.
"""

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt
from markupsafe import Markup
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.errors import RlhfkitError
from rlhfkit.labelapp import api, db, pages, project, security
from rlhfkit.labelapp.assignment import AppError
from rlhfkit.labelapp.deps import LoginRequired, LoginThrottle

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

@dataclass
class AppConfig:
    """Settings of one running app; tests override any of them through create_app's test_config."""

    project_dir: Path
    session_seconds: float = 8 * 3600  # a working day; then sign in again
    invite_seconds: float = project.INVITE_SECONDS
    scrypt_n: int = security.SCRYPT_N  # tests lower it: hashing cost is not what they test
    cookie_secure: bool = False  # set True behind HTTPS (the default serve address is loopback)
    elo_rounds: int = 200  # bootstrap rounds for the lead page's Elo intervals
    max_failed_logins: int = 10  # per name within login_window_seconds, then sign-in answers 429
    login_window_seconds: float = 900


# Markdown for guidelines: raw HTML off (written by the lead, but still never executed), and
# markdown-it's link validation drops javascript: URLs.
_markdown = MarkdownIt("commonmark", {"html": False})


def render_markdown(text: str) -> Markup:
    return Markup(_markdown.render(text or ""))


def create_app(project_dir: str | Path, test_config: dict | None = None) -> FastAPI:
    config = AppConfig(project_dir=Path(project_dir), **(test_config or {}))
    db.init_db(db.db_path(config.project_dir))

    app = FastAPI(title="rlhfkit labeling", version="1", docs_url=None, redoc_url=None,
                  description="JSON API of the rlhfkit labeling app. State-changing calls need the X-CSRF-Token "
                              "header returned by POST /api/session. Errors: {\"error\": message}.")
    package = resources.files("rlhfkit.labelapp")
    templates = Jinja2Templates(directory=str(package / "templates"))  # autoescape is on for .html
    templates.env.filters["markdown"] = render_markdown
    app.state.config = config
    app.state.templates = templates
    app.state.throttle = LoginThrottle(config.max_failed_logins, config.login_window_seconds)
    app.mount("/static", StaticFiles(directory=str(package / "static")), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    install_error_handlers(app)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"  # invitation links must not leak via Referer
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal is a 4xx with a message: JSON {"error": ...} under /api, an error page elsewhere."""

    def answer(request: Request, status: int, message: str, headers=None):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status, headers=headers)
        return pages.page(request, "error.html", status=status, message=message, user=None)

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
        # One readable line per problem ("body.rankings: Field required") instead of pydantic's raw dump.
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return answer(request, 422, "invalid request: " + "; ".join(problems[:5]))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404 and not request.url.path.startswith("/api/"):
            return answer(request, 404, "Page not found.")
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": f"{message}: {request.method} {request.url.path}"}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))
