"""What a hostile user tried against a live server, one test per finding (each names what it guards against):
roles the app does not know, lockouts through a shared address, a client choosing its own address with
X-Forwarded-For, skips of lost leases, common passwords, sign-in forms posted from another port, projects
on one host signing each other out, boolean item ids, and direction-control characters in model text."""

from __future__ import annotations

import io
import json
import re
import sys

import httpx
import pytest
from fastapi.testclient import TestClient

from rlhfkit.core.errors import ConfigError, DataError
from rlhfkit.labelapp import db, project
from rlhfkit.labelapp.app import create_app
from rlhfkit.labelapp.cli import build_parser, main, serve_config

from .conftest import FAST_SCRYPT, PASSWORD, TEST_SETTINGS, api_login, make_project, new_client, next_item
from .server import Server


def config(**over):
    return {**TEST_SETTINGS, **over}


def client_at(app, address: str, **kwargs) -> TestClient:
    """A client whose requests come from `address` (what the throttle counts against)."""
    return TestClient(app, client=(address, 40000), **kwargs)


def form_token(client, path: str = "/login") -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text).group(1)


def form_login(client, name: str, password: str = PASSWORD, **headers):
    token = form_token(client)
    return client.post("/login", data={"name": name, "password": password, "csrf_token": token},
                       headers=headers, follow_redirects=False)


def user_names(project_dir) -> set[str]:
    with db.opened(project_dir) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM users")}


# -- 1. the lead's "add person" form takes only the roles the app knows --------------------------------


@pytest.mark.parametrize("role", ["admin", "", "Lead", " lead", "labeler\n"])
def test_the_add_person_form_refuses_roles_the_app_does_not_know(app, project_dir, role):
    lead = new_client(app)
    csrf = api_login(lead, "lead")
    r = lead.post("/lead/people", data={"name": "eve", "role": role, "csrf_token": csrf})
    assert r.status_code == 400 and "role" in r.text and "labeler" in r.text and "lead" in r.text
    assert "eve" not in user_names(project_dir)
    ok = lead.post("/lead/people", data={"name": "eve", "role": "labeler", "csrf_token": csrf})
    assert ok.status_code == 200 and "/invite/" in ok.text


# -- 2. nobody's failed guesses keep out a person who signed in from their browser before ---------------


def throttled_app(project_dir):
    return create_app(project_dir, config(max_failed_logins=3, max_failed_logins_per_client=5))


def exhaust(attacker) -> None:
    """Use up the address's failures: for alice (its per-name limit) and for any names (its own limit)."""
    for name in ("alice", "alice", "alice", "lead", "carol"):
        assert attacker.post("/api/session", json={"name": name, "password": "guess-guess"}).status_code == 401
    for name in ("alice", "bob", "nobody"):
        r = attacker.post("/api/session", json={"name": name, "password": "guess-again"})
        assert r.status_code == 429 and "too many failed sign-ins" in r.json()["error"]


def test_a_throttled_address_cannot_keep_out_someone_who_signed_in_there_before(project_dir):
    app = throttled_app(project_dir)
    alice, attacker = client_at(app, "198.51.100.7"), client_at(app, "198.51.100.7")  # one NAT, two browsers
    csrf = api_login(alice, "alice")
    assert alice.request("DELETE", "/api/session", headers={"X-CSRF-Token": csrf}).status_code == 200
    exhaust(attacker)
    # alice's browser signs in from the exhausted address, through the API and the form ...
    assert api_login(alice, "alice")
    assert form_login(alice, "alice").status_code == 303
    # ... while guesses from it stay refused, even with the right password from a browser without a ticket
    assert attacker.post("/api/session", json={"name": "alice", "password": PASSWORD}).status_code == 429
    assert form_login(attacker, "bob").status_code == 429


def test_guesses_through_a_sign_in_ticket_are_throttled_too(project_dir):
    app = throttled_app(project_dir)
    alice, attacker = client_at(app, "198.51.100.7"), client_at(app, "198.51.100.7")
    api_login(alice, "alice")
    exhaust(attacker)
    for _ in range(3):  # a stolen ticket (or a forgetful owner) gets the per-name number of tries, no more
        assert alice.post("/api/session", json={"name": "alice", "password": "guess-guess"}).status_code == 401
    assert alice.post("/api/session", json={"name": "alice", "password": PASSWORD}).status_code == 429


