"""The labeling flow through the JSON API: next item, submit, retry, skip, export in the contract."""

from __future__ import annotations

import json

from rlhfkit.data.contract import read_comparisons, read_rankings
from rlhfkit.labelapp import db
from rlhfkit.labelapp.export import export_project

from .conftest import TEST_SETTINGS, api_login, new_client, next_item, read_jsonl, submit


def original_ranking(project_dir, assignment_id, display_ranking):
    """Map a ranking in display positions to original indices, via the recorded display order."""
    with db.opened(project_dir) as conn:
        order = json.loads(conn.execute("SELECT display_order FROM assignments WHERE id = ?", (assignment_id,)).fetchone()[0])
    return [sorted(order[p] for p in g) for g in display_ranking]


def test_submit_then_export_is_the_trainers_format(app, project_dir, tmp_path):
    client = new_client(app)
    csrf = api_login(client, "alice")
    nxt = next_item(client, csrf)
    a = nxt["assignment"]
    assert nxt["criteria"] == ["overall"] and len(a["completions"]) == 3
    display = [[2], [0, 1]]  # display position 2 best, 0 and 1 tied
    r = submit(client, csrf, a["assignment_id"], display, "client-0001", comment="fine")
    assert r.status_code == 201 and r.json()["status"] == "stored"
    expected = original_ranking(project_dir, a["assignment_id"], display)

    out = tmp_path / "export"
    summary = export_project(project_dir, out)
    rankings = read_rankings(out / "rankings.jsonl")
    assert len(rankings) == 1 and rankings[0].ranking == expected and rankings[0].labeler_id == "alice"
    comparisons = read_comparisons(out / "comparisons.jsonl")  # exactly what the reward trainer calls
    assert len(comparisons) == 2 and summary["comparisons"] == 2
    best = rankings[0].completions[expected[0][0]]
    assert all(c.chosen == best and c.labeler_ids == ["alice"] and c.margin is None for c in comparisons)
    assert {c.item_id for c in comparisons} == {rankings[0].item_id}
    assert (out / "export.json").is_file() and (out / "consensus.jsonl").is_file()


def test_retry_with_same_client_id_is_stored_once(app, project_dir):
    client = new_client(app)
    csrf = api_login(client, "alice")
    a = next_item(client, csrf)["assignment"]
    first = submit(client, csrf, a["assignment_id"], [[0], [1], [2]], "retry-abcdef")
    again = submit(client, csrf, a["assignment_id"], [[0], [1], [2]], "retry-abcdef")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == {"status": "duplicate", "submission_id": first.json()["submission_id"]}
    with db.opened(project_dir) as conn:
        assert conn.execute("SELECT COUNT(*) FROM submissions").fetchone()[0] == 1
    # A second submission for the same assignment with a new id is refused, not stored twice.
    third = submit(client, csrf, a["assignment_id"], [[0], [1], [2]], "another-123456")
    assert third.status_code == 409 and "submitted" in third.json()["error"]


def test_shuffled_order_is_per_labeler_and_recorded(app, project_dir):
    orders = set()
    for name in ("alice", "bob", "carol"):
        client = new_client(app)
        csrf = api_login(client, name)
        nxt = next_item(client, csrf)
        orders.add(tuple(c["text"] for c in nxt["assignment"]["completions"]))
    with db.opened(project_dir) as conn:
        recorded = [json.loads(r[0]) for r in conn.execute("SELECT display_order FROM assignments")]
    assert all(sorted(o) == [0, 1, 2] for o in recorded)
    assert len(orders) >= 1  # orders are shuffled deterministically; recorded for every assignment


def test_strengths_become_margins(tmp_path):
    from rlhfkit.labelapp.app import create_app

    from .conftest import make_project

    pdir = make_project(tmp_path / "p", overlap=1, ask_strength=True, criteria=("helpfulness", "harmlessness"))
    client = new_client(create_app(pdir, TEST_SETTINGS))
    csrf = api_login(client, "alice")
    a = next_item(client, csrf)["assignment"]
    body = {"client_id": "strength-0001", "assignment_id": a["assignment_id"],
            "rankings": {"helpfulness": [[0], [1], [2]], "harmlessness": [[1], [0, 2]]}}
    missing = client.post("/api/submissions", json=body, headers={"X-CSRF-Token": csrf})
    assert missing.status_code == 422 and "strengths.helpfulness" in missing.json()["error"]
    body["strengths"] = {"helpfulness": ["significantly", "slightly"], "harmlessness": ["better"]}
    assert client.post("/api/submissions", json=body, headers={"X-CSRF-Token": csrf}).status_code == 201
    summary = export_project(pdir, tmp_path / "out")
    comps = read_comparisons(tmp_path / "out" / "comparisons.jsonl")
    assert summary["comparisons"] == 3 + 2
    helpful = sorted(c.margin for c in comps if c.criterion == "helpfulness")
    # pairs (#1,#2)=significantly, (#2,#3)=slightly, (#1,#3)=strongest step between = significantly
    assert helpful == [1 / 3, 1.0, 1.0]
    assert {c.margin for c in comps if c.criterion == "harmlessness"} == {2 / 3}


def test_skip_and_done(tmp_path):
    from rlhfkit.labelapp.app import create_app

    from .conftest import make_project

    pdir = make_project(tmp_path / "p", n_items=2, overlap=1)
    client = new_client(create_app(pdir, TEST_SETTINGS))
    csrf = api_login(client, "alice")
    first = next_item(client, csrf)["assignment"]["assignment_id"]
    assert client.post(f"/api/assignments/{first}/skip", headers={"X-CSRF-Token": csrf}).status_code == 200
    second = next_item(client, csrf)["assignment"]
    assert second["assignment_id"] != first
    assert submit(client, csrf, second["assignment_id"], [[0, 1, 2]], "all-tied-0001").status_code == 201
    nxt = next_item(client, csrf)
    assert nxt["assignment"] is None and nxt["progress"] == {"done": 1, "skipped": 1, "remaining": 0}
    # an all-tied ranking is stored but implies no comparison
    summary = export_project(pdir, tmp_path / "out")
    assert summary["rankings"] == 1 and summary["comparisons"] == 0
    assert read_jsonl(tmp_path / "out" / "rankings.jsonl")[0]["ranking"] == [[0, 1, 2]]
