"""Request plumbing shared by the pages and the JSON API: a DB connection per request, the signed-in
user, role and CSRF checks, and signing in (with a throttle on failed attempts).

Dependencies read the app's settings from `request.app.state.config` (an app.AppConfig), so the same
routes serve any project directory the factory was given.

No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
"""

import math
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response

from rlhfkit.labelapp import db, security
from rlhfkit.labelapp.assignment import AppError
from rlhfkit.labelapp.security import User

SESSION_COOKIE = "rlhfkit_session"
LOGIN_CSRF_COOKIE = "rlhfkit_login_csrf"


class LoginRequired(Exception):
    """Raised by page dependencies; answered with a redirect to the sign-in page."""


def get_conn(request: Request) -> Iterator:
    conn = db.connect(db.db_path(request.app.state.config.project_dir))
    try:
        yield conn
    finally:
        conn.close()


Conn = Annotated[Any, Depends(get_conn)]  # one connection per request (FastAPI caches it per request)


def current_user(request: Request, conn: Conn) -> User | None:
    return security.session_user(conn, request.cookies.get(SESSION_COOKIE))


CurrentUser = Annotated[User | None, Depends(current_user)]


def api_user(user: CurrentUser) -> User:
    if user is None:
        raise AppError(401, "not signed in (or your session expired): POST /api/session with your name and password")
    return user


def api_user_csrf(user: Annotated[User, Depends(api_user)], x_csrf_token: Annotated[str | None, Header()] = None) -> User:
    """For state-changing JSON calls: a cross-site page can send the cookie, but cannot read the token."""
    if not security.csrf_ok(user.csrf_token, x_csrf_token):
        raise AppError(403, "missing or wrong X-CSRF-Token header: use the csrf_token from POST /api/session")
    return user


def api_lead(user: Annotated[User, Depends(api_user)]) -> User:
    if not user.is_lead:
        raise AppError(403, "this needs the lead's role")
    return user


def page_user(user: CurrentUser) -> User:
    if user is None:
        raise LoginRequired()
    return user


def page_lead(user: Annotated[User, Depends(page_user)]) -> User:
    if not user.is_lead:
        raise AppError(403, "This page is for the labeling lead.")
    return user


ApiUser = Annotated[User, Depends(api_user)]
ApiUserCsrf = Annotated[User, Depends(api_user_csrf)]
ApiLead = Annotated[User, Depends(api_lead)]
PageUser = Annotated[User, Depends(page_user)]
PageLead = Annotated[User, Depends(page_lead)]


def check_form_csrf(user: User, token: str | None) -> None:
    if not security.csrf_ok(user.csrf_token, token):
        raise AppError(403, "The form expired or did not come from this site. Reload the page and try again.")


def check_anon_csrf(request: Request, token: str | None) -> None:
    """Sign-in forms have no session yet: double-submit cookie (the form's token must match the cookie
    set with the form, which another site can neither read nor set)."""
    if not security.csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE), token):
        raise AppError(403, "The form expired or did not come from this site. Reload the page and try again.")


def set_session_cookie(request: Request, response: Response, token: str) -> None:
    config = request.app.state.config
    response.set_cookie(SESSION_COOKIE, token, max_age=max(1, math.ceil(config.session_seconds)), httponly=True,
                        samesite="strict", secure=config.cookie_secure, path="/")


class LoginThrottle:
    """Failed sign-ins per name, in memory: one server process serves a project, and a restart that
    forgets the count is not something an attacker can trigger."""

    def __init__(self, max_failures: int, window_seconds: float):
        self.max_failures, self.window = max_failures, window_seconds
        self.failures: dict[str, list[float]] = {}

    def check(self, name: str) -> None:
        now = time.time()
        recent = [t for t in self.failures.get(name, []) if t > now - self.window]
        self.failures[name] = recent
        if len(recent) >= self.max_failures:
            wait = int(recent[0] + self.window - now) // 60 + 1
            raise AppError(429, f"too many failed sign-ins for {name!r}; try again in {wait} minute(s) or ask your lead")

    def failed(self, name: str) -> None:
        if len(self.failures) > 10_000:  # bounded memory under a spray of made-up names
            self.failures.clear()
        self.failures.setdefault(name, []).append(time.time())

    def succeeded(self, name: str) -> None:
        self.failures.pop(name, None)


def sign_in(request: Request, conn, name: str, password: str) -> tuple[str, User] | None:
    """Check a name and password; on success create a session and return (cookie value, user)."""
    config, throttle = request.app.state.config, request.app.state.throttle
    throttle.check(name)
    row = conn.execute("SELECT id, password_hash FROM users WHERE name = ? AND active = 1", (name,)).fetchone()
    if row is None:
        security.verify_password(password, security.hash_password("x", config.scrypt_n))  # same time either way
    if row is None or not security.verify_password(password, row["password_hash"]):
        throttle.failed(name)
        return None
    throttle.succeeded(name)
    token = security.create_session(conn, row["id"], config.session_seconds)
    return token, security.session_user(conn, token)