def test_a_sign_in_with_a_ticket_does_not_clear_the_address_count_of_others(project_dir):
    app = create_app(project_dir, config(max_failed_logins=3))
    alice, attacker = client_at(app, "198.51.100.7"), client_at(app, "198.51.100.7")
    api_login(alice, "alice")
    for _ in range(3):
        assert attacker.post("/api/session", json={"name": "alice", "password": "guess-guess"}).status_code == 401
    assert api_login(alice, "alice")  # through her ticket ...
    assert attacker.post("/api/session", json={"name": "alice", "password": "guess-guess"}).status_code == 429


def test_a_sign_in_ticket_is_bound_to_its_name_and_cannot_be_forged(project_dir):
    app = throttled_app(project_dir)
    alice, attacker = client_at(app, "198.51.100.7"), client_at(app, "198.51.100.7")
    api_login(alice, "alice")
    exhaust(attacker)
    ticket = next(c for c in alice.cookies.jar if c.name.startswith("rlhfkit_ticket"))
    attacker.cookies.set(ticket.name, ticket.value)  # alice's ticket does not let bob's guesser through
    assert attacker.post("/api/session", json={"name": "bob", "password": PASSWORD}).status_code == 429
    for forged in ("0.x.0", ticket.value[:-1] + ("1" if ticket.value.endswith("0") else "0"), ""):
        attacker.cookies.set(ticket.name, forged)
        assert attacker.post("/api/session", json={"name": "alice", "password": PASSWORD}).status_code == 429


def test_a_new_person_who_accepts_an_invitation_gets_in_from_a_throttled_address(project_dir):
    app = throttled_app(project_dir)
    exhaust(client_at(app, "198.51.100.7"))
    with db.opened(project_dir) as conn, db.transaction(conn):
        token = project.add_person(conn, "dora", "labeler")
    dora = client_at(app, "198.51.100.7")
    r = dora.post(f"/invite/{token}", data={"password": "dora-secret-1", "password2": "dora-secret-1",
                                            "csrf_token": form_token(dora, f"/invite/{token}")})
    assert r.status_code == 200 and "Password set for dora" in r.text
    assert form_login(dora, "dora", "dora-secret-1").status_code == 303


# -- 3. X-Forwarded-For is believed only from proxies named in the settings ----------------------------


def test_rotating_x_forwarded_for_does_not_escape_the_throttle_of_a_real_server(tmp_path):
    pytest.importorskip("uvicorn")
    server = Server(make_project(tmp_path / "p")).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            statuses = [http.post("/api/session", json={"name": "alice", "password": "guess-guess"},
                                  headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code for n in range(12)]
    finally:
        server.stop()
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]  # the default 10 per name and address


def test_forwarded_headers_are_believed_only_from_the_configured_proxies(project_dir):
    def guesses(app, address, rotate=True):
        client = client_at(app, address)
        return [client.post("/api/session", json={"name": "alice", "password": "guess-guess"},
                            headers={"X-Forwarded-For": f"203.0.113.{n if rotate else 1}"}).status_code
                for n in range(4)]

    assert guesses(create_app(project_dir, config(max_failed_logins=3)), "127.0.0.1")[-1] == 429
    behind = create_app(project_dir, config(max_failed_logins=3, forwarded_allow_ips=["10.0.0.1"]))
    assert guesses(behind, "10.0.0.1") == [401] * 4  # four people behind the proxy, one guess each
    assert guesses(behind, "10.0.0.1", rotate=False)[-1] == 429  # one person behind it, four guesses
    assert guesses(behind, "127.0.0.1")[-1] == 429  # any other client's header is ignored


def test_serve_trusts_forwarded_headers_only_when_told(project_dir, monkeypatch):
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    assert serve_config(build_parser().parse_args(["serve", str(project_dir)]))["forwarded_allow_ips"] == []
    args = build_parser().parse_args(["serve", str(project_dir), "--forwarded-allow-ips", "10.0.0.1, 10.0.0.2"])
    assert serve_config(args)["forwarded_allow_ips"] == ["10.0.0.1", "10.0.0.2"]
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.append(kwargs))
    assert main(["serve", str(project_dir), "--port", "8765"]) == 0
    assert calls[0]["proxy_headers"] is False  # uvicorn's own default believes 127.0.0.1


