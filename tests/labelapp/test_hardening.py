"""Hardening: equal sign-in work, throttling without lockouts, body limits, hosts, invitations and the
submission rules a production labeling tool must hold (each test names the failure it guards against)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from types import SimpleNamespace

import pytest

from rlhfkit.labelapp import db, project
from rlhfkit.labelapp.app import create_app
from rlhfkit.labelapp.assignment import AppError, next_assignment, submit
from rlhfkit.labelapp.deps import sign_in

from .conftest import FAST_SCRYPT, PASSWORD, TEST_SETTINGS, api_login, make_project, new_client, next_item
from .conftest import submit as api_submit


def config(**over):
    return {**TEST_SETTINGS, **over}


# -- 1. sign-in does the same work whether the name exists, has a password yet, or not ----------------


def test_sign_in_runs_exactly_one_scrypt_in_every_case(project_dir, monkeypatch):
    with db.opened(project_dir) as conn, db.transaction(conn):
        project.add_person(conn, "newbie")  # invited, has not chosen a password yet
    client = new_client(create_app(project_dir, config()))
    real, calls = hashlib.scrypt, []

    def counting(*args, **kwargs):
        calls.append(kwargs["n"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    work = {}
    for name, password in [("alice", "wrong-password"), ("mallory", "wrong-password"), ("newbie", "wrong-password"),
                           ("alice", PASSWORD)]:
        calls.clear()
        r = client.post("/api/session", json={"name": name, "password": password})
        assert r.status_code == (200 if password == PASSWORD else 401)
        work[name, password] = list(calls)
    assert all(c == [FAST_SCRYPT] for c in work.values()), work  # one hash of the same cost, every time


# -- 5. throttling: nobody can lock another person out, and no spray resets it ------------------------


def new_client_at(app, address):
    """A client whose requests come from `address` (what the throttle counts against)."""
    from fastapi.testclient import TestClient

    return TestClient(app, client=(address, 40000))


def test_guesses_from_one_address_do_not_lock_the_real_user_out(project_dir):
    app = create_app(project_dir, config(max_failed_logins=3))
    attacker, real_lead = new_client_at(app, "203.0.113.9"), new_client_at(app, "198.51.100.7")
    for _ in range(5):
        attacker.post("/api/session", json={"name": "lead", "password": "guess-guess"})
    r = attacker.post("/api/session", json={"name": "lead", "password": "guess-again"})
    assert r.status_code == 429 and "too many failed sign-ins" in r.json()["error"]
    assert real_lead.post("/api/session", json={"name": "lead", "password": PASSWORD}).status_code == 200


def test_a_spray_of_made_up_names_does_not_reset_the_throttle(project_dir):
    app = create_app(project_dir, config(max_failed_logins=3))
    request = SimpleNamespace(app=app, client=SimpleNamespace(host="203.0.113.9"), cookies={})

    def attempt(conn, name, password="guess-guess"):
        try:
            return sign_in(request, conn, name, password)
        except AppError as e:
            return e.status

    with db.opened(project_dir) as conn:
        for _ in range(3):
            assert attempt(conn, "alice") is None
        assert attempt(conn, "alice") == 429
        for n in range(10_050):  # made-up names, as many as it took to make the old throttle forget
            attempt(conn, f"made-up-{n}")
        assert attempt(conn, "alice", PASSWORD) == 429  # still refused from this address: nothing forgotten
    throttle = app.state.throttle
    assert sum(len(c.names) for c in throttle.clients.values()) <= 100  # and memory stayed small


def test_throttle_memory_is_bounded_across_many_addresses(project_dir):
    from rlhfkit.labelapp.deps import LoginThrottle

    throttle = LoginThrottle(3, 50, 900, max_clients=100)
    for n in range(1000):
        throttle.failed(f"10.0.{n // 250}.{n % 250}", "alice")
    assert len(throttle.clients) == 100


# -- 4. request bodies are bounded and refused before they are read -----------------------------------


def call_asgi(app, method, path, headers, chunks):
    """Drive the ASGI app directly: `chunks` is the body the client would send; returns (status, body,
    bytes the app read)."""
    read = [0]
    body_iter = iter(chunks)

    async def receive():
        try:
            chunk = next(body_iter)
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
        read[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("203.0.113.9", 40000), "server": ("testserver", 80), "state": {}}

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, read[0]


def endless(chunk_size=64 * 1024, total=20 * 2**20):
    for _ in range(total // chunk_size):
        yield b"x" * chunk_size


def test_oversized_body_is_refused_from_its_content_length_without_reading_it(app):
    status, body, read = call_asgi(app, "POST", "/api/submissions",
                                   {"host": "testserver", "content-type": "application/json",
                                    "content-length": str(200 * 2**20)}, endless())
    assert status == 413 and read == 0
    assert "too large" in json.loads(body)["error"]


def test_streamed_body_without_length_is_cut_at_the_limit(app):
    status, body, read = call_asgi(app, "POST", "/api/submissions",
                                   {"host": "testserver", "content-type": "application/json"}, endless())
    assert status == 413 and read <= 2 * 2**20  # the 1 MiB default limit plus one chunk, not 20 MiB
    assert "too large" in json.loads(body)["error"]


def test_error_answers_never_echo_large_input(client):
    csrf = api_login(client, "alice")
    a = next_item(client, csrf)["assignment"]
    huge = "k" * 200_000
    r = client.post("/api/submissions", headers={"X-CSRF-Token": csrf},
                    json={"client_id": "echo-test-01", "assignment_id": a["assignment_id"], "rankings": {huge: [[0]]}})
    assert r.status_code == 422 and len(r.content) < 2000
    r = client.post("/api/submissions", headers={"X-CSRF-Token": csrf},
                    json={"client_id": "echo-test-02", "assignment_id": a["assignment_id"],
                          "rankings": {"overall": [[0], [1], [2]]}, "flags": [{"position": 0, huge: 1}]})
    assert r.status_code == 422 and len(r.content) < 2000


def upload_form(csrf, size):
    line = json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n"
    data = (line * (size // len(line) + 1)).encode()
    return {"csrf_token": csrf, "name": "up", "criteria": "overall"}, {"completions": ("c.jsonl", data)}


def test_anonymous_uploads_get_the_small_limit(app):
    form, files = upload_form("x", 2 * 2**20)
    r = new_client(app).post("/lead/create", data=form, files=files, follow_redirects=False)
    assert r.status_code == 413 and "too large" in r.text


def test_uploads_have_their_own_limit_and_only_for_the_lead(tmp_path):
    pdir = tmp_path / "p"
    db.init_db(db.db_path(pdir))
    with db.opened(pdir) as conn, db.transaction(conn):
        project.add_person(conn, "lead", "lead")
        project.set_password(conn, "lead", PASSWORD, scrypt_n=FAST_SCRYPT)
    app = create_app(pdir, config(max_body_bytes=10_000, max_upload_bytes=100_000))
    anon = new_client(app)
    form, files = upload_form("x", 50_000)
    r = anon.post("/lead/create", data=form, files=files, follow_redirects=False)
    assert r.status_code == 413  # anonymous: the small limit, before any session check
    lead = new_client(app)
    csrf = api_login(lead, "lead")
    form, files = upload_form(csrf, 200_000)
    r = lead.post("/lead/create", data=form, files=files, follow_redirects=False)
    assert r.status_code == 413 and "too large" in r.text
    form, files = upload_form(csrf, 50_000)
    assert lead.post("/lead/create", data=form, files=files, follow_redirects=False).status_code == 303


# -- 6. invitations, roles, hosts, cookies ------------------------------------------------------------


def test_a_new_invitation_ends_the_old_password(app, project_dir):
    alice = new_client(app)
    api_login(alice, "alice")
    with db.opened(project_dir) as conn, db.transaction(conn):
        project.add_person(conn, "alice")  # a password reset
    r = new_client(app).post("/api/session", json={"name": "alice", "password": PASSWORD})
    assert r.status_code == 401
    assert alice.get("/api/progress").status_code == 401  # and the sessions it opened


def test_re_inviting_a_lead_from_the_web_form_keeps_the_role(app, project_dir):
    with db.opened(project_dir) as conn, db.transaction(conn):
        project.add_person(conn, "boss", "lead")
    lead = new_client(app)
    csrf = api_login(lead, "lead")
    r = lead.post("/lead/people", data={"name": "boss", "role": "labeler", "csrf_token": csrf})
    assert r.status_code == 200 and "/invite/" in r.text
    with db.opened(project_dir) as conn:
        assert conn.execute("SELECT role FROM users WHERE name = 'boss'").fetchone()[0] == "lead"


def test_unknown_host_names_are_refused(app):
    client = new_client(app)
    r = client.get("/api/health", headers={"host": "evil.example"})
    assert r.status_code == 400 and "host" in r.json()["error"].lower()
    assert client.get("/login", headers={"host": "evil.example:8000"}).status_code == 400
    assert client.get("/api/health").status_code == 200


def test_invitation_links_use_the_base_url_not_the_host_header(project_dir):
    app = create_app(project_dir, config(base_url="https://labels.example.org", allowed_hosts=["testserver"]))
    client = new_client(app)
    assert client.get("/api/health", headers={"host": "labels.example.org"}).status_code == 200
    csrf = api_login(client, "lead")
    r = client.post("/lead/people", data={"name": "dora", "csrf_token": csrf})
    link = re.search(r'id="invite-link"[^>]*>\s*([^<\s]+)', r.text).group(1)
    assert link.startswith("https://labels.example.org/invite/")


def test_serve_can_set_the_secure_cookie_flag(project_dir):
    from rlhfkit.labelapp.cli import build_parser, serve_config

    args = build_parser().parse_args(["serve", str(project_dir), "--cookie-secure"])
    cfg = serve_config(args)
    assert cfg["cookie_secure"] is True and cfg["base_url"] == "http://127.0.0.1:8000"
    client = new_client(create_app(project_dir, {**cfg, "scrypt_n": FAST_SCRYPT, "allowed_hosts": ["testserver"]}))
    r = client.post("/api/session", json={"name": "alice", "password": PASSWORD})
    assert "secure" in r.headers["set-cookie"].lower()
    https = serve_config(build_parser().parse_args(["serve", str(project_dir), "--base-url", "https://l.example.org"]))
    assert https["cookie_secure"] is True and "l.example.org" in https["allowed_hosts"]


# -- 6. submissions: client ids, strict integers, flags, leases ---------------------------------------


def test_a_client_id_reused_for_another_assignment_is_a_conflict(app, project_dir):
    client = new_client(app)
    csrf = api_login(client, "alice")
    first = next_item(client, csrf)["assignment"]["assignment_id"]
    assert api_submit(client, csrf, first, [[0], [1], [2]], "reused-id-001").status_code == 201
    second = next_item(client, csrf)["assignment"]["assignment_id"]
    r = api_submit(client, csrf, second, [[0], [1], [2]], "reused-id-001")
    assert r.status_code == 409 and "client_id" in r.json()["error"]


def test_a_client_id_with_a_trailing_newline_is_refused(client):
    csrf = api_login(client, "alice")
    a = next_item(client, csrf)["assignment"]["assignment_id"]
    r = api_submit(client, csrf, a, [[0], [1], [2]], "newline-id-01\n")
    assert r.status_code == 422 and "client_id" in r.json()["error"]


@pytest.mark.parametrize("bad", ["0", 0.0, True])
def test_ranking_positions_must_be_integers(client, bad):
    csrf = api_login(client, "alice")
    a = next_item(client, csrf)["assignment"]["assignment_id"]
    ranking = [[bad], [1], [2]] if bad is not True else [[bad], [0], [2]]
    assert api_submit(client, csrf, a, ranking, "strict-int-01").status_code == 422
    assert api_submit(client, csrf, a, [[0], [1], [2]], "strict-int-02",
                      flags=[{"position": bad, "reason": "unsafe"}]).status_code == 422


def test_duplicate_flags_for_one_reply_are_stored_once(client, project_dir):
    csrf = api_login(client, "alice")
    a = next_item(client, csrf)["assignment"]["assignment_id"]
    flag = {"position": 1, "reason": "unsafe"}
    assert api_submit(client, csrf, a, [[0], [1], [2]], "dup-flags-01", flags=[flag, flag]).status_code == 201
    with db.opened(project_dir) as conn:
        assert len(json.loads(conn.execute("SELECT flags FROM submissions").fetchone()[0])) == 1


def test_after_a_lease_expires_the_valid_holder_submits_and_the_late_one_is_refused(tmp_path):
    pdir = make_project(tmp_path / "p", n_items=2, overlap=1, lease_seconds=10)
    body = {"rankings": {"overall": [[0], [1], [2]]}}
    with db.opened(pdir) as conn:
        s = project.get_settings(conn)
        u = {r["name"]: r["id"] for r in conn.execute("SELECT id, name FROM users")}
        late = next_assignment(conn, u["alice"], s, now=0)
        valid = next_assignment(conn, u["bob"], s, now=20)  # alice's lease ran out: bob holds the item now
        with pytest.raises(AppError, match="lease") as refused:
            submit(conn, u["alice"], s, {**body, "client_id": "alice-late-01", "assignment_id": late}, now=21)
        assert refused.value.status == 409
        assert submit(conn, u["bob"], s, {**body, "client_id": "bob-valid-01", "assignment_id": valid}, now=22)[0] == "stored"
        # late, but nobody else took the item: accepted
        other = next_assignment(conn, u["carol"], s, now=30)
        assert submit(conn, u["carol"], s, {**body, "client_id": "carol-late-1", "assignment_id": other}, now=5000)[0] == "stored"


# -- 2. the create form: clear 4xx answers, and a refused create keeps what an earlier upload left -------

NOT_UTF8 = "caf\xe9".encode("latin-1")


@pytest.fixture
def empty_project(tmp_path):
    pdir = tmp_path / "p"
    db.init_db(db.db_path(pdir))
    with db.opened(pdir) as conn, db.transaction(conn):
        project.add_person(conn, "lead", "lead")
        project.set_password(conn, "lead", PASSWORD, scrypt_n=FAST_SCRYPT)
    return pdir


def test_uploads_that_are_not_utf8_are_a_400(empty_project):
    lead = new_client(create_app(empty_project, config()))
    csrf = api_login(lead, "lead")
    form = {"csrf_token": csrf, "name": "x", "criteria": "overall"}
    bad = b'{"prompt": "' + NOT_UTF8 + b'", "completions": ["a", "b"]}\n'
    r = lead.post("/lead/create", data=form, files={"completions": ("c.jsonl", bad)})
    assert r.status_code == 400 and "completions.jsonl:1" in r.text and "UTF-8" in r.text
    r = lead.post("/lead/create", data={**form, "policy_dir": str(empty_project)},
                  files={"prompts": ("p.txt", NOT_UTF8 + b"\n")})
    assert r.status_code == 400 and "UTF-8" in r.text
    assert not list((empty_project / "uploads").glob("*"))  # no temporary upload left behind


def test_a_refused_create_keeps_the_earlier_upload(empty_project):
    lead = new_client(create_app(empty_project, config()))
    csrf = api_login(lead, "lead")
    form = {"csrf_token": csrf, "name": "x", "criteria": "overall"}
    # an invalid upload is refused and replaces nothing
    (empty_project / "uploads").mkdir()
    (empty_project / "uploads" / "completions.jsonl").write_bytes(b"earlier")
    r = lead.post("/lead/create", data=form, files={"completions": ("c.jsonl", b'{"prompt": 1}\n')})
    assert r.status_code == 400 and (empty_project / "uploads" / "completions.jsonl").read_bytes() == b"earlier"
    # a second create after a successful one is refused before anything is saved
    first = b'{"prompt": "first", "completions": ["a", "b"]}\n'
    assert lead.post("/lead/create", data=form, files={"completions": ("c.jsonl", first)},
                     follow_redirects=False).status_code == 303
    second = b'{"prompt": "second", "completions": ["a", "b"]}\n'
    r = lead.post("/lead/create", data=form, files={"completions": ("c.jsonl", second)})
    assert (empty_project / "uploads" / "completions.jsonl").read_bytes() == first
    assert r.status_code == 409 and "already" in r.text
    assert sorted(p.name for p in (empty_project / "uploads").iterdir()) == ["completions.jsonl"]
