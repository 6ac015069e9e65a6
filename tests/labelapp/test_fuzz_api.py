"""Property-based fuzz of the JSON API from its own OpenAPI schema (schemathesis + hypothesis).

Valid and malformed/hostile inputs (negative mode: wrong types, missing fields, odd strings) are sent as
a signed-in labeler with a valid CSRF token, so the requests get past authentication and reach the
handlers. Property: every answer is < 500, and every 4xx carries a JSON {"error": "..."} message.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient

from rlhfkit.labelapp.app import create_app

from .conftest import PASSWORD, TEST_SETTINGS, make_project

EXAMPLES = 60  # per operation and mode: keeps the whole fuzz test well under a minute


# schemathesis parametrizes at collection time, so this one test module builds its project at import
# (schemathesis.pytest.from_fixture would allow a fixture, but it fails on this pytest version).
_tmp = Path(tempfile.mkdtemp(prefix="rlhfkit-fuzz-"))
atexit.register(shutil.rmtree, _tmp, ignore_errors=True)
fuzz_app = create_app(make_project(_tmp / "fuzz", n_items=30), TEST_SETTINGS)
schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
schema.config.generation.update(modes=["positive", "negative"], max_examples=EXAMPLES, deterministic=True)


@pytest.fixture(scope="module")
def auth():
    # A labeler session with one open assignment, so ids in generated requests sometimes hit real rows.
    client = TestClient(fuzz_app)
    r = client.post("/api/session", json={"name": "alice", "password": PASSWORD})
    csrf = r.json()["csrf_token"]
    client.post("/api/next", headers={"X-CSRF-Token": csrf})
    session = fuzz_app.state.config.cookies.session
    return {"headers": {"X-CSRF-Token": csrf}, "cookies": {session: client.cookies[session]}}



@schema.parametrize()
def test_api_never_fails_with_a_server_error(case, auth):
    if case.method == "DELETE" and case.path == "/api/session":
        response = case.call()  # signed out: signing out the shared session would turn the rest into 401s
    else:
        response = case.call(headers={**(case.headers or {}), **auth["headers"]}, cookies=auth["cookies"])
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body.get("error"), str) and len(body["error"]) > 5, body
