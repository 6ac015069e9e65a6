"""Thumbs up / down (a project with mode = "thumbs"): the page, the API, its refusals, the figures, the
export in the data contract (rlhfkit.data.contract.Thumb, read back by read_thumbs), an old database
upgraded in place, and no acknowledged thumb lost to a SIGKILL."""

from __future__ import annotations

import json
import random
import re
import sqlite3
from collections import defaultdict
from urllib.parse import urlencode

import pytest

from rlhfkit.data.contract import read_thumbs
from rlhfkit.labelapp import db, project
from rlhfkit.labelapp.app import create_app
from rlhfkit.labelapp.assignment import next_assignment, submit
from rlhfkit.labelapp.cli import main
from rlhfkit.labelapp.export import export_project
from rlhfkit.labelapp.stats import project_stats

from .conftest import PASSWORD, TEST_SETTINGS, XSS_SCRIPT, api_login, make_project, new_client, next_item, read_jsonl

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def thumbs_body(assignment_id: int, labels: dict[str, list[bool]], client_id: str) -> dict:
    """An API submission: labels[criterion][display position] (True = up)."""
    return {"client_id": client_id, "assignment_id": assignment_id,
            "thumbs": {c: [{"position": p, "label": x} for p, x in enumerate(ls)] for c, ls in labels.items()}}


def post_thumbs(client, csrf, assignment_id, labels, client_id):
    return client.post("/api/submissions", json=thumbs_body(assignment_id, labels, client_id),
                       headers={"X-CSRF-Token": csrf})


def display_order(project_dir, assignment_id) -> list[int]:
    with db.opened(project_dir) as conn:
        return json.loads(conn.execute("SELECT display_order FROM assignments WHERE id = ?",
                                       (assignment_id,)).fetchone()[0])


def stored(project_dir) -> list[sqlite3.Row]:
    with db.opened(project_dir) as conn:
        return conn.execute("SELECT * FROM submissions ORDER BY id").fetchall()


def assignment_status(project_dir, assignment_id) -> str:
    with db.opened(project_dir) as conn:
        return conn.execute("SELECT status FROM assignments WHERE id = ?", (assignment_id,)).fetchone()[0]


@pytest.fixture
def thumbs_dir(tmp_path):
    return make_project(tmp_path / "thumbs", n_items=4, k=3, overlap=2, mode="thumbs")


@pytest.fixture
def thumbs_app(thumbs_dir):
    return create_app(thumbs_dir, TEST_SETTINGS)


# -- round trip: app -> export -> read_thumbs -------------------------------------------------------------


def test_every_thumb_given_in_the_app_comes_back_from_read_thumbs(tmp_path):
    criteria = ("helpfulness", "harmlessness")
    pdir = make_project(tmp_path / "p", n_items=4, k=3, overlap=2, criteria=criteria, mode="thumbs")
    app = create_app(pdir, TEST_SETTINGS)
    with db.opened(pdir) as conn:
        items = {r["item_key"]: (r["prompt"], json.loads(r["completions"]))
                 for r in conn.execute("SELECT item_key, prompt, completions FROM items")}
    rng = random.Random(0)
    given = set()  # (item, labeler, criterion, completion text, label) as the labeler saw and clicked it
    for name in ("alice", "bob"):
        client = new_client(app)
        csrf = api_login(client, name)
        n = 0
        while (a := next_item(client, csrf)["assignment"]) is not None:
            labels = {c: [rng.random() < 0.5 for _ in a["completions"]] for c in criteria}
            r = post_thumbs(client, csrf, a["assignment_id"], labels, f"{name}-thumbs-{n:04d}")
            assert r.status_code == 201 and r.json()["status"] == "stored", r.text
            key = next(k for k, (prompt, _) in items.items() if prompt == a["prompt"])
            given |= {(key, name, c, a["completions"][p]["text"], x)
                      for c, ls in labels.items() for p, x in enumerate(ls)}
            n += 1
        assert n == 4

    out = tmp_path / "export"
    summary = export_project(pdir, out)
    thumbs = read_thumbs(out / "thumbs.jsonl")  # exactly what the KTO data loader reads
    assert len(thumbs) == summary["thumbs"] == 4 * 2 * len(criteria) * 3  # items x labelers x criteria x replies
    assert {(t.item_id, t.labeler_id, t.criterion, t.completion, t.label) for t in thumbs} == given
    assert summary["thumbs_up"] == sum(t.label for t in thumbs) and summary["items_exported"] == 4
    assert all(t.prompt == items[t.item_id][0] for t in thumbs)
    # one record per labeler per completion and criterion, the completions in their original order
    per_answer = defaultdict(list)
    for t in thumbs:
        per_answer[(t.item_id, t.labeler_id, t.criterion)].append(t.completion)
    assert all(texts == items[item][1] for (item, _, _), texts in per_answer.items())
    # the raw records are the contract's fields, nothing else
    assert set(read_jsonl(out / "thumbs.jsonl")[0]) == {"item_id", "prompt", "completion", "label", "labeler_id",
                                                       "criterion"}
    assert not (out / "comparisons.jsonl").exists()
    assert json.loads((out / "export.json").read_text())["mode"] == "thumbs"
    # written by write_jsonl: no temporary file left behind
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "thumbs.jsonl"]


