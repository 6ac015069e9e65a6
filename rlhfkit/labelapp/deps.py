"""Request plumbing shared by the pages and the JSON API: a DB connection per request, the signed-in
user, role and CSRF checks, the app's cookies, and signing in (with a throttle on failed attempts).

Dependencies read the app's settings from `request.app.state.config` (an app.AppConfig), so the same
routes serve any project directory the factory was given.

No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
"""

import hashlib
import ipaddress
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Header, Request, Response

from rlhfkit.labelapp import db, security
from rlhfkit.labelapp.assignment import AppError
from rlhfkit.labelapp.security import User


@dataclass(frozen=True)
class CookieNames:
    session: str  # the session token
    login_csrf: str  # the sign-in forms' double-submit token
    ticket: str  # the sign-in ticket (security.new_ticket)


def cookie_names(project_dir: Path, secure: bool) -> CookieNames:
    """The app's cookie names, one set per project (app.AppConfig keeps them as `cookies`).

    Browsers keep cookies per host name, not per port: two projects served on one host under one name
    overwrote each other's session (signing in to one signed you out of the other). A suffix from the
    project's path keeps them apart. With Secure cookies the `__Host-` prefix makes browsers accept the
    cookie only from a secure page of this exact host, with Path=/ and no Domain: no http:// page, no
    subdomain can set or shadow them.
    """
    suffix = hashlib.sha256(str(Path(project_dir).resolve()).encode()).hexdigest()[:12]
    prefix = "__Host-" if secure else ""
    return CookieNames(*(f"{prefix}rlhfkit_{kind}_{suffix}" for kind in ("session", "login_csrf", "ticket")))


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
    return security.session_user(conn, session_token(request))


def session_token(request: Request) -> str | None:
    return request.cookies.get(request.app.state.config.cookies.session)


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
    """Sign-in forms have no session yet: the request must come from this app's own pages (check_origin),
    and carry the double-submit token (the form's token must match the cookie set with the form)."""
    check_origin(request)
    if not security.csrf_ok(request.cookies.get(request.app.state.config.cookies.login_csrf), token):
        raise AppError(403, "The form expired or did not come from this site. Reload the page and try again.")


