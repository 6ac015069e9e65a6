"""The request guard: allowed host names and body-size limits, checked before any route reads a byte.

A pure ASGI middleware that wraps every route (app.create_app adds it; only the security-headers
middleware sits outside it):

- Host: a request whose Host header names a host outside `allowed_hosts` (and the base URL's host) is
  refused with 400. A page served under any name invites DNS-rebinding; links never come from the Host
  header anyway (they use `base_url`).
- Body size: a declared Content-Length above the limit is refused with 413 at once, unread; a body sent
  without one (chunked) is counted as it streams and cut off with 413 at the limit. The limit is
  `max_body_bytes` for every request, and `max_upload_bytes` for the project upload (POST /lead/create)
  when the request carries a lead's session, so an anonymous client can never make the server take in
  more than `max_body_bytes`. FastAPI parses a body before it checks the session: without this guard an
  anonymous 200 MB body would be read and parsed in full, and one large JSON body stalls the event loop.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from rlhfkit.core.hosts import host_name, normalise_hosts
from rlhfkit.labelapp import db, security
from rlhfkit.labelapp.pages import error_response

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
UPLOAD_ROUTE = ("POST", "/lead/create")


class BodyTooLarge(HTTPException):
    """Raised by the counting `receive` when a streamed body passes the limit. An HTTPException, so the
    route's body parsing passes it on untouched and the app's handler answers 413."""

    def __init__(self, message: str):
        super().__init__(413, message)


class RequestGuard:
    def __init__(self, app: ASGIApp, config):
        self.app, self.config = app, config
        self.hosts = normalise_hosts([*config.allowed_hosts, urlsplit(config.base_url).hostname or ""])
        self.any_host = "*" in self.hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not self.any_host and host_name(headers.get("host")) not in self.hosts:
            await self.refuse(scope, receive, send, 400, "this app does not answer to the host name in the request's "
                              "Host header; if it is the app's address, add it with `rlhfkit label serve --allowed-host NAME`")
            return
        limit, hint = self.limit_for(scope, headers)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            status = 400 if not length.isdigit() else 413
            message = "invalid Content-Length header" if status == 400 else too_large(limit, hint)
            await self.refuse(scope, receive, send, status, message)
            return

        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(too_large(limit, hint))
            return message

        started = False

        async def watching_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as exc:  # raised where no handler caught it (outside a route's body parsing)
            if started:
                raise
            await self.refuse(scope, receive, send, 413, exc.detail)

    def limit_for(self, scope: Scope, headers: Headers) -> tuple[int, str]:
        config = self.config
        if (scope["method"], scope["path"]) != UPLOAD_ROUTE:
            return config.max_body_bytes, "serve --max-body-kb sets the limit"
        if self.is_lead(headers):
            return max(config.max_upload_bytes, config.max_body_bytes), "serve --max-upload-mb sets the upload limit"
        return config.max_body_bytes, "uploads need the lead's session"

    def is_lead(self, headers: Headers) -> bool:
        token = Request({"type": "http", "headers": headers.raw}).cookies.get(self.config.cookies.session)
        if not token:
            return False
        conn = db.connect(db.db_path(self.config.project_dir))
        try:
            user = security.session_user(conn, token)
        finally:
            conn.close()
        return user is not None and user.is_lead

    async def refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        response = error_response(Request(scope, receive), status, message)
        response.headers["Connection"] = "close"  # the unread body must not be taken for the next request
        await response(scope, receive, send)


def too_large(limit: int, hint: str) -> str:
    return f"request body too large: at most {limit} bytes here ({hint})"