# -- 4. a skip of a lost lease is a conflict, like a submission --------------------------------------


def test_skipping_an_assignment_whose_lease_was_lost_is_a_conflict(tmp_path):
    pdir = make_project(tmp_path / "p", n_items=2, overlap=1)
    app = create_app(pdir, config())
    alice, bob = new_client(app), new_client(app)
    ca, cb = api_login(alice, "alice"), api_login(bob, "bob")
    mine = next_item(alice, ca)["assignment"]["assignment_id"]
    with db.opened(pdir) as conn, db.transaction(conn):
        conn.execute("UPDATE assignments SET lease_expires_at = 0 WHERE id = ?", (mine,))  # the lease ran out
    taken = next_item(bob, cb)["assignment"]
    assert taken["prompt"] == alice.get(f"/api/assignments/{mine}").json()["prompt"]  # bob holds the item now
    r = alice.post(f"/api/assignments/{mine}/skip", headers={"X-CSRF-Token": ca})
    assert r.status_code == 409 and "lease" in r.json()["error"]
    assert alice.get("/api/progress").json()["skipped"] == 0  # not counted as a skip
    again = alice.post(f"/api/assignments/{mine}/skip", headers={"X-CSRF-Token": ca})
    assert again.status_code == 409 and alice.get("/api/progress").json()["skipped"] == 0


def test_a_late_skip_while_the_slot_is_still_free_is_a_skip(tmp_path):
    pdir = make_project(tmp_path / "p", n_items=2, overlap=1)
    alice = new_client(create_app(pdir, config()))
    ca = api_login(alice, "alice")
    mine = next_item(alice, ca)["assignment"]["assignment_id"]
    with db.opened(pdir) as conn, db.transaction(conn):
        conn.execute("UPDATE assignments SET lease_expires_at = 0 WHERE id = ?", (mine,))
    assert alice.post(f"/api/assignments/{mine}/skip", headers={"X-CSRF-Token": ca}).status_code == 200
    assert alice.get("/api/progress").json()["skipped"] == 1


# -- 5. common passwords, sign-in forms from another port, cookies per project, item ids, bidi ---------


@pytest.mark.parametrize("password", ["password", "12345678", "qwertyuiop", "iloveyou", "Password1", "PASSWORD123"])
def test_common_passwords_are_refused(app, project_dir, password):
    with db.opened(project_dir) as conn, db.transaction(conn):
        token = project.add_person(conn, "dora", "labeler")
    client = new_client(app)
    r = client.post(f"/invite/{token}", data={"password": password, "password2": password,
                                              "csrf_token": form_token(client, f"/invite/{token}")})
    assert r.status_code == 400 and "common" in r.text
    with db.opened(project_dir) as conn, pytest.raises(ConfigError, match="common"):
        project.set_password(conn, "dora", password, scrypt_n=FAST_SCRYPT)
    r = client.post(f"/invite/{token}", data={"password": "dora-secret-1", "password2": "dora-secret-1",
                                              "csrf_token": form_token(client, f"/invite/{token}")})
    assert r.status_code == 200 and "Password set for dora" in r.text  # the link still works


def test_add_labeler_refuses_a_common_password(project_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("iloveyou\n"))
    assert main(["add-labeler", str(project_dir), "dora", "--password-stdin"]) == 2
    assert "common" in capsys.readouterr().err


def test_a_sign_in_form_posted_from_another_origin_is_refused(app):
    # A page on another port of this host can plant the sign-in form's cookie (cookies ignore ports), but
    # the browser names the page's origin in Origin and Sec-Fetch-Site, which no page can choose.
    for headers in ({"Origin": "http://testserver:8081"}, {"Origin": "null"}, {"Sec-Fetch-Site": "same-site"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}):
        r = form_login(new_client(app), "alice", **headers)
        assert r.status_code == 403 and "another site" in r.text, headers
    same = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert form_login(new_client(app), "alice", **same).status_code == 303
    assert form_login(new_client(app), "alice", Origin="http://127.0.0.1:8000").status_code == 303  # the base URL
    assert form_login(new_client(app), "alice").status_code == 303  # a client that sends neither: the token decides