# -- the page: a form, without JavaScript -----------------------------------------------------------------


def test_the_thumbs_page_is_a_plain_form_that_stores_thumbs_without_javascript(tmp_path):
    pdir = make_project(tmp_path / "p", n_items=2, k=3, overlap=1, mode="thumbs")
    client = new_client(create_app(pdir, TEST_SETTINGS))
    api_login(client, "alice")
    html = client.get("/label").text
    assert 'id="ranking"' not in html and 'action="/label/thumbs"' in html and "/static/thumbs.js" in html
    assert XSS_SCRIPT not in html  # model text stays escaped on this page too
    radios = re.findall(r'name="thumb\.overall\.(\d)" value="(up|down)" required', html)
    assert sorted(radios) == [(str(p), v) for p in range(3) for v in ("down", "up")]  # every reply: both thumbs
    fields = {"csrf_token": CSRF_RE.search(html).group(1),
              "assignment_id": re.search(r'name="assignment_id" value="(\d+)"', html).group(1),
              "client_id": re.search(r'name="client_id" value="([^"]+)"', html).group(1)}
    aid = int(fields["assignment_id"])
    form = {**fields, "thumb.overall.0": "up", "thumb.overall.1": "down", "thumb.overall.2": "up",
            "flag.1": "nonsense", "flag.2": "", "comment": "B is gibberish"}
    r = client.post("/label/thumbs", data=form, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/label"
    order = display_order(pdir, aid)
    row = stored(pdir)[0]
    expected = [None] * 3
    for pos, label in enumerate([True, False, True]):
        expected[order[pos]] = label  # stored by original index
    assert json.loads(row["thumbs"]) == {"overall": expected} and json.loads(row["rankings"]) == {}
    assert json.loads(row["flags"]) == [{"completion": order[1], "reason": "nonsense"}]
    assert row["comment"] == "B is gibberish"
    # the same form sent again (a reload after a lost answer) is stored once
    assert client.post("/label/thumbs", data=form, follow_redirects=False).status_code == 303
    assert len(stored(pdir)) == 1
    # the next item has a new client id; skipping it by form needs no script either
    html = client.get("/label").text
    assert re.search(r'name="client_id" value="([^"]+)"', html).group(1) != fields["client_id"]
    second = int(re.search(r'name="assignment_id" value="(\d+)"', html).group(1))
    assert second != aid
    r = client.post("/label/skip", data={"csrf_token": fields["csrf_token"], "assignment_id": second},
                    follow_redirects=False)
    assert r.status_code == 303 and assignment_status(pdir, second) == "skipped"
    done = client.get("/label").text
    assert "You judged 1 item(s) and skipped 1" in done


def test_a_form_missing_a_thumb_or_with_a_wrong_value_is_refused_with_its_reason(thumbs_app, thumbs_dir):
    client = new_client(thumbs_app)
    api_login(client, "alice")
    html = client.get("/label").text
    base = {"csrf_token": CSRF_RE.search(html).group(1), "client_id": "form-client-0001",
            "assignment_id": re.search(r'name="assignment_id" value="(\d+)"', html).group(1)}
    missing = client.post("/label/thumbs", data={**base, "thumb.overall.0": "up", "thumb.overall.1": "up"})
    assert missing.status_code == 422 and "no thumb for position(s) [2]" in missing.text
    maybe = client.post("/label/thumbs", data={**base, "thumb.overall.0": "maybe", "thumb.overall.1": "up",
                                               "thumb.overall.2": "up"})
    assert maybe.status_code == 422 and "choose thumb up or thumb down" in maybe.text
    repeated = [*base.items(), ("thumb.overall.0", "up"), ("thumb.overall.0", "down"), ("thumb.overall.1", "up"),
                ("thumb.overall.2", "up")]  # one field twice: a form post as a browser would encode it
    both = client.post("/label/thumbs", content=urlencode(repeated),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert both.status_code == 422 and "both a thumb up and a thumb down" in both.text
    outside = client.post("/label/thumbs", data={**base, "thumb.overall.0": "up", "thumb.overall.1": "up",
                                                 "thumb.overall.2": "up", "thumb.overall.3": "up"})
    assert outside.status_code == 422 and "position 3 is not a reply of this item" in outside.text
    assert stored(thumbs_dir) == [] and assignment_status(thumbs_dir, int(base["assignment_id"])) == "open"


# -- the API: refusals, idempotence ---------------------------------------------------------------------------

ALL3 = [{"position": p, "label": True} for p in range(3)]


@pytest.mark.parametrize("thumbs, message", [
    (None, "thumbs: send an object"),
    ({"overall": ALL3[:2]}, "thumbs.overall: no thumb for position(s) [2]"),
    ({"overall": [*ALL3, {"position": 3, "label": False}]}, "position 3 is not a reply of this item"),
    ({"overall": [*ALL3, {"position": -1, "label": False}]}, "position -1 is not a reply of this item"),
    ({"overall": [*ALL3, {"position": 0, "label": False}]}, "both a thumb up and a thumb down"),
    ({"overall": [{"position": 0, "label": "true"}, *ALL3[1:]]}, "body.thumbs.overall.0.label"),
    ({"overall": [{"position": 0, "label": 1}, *ALL3[1:]]}, "body.thumbs.overall.0.label"),
    ({"overall": [{"position": 0}, *ALL3[1:]]}, "body.thumbs.overall.0.label: Field required"),
    ({"overall": [{"position": "0", "label": True}, *ALL3[1:]]}, "body.thumbs.overall.0.position"),
    ({"helpfulness": ALL3}, "missing ['overall'], unknown ['helpfulness']"),
])
def test_a_wrong_or_missing_thumb_is_a_422_that_says_why_and_stores_nothing(thumbs_app, thumbs_dir, thumbs, message):
    client = new_client(thumbs_app)
    csrf = api_login(client, "alice")
    aid = next_item(client, csrf)["assignment"]["assignment_id"]
    body = {"client_id": "bad-thumbs-0001", "assignment_id": aid}
    if thumbs is not None:
        body["thumbs"] = thumbs
    r = client.post("/api/submissions", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and message in r.json()["error"], r.text
    assert stored(thumbs_dir) == [] and assignment_status(thumbs_dir, aid) == "open"
    # the refusal consumed nothing: the same assignment then takes a complete answer
    assert post_thumbs(client, csrf, aid, {"overall": [True, False, True]}, "good-thumbs-0001").status_code == 201


def test_each_mode_refuses_the_other_kind_of_answer(thumbs_app, project_dir, thumbs_dir):
    client = new_client(thumbs_app)
    csrf = api_login(client, "alice")
    aid = next_item(client, csrf)["assignment"]["assignment_id"]
    r = client.post("/api/submissions", json={"client_id": "rank-in-thumbs-1", "assignment_id": aid,
                                              "rankings": {"overall": [[0], [1], [2]]}}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and "collects thumbs, not rankings" in r.json()["error"]
    ranking = new_client(create_app(project_dir, TEST_SETTINGS))  # project_dir: a ranking project
    csrf = api_login(ranking, "alice")
    nxt = next_item(ranking, csrf)
    assert nxt["mode"] == "ranking"
    r = post_thumbs(ranking, csrf, nxt["assignment"]["assignment_id"], {"overall": [True] * 3}, "thumbs-in-rank-1")
    assert r.status_code == 422 and "collects rankings, not thumbs" in r.json()["error"]
    assert stored(project_dir) == [] and stored(thumbs_dir) == []


def test_a_retried_submission_is_stored_once_and_a_second_answer_is_a_conflict(thumbs_app, thumbs_dir):
    client = new_client(thumbs_app)
    csrf = api_login(client, "alice")
    nxt = next_item(client, csrf)
    assert nxt["mode"] == "thumbs"
    aid = nxt["assignment"]["assignment_id"]
    first = post_thumbs(client, csrf, aid, {"overall": [True, False, False]}, "retry-thumbs-01")
    again = post_thumbs(client, csrf, aid, {"overall": [True, False, False]}, "retry-thumbs-01")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == {"status": "duplicate", "submission_id": first.json()["submission_id"]}
    other = post_thumbs(client, csrf, aid, {"overall": [False, False, False]}, "retry-thumbs-02")
    assert other.status_code == 409 and "submitted" in other.json()["error"]
    rows = stored(thumbs_dir)
    order = display_order(thumbs_dir, aid)
    assert len(rows) == 1 and json.loads(rows[0]["thumbs"])["overall"][order[0]] is True
    assert sum(json.loads(rows[0]["thumbs"])["overall"]) == 1  # the first answer, not the refused one


def test_thumbs_need_a_session_the_csrf_token_and_your_own_assignment(thumbs_app, thumbs_dir):
    alice = new_client(thumbs_app)
    csrf = api_login(alice, "alice")
    aid = next_item(alice, csrf)["assignment"]["assignment_id"]
    body = thumbs_body(aid, {"overall": [True, True, True]}, "sec-thumbs-0001")
    assert alice.post("/api/submissions", json=body).status_code == 403  # no X-CSRF-Token
    form = {"assignment_id": str(aid), "client_id": "sec-thumbs-0002", **{f"thumb.overall.{p}": "up" for p in range(3)}}
    assert alice.post("/label/thumbs", data=form).status_code == 403  # no form token
    assert alice.post("/label/thumbs", data={**form, "csrf_token": "wrong"}).status_code == 403
    assert alice.post("/label/skip", data={"assignment_id": str(aid)}).status_code == 403
    stranger = new_client(thumbs_app)
    assert stranger.post("/api/submissions", json=body).status_code == 401
    r = stranger.post("/label/thumbs", data=form, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    bob = new_client(thumbs_app)
    bob_csrf = api_login(bob, "bob")
    assert bob.post("/api/submissions", json=body, headers={"X-CSRF-Token": bob_csrf}).status_code == 404
    assert bob.post("/label/thumbs", data={**form, "csrf_token": bob_csrf}).status_code == 404
    assert stored(thumbs_dir) == [] and assignment_status(thumbs_dir, aid) == "open"


# -- assignment, figures, export filters ----------------------------------------------------------------------


def answer(conn, settings, user_id: int, labels_by_original: list[bool], client_id: str) -> str:
    """Take the next assignment and give it thumbs (by original completion index); returns the item key."""
    aid = next_assignment(conn, user_id, settings)
    order = json.loads(conn.execute("SELECT display_order FROM assignments WHERE id = ?", (aid,)).fetchone()[0])
    labels = [labels_by_original[order[p]] for p in range(len(order))]
    submit(conn, user_id, settings, thumbs_body(aid, {"overall": labels}, client_id))
    return conn.execute("SELECT i.item_key FROM assignments a JOIN items i ON i.id = a.item_id WHERE a.id = ?",
                        (aid,)).fetchone()[0]


T, F = True, False
# item it-000: carol disagrees with alice and bob on every reply; it-001: all agree; it-002: alice only
THUMBS = {("alice", "it-000"): [T, T, F], ("bob", "it-000"): [T, T, F], ("carol", "it-000"): [F, F, T],
          ("alice", "it-001"): [T, F, F], ("bob", "it-001"): [T, F, F], ("carol", "it-001"): [T, F, F],
          ("alice", "it-002"): [F, T, T]}


@pytest.fixture
def judged(tmp_path):
    pdir = make_project(tmp_path / "p", n_items=3, k=3, overlap=3, mode="thumbs")
    with db.opened(pdir) as conn:
        settings = project.get_settings(conn)
        ids = {r["name"]: r["id"] for r in conn.execute("SELECT id, name FROM users")}
        n = 0
        for item in ("it-000", "it-001", "it-002"):
            for name in ("alice", "bob", "carol"):
                if (name, item) in THUMBS:  # started items come first: everyone gets it-000, then it-001
                    assert answer(conn, settings, ids[name], THUMBS[name, item], f"judged-{n:04d}") == item
                    n += 1
    return pdir


def test_thumbs_figures_progress_agreement_and_careless_labeler(judged):
    with db.opened(judged) as conn:
        s = project_stats(conn, project.get_settings(conn))
    assert (s["mode"], s["items"], s["items_complete"], s["items_started"], s["submissions"]) == ("thumbs", 3, 2, 3, 7)
    fig = s["criteria"]["overall"]
    assert (fig["thumbs_up"], fig["thumbs_down"]) == (10, 11) and fig["up_rate"] == pytest.approx(10 / 21)
    # it-000: per reply 1 of 3 labeler pairs agree; it-001: 3 of 3; it-002 has one labeler: no pairs
    assert fig["pairwise_agreement"] == pytest.approx((3 * 1 + 3 * 3) / 18)
    assert 0 < fig["krippendorff_alpha"] < 1 and s["krippendorff_alpha"] == pytest.approx(fig["krippendorff_alpha"])
    assert [(r["item_id"], r["agreement"]) for r in s["low_agreement_items"]] == [("it-000", pytest.approx(1 / 3)),
                                                                                  ("it-001", 1.0)]
    people = {p["name"]: p for p in s["labelers"]}
    # alice: on it-000 the others split (no majority), on it-001 she agrees 3/3; carol: 0/3 then 3/3
    assert people["alice"]["agreement_with_consensus"] == pytest.approx(1.0)
    assert people["carol"]["agreement_with_consensus"] == pytest.approx(0.5)
    assert people["carol"]["up_rate"] == pytest.approx(2 / 6) and people["alice"]["up_rate"] == pytest.approx(5 / 9)
    assert (people["alice"]["submitted"], people["carol"]["submitted"]) == (3, 2)
    # completions j come from model-(j % 2): model-0 wrote replies 0 and 2, model-1 reply 1
    by_model = {r["model"]: r for r in s["up_rate_by_model"]["overall"]}
    assert by_model["model-1"]["thumbs"] == 7 and by_model["model-1"]["up_rate"] == pytest.approx(3 / 7)


def test_thumbs_export_honours_min_agreement_and_complete_only(judged, tmp_path):
    full = export_project(judged, tmp_path / "all")
    assert full["thumbs"] == 7 * 3 and full["items_exported"] == 3
    strict = export_project(judged, tmp_path / "strict", min_agreement=0.5)
    assert strict["items_dropped_low_agreement"] == ["it-000"]
    kept = read_thumbs(tmp_path / "strict" / "thumbs.jsonl")
    assert {t.item_id for t in kept} == {"it-001", "it-002"} and len(kept) == 4 * 3  # it-002 has one labeler: kept
    complete = export_project(judged, tmp_path / "complete", complete_only=True)
    by_labeler = defaultdict(list)
    for t in read_thumbs(tmp_path / "complete" / "thumbs.jsonl"):
        by_labeler[(t.labeler_id, t.item_id)].append(t.label)
    assert complete["items_exported"] == 2 and dict(by_labeler) == {k: v for k, v in THUMBS.items() if k[1] != "it-002"}


def test_the_lead_sees_thumbs_figures_and_exports_from_the_page(judged):
    client = new_client(create_app(judged, TEST_SETTINGS))
    api_login(client, "lead")
    html = client.get("/lead").text
    assert 'id="thumbs-agreement"' in html and "Thumbs up by model" in html and "0.33" in html  # carol's share up
    token = CSRF_RE.search(html).group(1)
    r = client.post("/lead/export", data={"csrf_token": token})
    assert r.status_code == 200 and "21 thumbs (10 up) from 3 items" in r.text
    download = client.get("/lead/exports/latest/thumbs.jsonl")
    assert download.status_code == 200 and len(download.text.splitlines()) == 21
    assert client.get("/lead/exports/latest/comparisons.jsonl").status_code == 404  # not a ranking export


def test_the_lead_creates_a_thumbs_project_in_the_browser(tmp_path):
    def lead_client(pdir):
        db.init_db(db.db_path(pdir))
        with db.opened(pdir) as conn, db.transaction(conn):
            project.add_person(conn, "lead", "lead")
            project.set_password(conn, "lead", PASSWORD, scrypt_n=2**4)
        client = new_client(create_app(pdir, TEST_SETTINGS))
        return client, api_login(client, "lead")

    upload = b'{"prompt": "2+2=", "completions": ["4"]}\n{"prompt": "3+3=", "completions": ["6", "7"]}\n'
    client, csrf = lead_client(tmp_path / "web")
    r = client.post("/lead/create", data={"csrf_token": csrf, "mode": "thumbs", "criteria": "overall"},
                    files={"completions": ("c.jsonl", upload, "application/json")}, follow_redirects=False)
    assert r.status_code == 303, r.text
    with db.opened(tmp_path / "web") as conn:
        assert project.get_settings(conn).mode == "thumbs"  # one completion per item is enough for thumbs
        assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 2
    assert "Thumbs up / down" in client.get("/lead").text
    client, csrf = lead_client(tmp_path / "web2")
    r = client.post("/lead/create", data={"csrf_token": csrf, "mode": "stars", "criteria": "overall"},
                    files={"completions": ("c.jsonl", upload, "application/json")})
    assert r.status_code == 400 and "mode: &#39;stars&#39; is not one of" in r.text
    with db.opened(tmp_path / "web2") as conn:
        assert project.get_settings(conn) is None


def test_cli_creates_reports_and_exports_a_thumbs_project(tmp_path, capsys):
    comp = tmp_path / "c.jsonl"
    comp.write_text('{"prompt": "2+2=", "completions": ["4"], "item_id": "a"}\n'
                    '{"prompt": "3+3=", "completions": ["6", "7"], "item_id": "b"}\n')
    pdir = tmp_path / "p"
    assert main(["create", str(pdir), "--completions", str(comp), "--mode", "thumbs", "--strength"]) == 2
    assert "--strength" in capsys.readouterr().err and not (pdir / "labels.sqlite3").exists()
    assert main(["create", str(pdir), "--completions", str(comp)]) == 2  # a ranking needs two completions
    assert "between 2 and 9" in capsys.readouterr().err
    assert main(["create", str(pdir), "--completions", str(comp), "--mode", "thumbs"]) == 0
    with db.opened(pdir) as conn, db.transaction(conn):
        project.add_person(conn, "alice")
        settings = project.get_settings(conn)
        alice = conn.execute("SELECT id FROM users WHERE name = 'alice'").fetchone()[0]
    with db.opened(pdir) as conn:
        answer(conn, settings, alice, [True], "cli-thumbs-0001")
        answer(conn, settings, alice, [False, True], "cli-thumbs-0002")
    capsys.readouterr()
    assert main(["status", str(pdir)]) == 0
    out = capsys.readouterr().out
    assert "2/2 items complete (overlap 1), 2 items judged with thumbs" in out and "share up 0.67" in out
    assert main(["export", str(pdir), "--out", str(tmp_path / "out")]) == 0
    assert "wrote 3 thumbs (2 up) from 2 items" in capsys.readouterr().out
    assert [(t.item_id, t.completion, t.label) for t in read_thumbs(tmp_path / "out" / "thumbs.jsonl")] == [
        ("a", "4", True), ("b", "6", False), ("b", "7", True)]


# -- an existing database -------------------------------------------------------------------------------------


def test_a_database_made_before_thumbs_is_upgraded_in_place_and_keeps_its_rankings(tmp_path):
    pdir = make_project(tmp_path / "old", n_items=2, overlap=1)
    with db.opened(pdir) as conn:
        settings = project.get_settings(conn)
        alice = conn.execute("SELECT id FROM users WHERE name = 'alice'").fetchone()[0]
        aid = next_assignment(conn, alice, settings)
        submit(conn, alice, settings, {"client_id": "old-rank-0001", "assignment_id": aid,
                                       "rankings": {"overall": [[0], [1], [2]]}})
    raw = sqlite3.connect(db.db_path(pdir))  # the tables as the previous version made them
    raw.execute("ALTER TABLE project DROP COLUMN mode")
    raw.execute("ALTER TABLE submissions DROP COLUMN thumbs")
    raw.commit()
    assert "mode" not in {r[1] for r in raw.execute("PRAGMA table_info(project)")}
    raw.close()

    summary = export_project(pdir, tmp_path / "out")  # `export` on the old directory: upgraded first
    assert summary["rankings"] == 1 and summary["comparisons"] == 3
    client = new_client(create_app(pdir, TEST_SETTINGS))
    csrf = api_login(client, "bob")
    nxt = next_item(client, csrf)
    assert nxt["mode"] == "ranking"
    body = {"client_id": "new-rank-0001", "assignment_id": nxt["assignment"]["assignment_id"],
            "rankings": {"overall": [[1], [0, 2]]}}
    r = client.post("/api/submissions", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201
    with db.opened(pdir) as conn:
        assert project.get_settings(conn).mode == "ranking"
        assert [row["thumbs"] for row in conn.execute("SELECT thumbs FROM submissions")] == [None, None]
    with db.opened(pdir) as conn:  # idempotent: an up-to-date database is left as it is
        before = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
        db.migrate(conn)
        assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == before


# -- durability -----------------------------------------------------------------------------------------------


def test_sigkill_mid_load_loses_no_acknowledged_thumb(tmp_path):
    """As test_load's crash test, with thumbs: every thumb the server acknowledged is in the database, with
    the labels sent, right after a SIGKILL; after a restart the in-flight ones are re-sent and stored once."""
    pytest.importorskip("uvicorn")
    from .loadgen import Labeler, run_load
    from .server import Server

    labelers_n, per_labeler = 6, 15
    people = tuple(f"lab{i:02d}" for i in range(labelers_n))
    pdir = make_project(tmp_path / "crash", n_items=labelers_n * per_labeler // 2 + 10, k=3, overlap=2,
                        people=people, mode="thumbs")
    server = Server(pdir).start()
    labelers = [Labeler(name, PASSWORD, per_labeler, mode="thumbs") for name in people]
    try:
        run_load(server.url, labelers, kill_after=labelers_n * per_labeler // 3, on_kill=server.kill)
        acked_before = {cid: body for lab in labelers for cid, body in lab.sent.items()}
        assert 0 < len(acked_before) < labelers_n * per_labeler

        def check_stored(acked):
            rows = {r["client_id"]: r for r in stored(pdir)}
            for cid, body in acked.items():
                assert cid in rows, f"acknowledged thumbs {cid} lost"
                order = display_order(pdir, body["assignment_id"])
                sent = {order[t["position"]]: t["label"] for t in body["thumbs"]["overall"]}
                assert json.loads(rows[cid]["thumbs"]) == {"overall": [sent[i] for i in range(3)]}
            return rows

        check_stored(acked_before)  # 1. right after the crash
        server = Server(pdir, port=server.port).start()  # 2. restart; in-flight thumbs re-sent with their ids
        run_load(server.url, labelers)
    finally:
        server.stop()
    assert not [e for lab in labelers for e in lab.errors]
    rows = check_stored({cid: body for lab in labelers for cid, body in lab.sent.items()})
    assert len(rows) == labelers_n * per_labeler
    assert len({(r["item_id"], r["user_id"]) for r in rows.values()}) == len(rows)
    assert len(read_thumbs_after_export(pdir, tmp_path / "out")) == labelers_n * per_labeler * 3


def read_thumbs_after_export(pdir, out):
    export_project(pdir, out)
    return read_thumbs(out / "thumbs.jsonl")


def test_the_pipeline_hook_refuses_a_thumbs_project_with_what_to_do(judged):
    from rlhfkit.core.errors import ConfigError
    from rlhfkit.labelapp.hook import human_feedback

    with pytest.raises(ConfigError, match="needs a ranking project .* kto.data"):
        human_feedback(judged, policy_dir=judged, prompts=[], k=3, overlap=3, items_required=1,
                       criteria=["overall"], seed=0)
