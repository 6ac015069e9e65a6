"""Security: hashed credentials, expiring sessions, CSRF, escaping, own assignments only, lead-only pages."""

from __future__ import annotations

import re
import time

import pytest

from rlhfkit.labelapp import db, project
from rlhfkit.labelapp.app import create_app

from .conftest import PASSWORD, TEST_SETTINGS, XSS_IMG, XSS_SCRIPT, api_login, new_client, next_item, submit


def form_login(client, name, password=PASSWORD):
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"name": name, "password": password, "csrf_token": token}, follow_redirects=False)


def csrf_of(html: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)


def test_passwords_are_stored_hashed(project_dir):
    with db.opened(project_dir) as conn:
        stored = [r[0] for r in conn.execute("SELECT password_hash FROM users")]
    assert all(h.startswith("scrypt$") and PASSWORD not in h for h in stored)
    assert len(set(stored)) == len(stored)  # per-user salt


def test_wrong_password_and_unknown_user_look_alike(client):
    a = client.post("/api/session", json={"name": "alice", "password": "nope-nope"})
    b = client.post("/api/session", json={"name": "mallory", "password": "nope-nope"})
    assert a.status_code == b.status_code == 401 and a.json() == b.json()
    assert form_login(client, "alice", "bad-password").status_code == 401


def test_sessions_expire(project_dir):
    client = new_client(create_app(project_dir, {**TEST_SETTINGS, "session_seconds": 1.0}))
    csrf = api_login(client, "alice")
    assert client.get("/api/progress").status_code == 200
    time.sleep(1.2)
    r = client.get("/api/progress")
    assert r.status_code == 401 and "expired" in r.json()["error"]
    assert client.get("/label", follow_redirects=False).headers["location"] == "/login"
    assert client.post("/api/next", headers={"X-CSRF-Token": csrf}).status_code == 401


