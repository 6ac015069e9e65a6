"""Assignment rules: overlap, leases, never the same item twice, no double hand-out under concurrency."""

from __future__ import annotations

import threading

import pytest

from rlhfkit.labelapp import assignment, db, project
from rlhfkit.labelapp.assignment import AppError, next_assignment, submit

from .conftest import make_project


def ids(conn):
    return {r["name"]: r["id"] for r in conn.execute("SELECT id, name FROM users")}


def item_of(conn, aid):
    return conn.execute("SELECT item_id FROM assignments WHERE id = ?", (aid,)).fetchone()[0]


def test_overlap_is_honoured_and_started_items_come_first(tmp_path):
    pdir = make_project(tmp_path / "p", n_items=2, overlap=2)
    with db.opened(pdir) as conn:
        s, u = project.get_settings(conn), ids(conn)
        a = next_assignment(conn, u["alice"], s, now=0)
        b = next_assignment(conn, u["bob"], s, now=0)
        c = next_assignment(conn, u["carol"], s, now=0)
        assert item_of(conn, a) == item_of(conn, b)  # bob completes alice's item before a new one opens
        assert item_of(conn, c) != item_of(conn, a)  # the first item is full (overlap 2)
        assert next_assignment(conn, u["alice"], s, now=1) == a  # an open assignment is resumed, not replaced


def test_expired_lease_returns_item_to_pool(tmp_path):
    pdir = make_project(tmp_path / "p", n_items=1, overlap=1, lease_seconds=10)
    with db.opened(pdir) as conn:
        s, u = project.get_settings(conn), ids(conn)
        a = next_assignment(conn, u["alice"], s, now=0)
        assert next_assignment(conn, u["bob"], s, now=5) is None  # alice still holds the lease
        b = next_assignment(conn, u["bob"], s, now=20)  # lease ran out: bob gets the item
        assert b is not None and item_of(conn, b) == item_of(conn, a)
        submit(conn, u["bob"], s, {"client_id": "bob-submission", "assignment_id": b, "rankings": {"overall": [[0], [1], [2]]}}, now=21)
        # alice comes back late: the item already has its answer, so hers is refused with a clear reason
        with pytest.raises(AppError, match="lease") as refused:
            submit(conn, u["alice"], s, {"client_id": "alice-late-01", "assignment_id": a,
                                         "rankings": {"overall": [[0], [1], [2]]}}, now=22)
        assert refused.value.status == 409
        assert next_assignment(conn, u["alice"], s, now=23) is None
        assert conn.execute("SELECT status FROM assignments WHERE id = ?", (a,)).fetchone()[0] == "expired"


def test_never_the_same_item_twice_even_after_skip(tmp_path):
    pdir = make_project(tmp_path / "p", n_items=3, overlap=3)
    with db.opened(pdir) as conn:
        s, u = project.get_settings(conn), ids(conn)
        seen = []
        while (a := next_assignment(conn, u["alice"], s)) is not None:
            seen.append(item_of(conn, a))
            assignment.skip(conn, u["alice"], s, a)
        assert sorted(seen) == [1, 2, 3]


def test_concurrent_requests_never_exceed_overlap(tmp_path):
    people = tuple(f"p{i}" for i in range(8))
    pdir = make_project(tmp_path / "p", n_items=3, overlap=2, people=people)
    with db.opened(pdir) as conn:
        s, u = project.get_settings(conn), ids(conn)
    got = {}

    def work(name):
        with db.opened(pdir) as c:
            got[name] = next_assignment(c, u[name], s)

    threads = [threading.Thread(target=work, args=(n,)) for n in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.opened(pdir) as conn:
        per_item = conn.execute("SELECT item_id, COUNT(*) FROM assignments GROUP BY item_id").fetchall()
    assert all(n == 2 for _, n in per_item) and len(per_item) == 3
    assert sum(a is None for a in got.values()) == 2  # 8 people, 3 items x overlap 2 = 6 slots