def check_origin(request: Request) -> None:
    """Refuse a sign-in that a browser says was sent from a page of another origin.

    The double-submit cookie alone does not stop login CSRF (signing a victim in as the attacker, whose
    work they then do): cookies ignore ports, so a page on another port of this host can plant the cookie
    -- and any token a fresh /login page pairs with it -- then post the form. What no page can choose are
    the Origin and Sec-Fetch-Site headers the browser adds, and both tell ports apart. A request that has
    neither is not a browser steered by a page (curl, old browsers): the token alone decides.
    """
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    ours = {_origin(request.app.state.config.base_url), _origin(str(request.base_url))} - {None}
    other_site = site is not None and site not in ("same-origin", "none")
    if other_site or (origin is not None and _origin(origin) not in ours):
        raise AppError(403, "This form was sent from another site or port, not from this app's own page. "
                            "Open the sign-in page of this app and try again.")


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a URL or an Origin header, with the default port filled in; None for "null"
    (an opaque origin) or anything malformed."""
    try:
        parts = urlsplit(url.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def set_session_cookie(request: Request, response: Response, token: str, name: str) -> None:
    """The session cookie of a sign-in, and a fresh sign-in ticket for `name` (set_ticket_cookie)."""
    config = request.app.state.config
    response.set_cookie(config.cookies.session, token, max_age=max(1, math.ceil(config.session_seconds)),
                        httponly=True, samesite="strict", secure=config.cookie_secure, path="/")
    set_ticket_cookie(request, response, name)


def set_ticket_cookie(request: Request, response: Response, name: str) -> None:
    """A signed note that this browser signed in as `name` (or used their invitation): its next sign-ins
    as `name` are throttled on their own, not with its address (LoginThrottle)."""
    config = request.app.state.config
    response.set_cookie(config.cookies.ticket, security.new_ticket(request.app.state.ticket_key, name),
                        max_age=security.TICKET_SECONDS, httponly=True, samesite="strict",
                        secure=config.cookie_secure, path="/")


def delete_cookie(request: Request, response: Response, name: str) -> None:
    # With the attributes it was set with: a browser ignores a __Host- deletion that lacks Secure.
    response.delete_cookie(name, path="/", secure=request.app.state.config.cookie_secure, httponly=True,
                           samesite="strict")


class LoginThrottle:
    """Failed sign-ins, counted per client address, per (client address, name), and per sign-in ticket;
    in memory (one server process serves a project).

    An address that failed `per_name` times for a name within the window is refused for that name, and one
    that failed `per_client` times for any names is refused altogether, until its oldest counted failure
    leaves the window. Guesses from one address never refuse the same name from another.

    Many people can share one address (an office NAT, an SSH tunnel to the loopback default, a proxy whose
    address the app is not told to look behind): by address alone, anyone among them could keep everyone
    else out. Letting a right password through a throttled address would not fix that -- the guesser
    behind it would then get an answer to every guess, unthrottled. So the app tells browsers apart
    instead: a browser that signed in as a name before, or used that person's invitation, holds a signed
    ticket for the name (security.new_ticket), which a guesser can neither forge nor take from another
    name. Sign-ins with a valid ticket are counted against the ticket (`per_name` failures within the
    window) and not against the address, so no one else's guesses can keep that person out. A ticket that
    used up its failures counts for nothing (the client could as well drop it) and its sign-ins are
    counted against the address again.

    Memory is bounded without ever forgetting a recent failure under a spray of names: every count keeps
    at most its limit of timestamps (a fixed-size deque drops the oldest), and an address's names are
    bounded by `per_client` (once reached, the address is refused before a new name is recorded). Only the
    number of addresses (and of tickets, which only sign-ins mint) is open; each is capped at
    `max_clients`, dropping the one whose last failure is oldest -- which hands an attacker nothing that
    owning that many addresses does not already give. IPv6 addresses count per /64 network, which one
    client can rotate through.
    """

    def __init__(self, per_name: int, per_client: int, window_seconds: float, max_clients: int = 10_000):
        self.per_name, self.per_client, self.window, self.max_clients = per_name, per_client, window_seconds, max_clients
        self.clients: OrderedDict[str, _ClientFailures] = OrderedDict()  # oldest last failure first
        self.tickets: OrderedDict[str, deque] = OrderedDict()  # ticket id -> times of its failures, same order
        self.lock = threading.Lock()  # sign-ins run in the thread pool

    def check(self, client: str, name: str, ticket: str | None = None) -> None:
        """Refuse (429) an attempt from `client` for `name`; `ticket`: the id of a valid ticket for `name`."""
        now = time.time()
        with self.lock:
            if self._trusted(ticket, now):
                return
            record = self.clients.get(client)
            if record is None:
                return
            self._refuse_if_full(record.all, self.per_client, now, "from your address")
            self._refuse_if_full(record.names.get(name, ()), self.per_name, now, f"for {name!r} from your address")

    def _recent(self, times, now: float) -> list[float]:
        return [t for t in times if t > now - self.window]

    def _trusted(self, ticket: str | None, now: float) -> bool:
        return ticket is not None and len(self._recent(self.tickets.get(ticket, ()), now)) < self.per_name

    def _refuse_if_full(self, times, limit: int, now: float, whom: str) -> None:
        recent = self._recent(times, now)
        if len(recent) >= limit:
            wait = int(recent[-limit] + self.window - now) // 60 + 1
            raise AppError(429, f"too many failed sign-ins {whom}; try again in {wait} minute(s) or ask your lead")

    def failed(self, client: str, name: str, ticket: str | None = None) -> None:
        now = time.time()
        with self.lock:
            if self._trusted(ticket, now):
                times = self.tickets.pop(ticket, None) or deque(maxlen=self.per_name)
                self.tickets[ticket] = times  # now the most recent
                times.append(now)
                self._forget(self.tickets, now, lambda ticket_times: ticket_times[-1])
                return
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
            self._forget(self.clients, now, lambda record: record.all[-1])

    def _forget(self, records: OrderedDict, now: float, last_failure) -> None:
        """Drop what left the window (oldest first), then cap the number of records."""
        while records and last_failure(next(iter(records.values()))) <= now - self.window:
            records.popitem(last=False)
        while len(records) > self.max_clients:
            records.popitem(last=False)

    def succeeded(self, client: str, name: str, ticket: str | None = None) -> None:
        with self.lock:
            if self._trusted(ticket, time.time()):
                # A ticket's sign-in vouches for that browser only: the address's count for the name (others
                # behind it, perhaps guessing) stays.
                self.tickets.pop(ticket, None)
                return
            record = self.clients.get(client)
            if record is not None:
                record.names.pop(name, None)
            if ticket is not None:
                self.tickets.pop(ticket, None)


@dataclass
class _ClientFailures:
    all: deque  # times of this address's latest failures, any name
    names: dict  # name -> deque of times, ordered by last failure


def client_key(request: Request) -> str:
    """The address sign-in failures are counted against: the connection's peer, or the address a trusted
    proxy names in X-Forwarded-For (only from the proxies in AppConfig.forwarded_allow_ips, applied by
    app.create_app before this sees the request); IPv6 counts per /64 network."""
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
    tells nothing about which names exist or have signed up. The caller sets the cookies
    (set_session_cookie), a fresh sign-in ticket for the name among them.
    """
    config, throttle = request.app.state.config, request.app.state.throttle
    client = client_key(request)
    ticket = security.ticket_id(request.app.state.ticket_key, request.cookies.get(config.cookies.ticket), name)
    throttle.check(client, name, ticket)
    row = conn.execute("SELECT id, password_hash FROM users WHERE name = ? AND active = 1", (name,)).fetchone()
    stored = row["password_hash"] if row is not None else None
    matches = security.verify_password(password, stored or request.app.state.dummy_hash)
    if not (matches and stored):
        throttle.failed(client, name, ticket)
        return None
    throttle.succeeded(client, name, ticket)
    token = security.create_session(conn, row["id"], config.session_seconds)
    return token, security.session_user(conn, token)