def test_logout_ends_the_session(client):
    csrf = api_login(client, "alice")
    assert client.request("DELETE", "/api/session", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert client.get("/api/progress").status_code == 401


def test_csrf_required_on_json_and_forms(app):
    client = new_client(app)
    csrf = api_login(client, "lead")
    assert client.post("/api/next").status_code == 403
    r = client.post("/api/next", headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403 and "X-CSRF-Token" in r.json()["error"]
    # form without / with a wrong token
    assert client.post("/lead/people", data={"name": "eve"}).status_code == 403
    assert client.post("/lead/people", data={"name": "eve", "csrf_token": "x"}).status_code == 403
    ok = client.post("/lead/people", data={"name": "eve", "csrf_token": csrf})
    assert ok.status_code == 200 and "/invite/" in ok.text
    # sign-in form: a token that does not match the cookie set with the form is refused
    anon = new_client(app)
    anon.get("/login")
    r = anon.post("/login", data={"name": "alice", "password": PASSWORD, "csrf_token": "guess"})
    assert r.status_code == 403


def test_model_text_is_escaped_everywhere(app, project_dir):
    client = new_client(app)
    assert form_login(client, "alice").status_code == 303
    html = client.get("/label").text
    assert "Say hi" in html and "onerror" in html  # item 0 (the hostile one) is shown first
    assert XSS_SCRIPT not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;raw&lt;/b&gt;" in html  # raw HTML in the Markdown guidelines is not rendered either
    assert "<strong>polite</strong>" in html  # ... while Markdown is
    assert "script-src 'self'" in client.get("/label").headers["content-security-policy"]
    # the lead's page shows flagged text and comments: escaped too
    csrf = csrf_of(html)
    aid = int(re.search(r'data-assignment="(\d+)"', html).group(1))
    r = submit(client, csrf, aid, [[0], [1], [2]], "xss-flag-0001", flags=[{"position": 0, "reason": "unsafe"},
               {"position": 1, "reason": "unsafe"}, {"position": 2, "reason": "unsafe"}], comment=XSS_IMG)
    assert r.status_code == 201
    lead = new_client(app)
    form_login(lead, "lead")
    page = lead.get("/lead").text
    assert "Flagged replies" in page and XSS_IMG not in page and XSS_SCRIPT not in page
    assert "&lt;img src=x onerror=" in page


def test_labelers_reach_only_their_own_assignments(app):
    alice, bob = new_client(app), new_client(app)
    ca, cb = api_login(alice, "alice"), api_login(bob, "bob")
    mine = next_item(alice, ca)["assignment"]["assignment_id"]
    assert alice.get(f"/api/assignments/{mine}").status_code == 200
    r = bob.get(f"/api/assignments/{mine}")
    assert r.status_code == 404 and "your assignments" in r.json()["error"]
    assert submit(bob, cb, mine, [[0], [1], [2]], "bob-steals-01").status_code == 404
    assert bob.post(f"/api/assignments/{mine}/skip", headers={"X-CSRF-Token": cb}).status_code == 404
    # and nothing another labeler answered is visible: the API has no route that lists others' answers
    assert bob.get("/api/lead/stats").status_code == 403


@pytest.mark.parametrize("method,path", [("GET", "/lead"), ("POST", "/lead/export"), ("POST", "/lead/people"),
                                         ("GET", "/lead/exports/latest/comparisons.jsonl"), ("GET", "/api/lead/stats")])
def test_lead_pages_need_the_lead_role(app, method, path):
    anon = new_client(app)
    r = anon.request(method, path, follow_redirects=False)
    assert r.status_code in (401, 303, 403) and r.status_code != 200
    labeler = new_client(app)
    csrf = api_login(labeler, "alice")
    r = labeler.request(method, path, data={"csrf_token": csrf, "name": "x"} if method == "POST" else None)
    assert r.status_code == 403


def test_lead_can_export_and_download(app):
    lead = new_client(app)
    csrf = api_login(lead, "lead")
    assert lead.get("/api/lead/stats").status_code == 200
    r = lead.post("/lead/export", data={"csrf_token": csrf})
    assert r.status_code == 200 and "Exported" in r.text
    assert lead.get("/lead/exports/latest/comparisons.jsonl").status_code == 200
    assert lead.get("/lead/exports/latest/..%2Fschema.sql").status_code == 404


def test_invitation_links_work_once_and_expire(app, project_dir):
    with db.opened(project_dir) as conn, db.transaction(conn):
        token = project.add_person(conn, "dora", "labeler")
        stale = project.add_person(conn, "ed", "labeler", invite_seconds=-1)
    client = new_client(app)
    page = client.get(f"/invite/{token}")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post(f"/invite/{token}", data={"password": "dora-secret-1", "password2": "dora-secret-1", "csrf_token": csrf})
    assert r.status_code == 200 and "Password set for dora" in r.text
    assert api_login(new_client(app), "dora", "dora-secret-1")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get(f"/invite/{token}").text).group(1)
    again = client.post(f"/invite/{token}", data={"password": "other-pass-2", "password2": "other-pass-2", "csrf_token": csrf})
    assert again.status_code == 400
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get(f"/invite/{stale}").text).group(1)
    r = client.post(f"/invite/{stale}", data={"password": "ed-secret-12", "password2": "ed-secret-12", "csrf_token": csrf})
    assert r.status_code == 400 and "expired" in r.text


def test_repeated_failed_sign_ins_are_throttled(project_dir):
    client = new_client(create_app(project_dir, {**TEST_SETTINGS, "max_failed_logins": 3}))
    for _ in range(3):
        assert client.post("/api/session", json={"name": "alice", "password": "guess-guess"}).status_code == 401
    r = client.post("/api/session", json={"name": "alice", "password": PASSWORD})  # even the right one, for now
    assert r.status_code == 429 and "too many failed sign-ins" in r.json()["error"]
    assert form_login(client, "alice").status_code == 429
    assert api_login(client, "bob")  # other people are not affected


def test_session_cookie_attributes(client):
    r = client.post("/api/session", json={"name": "alice", "password": PASSWORD})
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=28800" in cookie
    for header in ("content-security-policy", "x-frame-options", "x-content-type-options", "referrer-policy"):
        assert header in r.headers
