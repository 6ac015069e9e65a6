"""Request plumbing shared by the pages and the JSON API: a DB connection per request, the signed-in
user, role and CSRF checks, and signing in (with a throttle on failed attempts).

Dependencies read the app's settings from `request.app.state.config` (an app.AppConfig), so the same
routes serve any project directory the factory was given.

No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
"""

import ipaddress
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
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
    """Failed sign-ins, counted per client address and per (client address, name); in memory (one server
    process serves a project).

    Nothing here locks an account: guesses from one address never refuse the same name from another, so
    nobody can lock a real user (or the lead) out. An address that failed `per_name` times for a name
    within the window is refused for that name, and one that failed `per_client` times for any names is
    refused altogether, until its oldest counted failure leaves the window.

    Memory is bounded without ever forgetting a recent failure under a spray of names: every count keeps
    at most its limit of timestamps (a fixed-size deque drops the oldest), and an address's names are
    bounded by `per_client` (once reached, the address is refused before a new name is recorded). Only the
    number of addresses is open; it is capped at `max_clients`, dropping the address whose last failure
    is oldest -- which hands an attacker nothing that owning that many addresses does not already give.
    IPv6 addresses count per /64 network, which one client can rotate through.
    """

    def __init__(self, per_name: int, per_client: int, window_seconds: float, max_clients: int = 10_000):
        self.per_name, self.per_client, self.window, self.max_clients = per_name, per_client, window_seconds, max_clients
        self.clients: OrderedDict[str, _ClientFailures] = OrderedDict()  # oldest last failure first
        self.lock = threading.Lock()  # sign-ins run in the thread pool

    def check(self, client: str, name: str) -> None:
        now = time.time()
        with self.lock:
            record = self.clients.get(client)
            if record is None:
                return
            self._refuse_if_full(record.all, self.per_client, now, "from your address")
            self._refuse_if_full(record.names.get(name, ()), self.per_name, now, f"for {name!r} from your address")

    def _refuse_if_full(self, times, limit: int, now: float, whom: str) -> None:
        recent = [t for t in times if t > now - self.window]
        if len(recent) >= limit:
            wait = int(recent[-limit] + self.window - now) // 60 + 1
            raise AppError(429, f"too many failed sign-ins {whom}; try again in {wait} minute(s) or ask your lead")

    def failed(self, client: str, name: str) -> None:
        now = time.time()
        with self.lock:
            record = self.clients.pop(client, None) or _ClientFailures(deque(maxlen=self.per_client), {})
            self.clients[client] = record  # now the most recent
            record.all.append(now)
            times = record.names.pop(name, None) or deque(maxlen=self.per_name)
            record.names[name] = times  # re-inserted: names stay ordered by last failure too
            times.append(now)
            # More names than per_client only through failures that left the window (an address with
            # per_client recent failures is refused before it gets here): drop the oldest.
            while len(record.names) > self.per_client:
                record.names.pop(next(iter(record.names)))
            # forget what left the window (oldest first), then cap the number of addresses
            while self.clients and next(iter(self.clients.values())).all[-1] <= now - self.window:
                self.clients.popitem(last=False)
            while len(self.clients) > self.max_clients:
                self.clients.popitem(last=False)

    def succeeded(self, client: str, name: str) -> None:
        with self.lock:
            record = self.clients.get(client)
            if record is not None:
                record.names.pop(name, None)


@dataclass
class _ClientFailures:
    all: deque  # times of this address's latest failures, any name
    names: dict  # name -> deque of times, ordered by last failure


def client_key(request: Request) -> str:
    """The address sign-in failures are counted against (uvicorn applies X-Forwarded-For from trusted
    proxies, FORWARDED_ALLOW_IPS, before this sees it); IPv6 counts per /64 network."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def sign_in(request: Request, conn, name: str, password: str) -> tuple[str, User] | None:
    """Check a name and password; on success create a session and return (cookie value, user).

    Every attempt that passes the throttle runs exactly one scrypt verification: against the stored hash,
    or against the app's dummy hash when the name is unknown or has no password yet, so the time taken
    tells nothing about which names exist or have signed up.
    """
    config, throttle = request.app.state.config, request.app.state.throttle
    client = client_key(request)
    throttle.check(client, name)
    row = conn.execute("SELECT id, password_hash FROM users WHERE name = ? AND active = 1", (name,)).fetchone()
    stored = row["password_hash"] if row is not None else None
    matches = security.verify_password(password, stored or request.app.state.dummy_hash)
    if not (matches and stored):
        throttle.failed(client, name)
        return None
    throttle.succeeded(client, name)
    token = security.create_session(conn, row["id"], config.session_seconds)
    return token, security.session_user(conn, token)