def test_secure_cookies_carry_the_host_prefix(project_dir):
    app = create_app(project_dir, config(cookie_secure=True))
    client = TestClient(app, base_url="https://testserver")
    page = client.get("/login")
    login_cookie = page.headers["set-cookie"]
    assert login_cookie.startswith("__Host-") and "secure" in login_cookie.lower() and "path=/" in login_cookie.lower()
    r = form_login(client, "alice")
    assert r.status_code == 303
    assert {c.name[:7] for c in client.cookies.jar} == {"__Host-"}
    assert client.get("/api/progress").status_code == 200


def test_two_projects_on_one_host_keep_their_own_sessions(tmp_path):
    app_a = create_app(make_project(tmp_path / "a"), config())
    app_b = create_app(make_project(tmp_path / "b"), config())
    a, b = new_client(app_a), new_client(app_b)
    api_login(a, "alice")
    b.cookies = a.cookies  # one browser: cookies are per host name, whatever the port
    api_login(b, "alice")
    a.cookies = b.cookies
    assert a.get("/api/progress").status_code == 200  # signing in to b did not sign alice out of a
    assert b.get("/api/progress").status_code == 200


def test_a_boolean_item_id_is_refused(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "item_id": True}) + "\n")
    with pytest.raises(DataError, match="item_id"):
        project.load_completions(path)
    pdir = tmp_path / "empty"
    db.init_db(db.db_path(pdir))
    with db.opened(pdir) as conn, db.transaction(conn):
        project.add_person(conn, "lead", "lead")
        project.set_password(conn, "lead", PASSWORD, scrypt_n=FAST_SCRYPT)
    lead = new_client(create_app(pdir, config()))
    csrf = api_login(lead, "lead")
    r = lead.post("/lead/create", data={"csrf_token": csrf, "name": "x", "criteria": "overall"},
                  files={"completions": ("c.jsonl", path.read_bytes())}, follow_redirects=False)
    assert r.status_code == 400 and "item_id" in r.text
    assert not project.project_exists(pdir)


BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"


def test_direction_controls_are_shown_visibly_but_stored_and_exported_unchanged(tmp_path):
    pdir = make_project(tmp_path / "p", n_items=1, overlap=1)
    sneaky = "Transfer \u202eSU 000,01\u202c to the account" + BIDI
    with db.opened(pdir) as conn, db.transaction(conn):
        conn.execute("UPDATE items SET prompt = ?, completions = ?",
                     (f"Say {BIDI}", json.dumps([sneaky, "fine", "also fine"])))
    app = create_app(pdir, config())
    alice = new_client(app)
    assert form_login(alice, "alice").status_code == 303
    html = alice.get("/label").text
    assert not set(BIDI) & set(html)  # none of them reaches the page as such ...
    assert html.count("U+202E") == 3 and "U+2066" in html and "U+200F" in html  # ... each is shown as its code
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)
    a = next_item(alice, csrf)["assignment"]
    assert sneaky in [c["text"] for c in a["completions"]]  # the API gives the data as stored
    flags = [{"position": p, "reason": "other"} for p in range(3)]
    body = {"client_id": "bidi-test-01", "assignment_id": a["assignment_id"], "rankings": {"overall": [[0], [1], [2]]},
            "flags": flags, "comment": f"look {BIDI}"}
    assert alice.post("/api/submissions", json=body, headers={"X-CSRF-Token": csrf}).status_code == 201
    lead = new_client(app)
    assert form_login(lead, "lead").status_code == 303
    page = lead.get("/lead").text
    assert "Flagged replies" in page and not set(BIDI) & set(page) and "U+202E" in page
    r = lead.post("/lead/export", data={"csrf_token": re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)})
    assert r.status_code == 200
    exported = lead.get("/lead/exports/latest/rankings.jsonl").text
    assert sneaky in [c for line in exported.splitlines() for c in json.loads(line)["completions"]]


def test_a_csrf_token_with_non_ascii_characters_is_a_403_not_a_500(app):
    client = TestClient(app, raise_server_exceptions=False)
    api_login(client, "alice")
    r = client.post("/api/next", headers={"X-CSRF-Token": "é".encode("latin-1")})
    assert r.status_code == 403 and "X-CSRF-Token" in r.json()["error"]
    anon = TestClient(app, raise_server_exceptions=False)
    anon.get("/login")
    r = anon.post("/login", data={"name": "alice", "password": PASSWORD, "csrf_token": "é"}, follow_redirects=False)
    assert r.status_code == 403
