"""Reliability against a real uvicorn process on 127.0.0.1: concurrent load and SIGKILL mid-load.

Prints the measured figures (labelers, submissions, wall time, p50/p95 submission latency).
"""

from __future__ import annotations

import sqlite3

import pytest

from .conftest import PASSWORD, make_project
from .loadgen import Labeler, percentile, run_load
from .server import Server

pytest.importorskip("uvicorn")

LABELERS = 20
PER_LABELER = 50
OVERLAP = 2
# A few spare items: with exactly enough slots the last labeler can be left with only items they
# already answered (a packing dead end of any greedy hand-out, not a loss).
ITEMS = LABELERS * PER_LABELER // OVERLAP + 20


def make_load_project(path):
    people = tuple(f"lab{i:02d}" for i in range(LABELERS))
    return make_project(path, n_items=ITEMS, k=4, overlap=OVERLAP, people=people)


def stored(project_dir):
    conn = sqlite3.connect(project_dir / "labels.sqlite3")
    try:
        rows = conn.execute("SELECT client_id, item_id, user_id FROM submissions").fetchall()
    finally:
        conn.close()
    return rows


def check_exact(rows, labelers):
    client_ids = [r[0] for r in rows]
    assert len(client_ids) == len(set(client_ids)), "duplicate client ids stored"
    assert len({(r[1], r[2]) for r in rows}) == len(rows), "a labeler answered the same item twice"
    acked = [cid for lab in labelers for cid in lab.acked]
    assert set(acked) <= set(client_ids), "an acknowledged submission is missing"
    counts = {}
    for r in rows:
        counts[r[1]] = counts.get(r[1], 0) + 1
    return acked, max(counts.values())


def report(title, labelers, wall, skip_first=None):
    """skip_first: per labeler, how many earlier latencies to leave out (the phase before a crash)."""
    skip = skip_first or [0] * len(labelers)
    lat = [x for lab, n in zip(labelers, skip) for x in lab.latencies[n:]]
    line = (f"{title}: {len(labelers)} labelers, {len(lat)} submissions, "
            f"wall {wall:.1f} s, submission latency p50 {1000 * percentile(lat, 0.5):.1f} ms, "
            f"p95 {1000 * percentile(lat, 0.95):.1f} ms, {len(lat) / wall:.0f} submissions/s")
    print("\n" + line)
    return line


def test_concurrent_labelers_exact_count(tmp_path):
    pdir = make_load_project(tmp_path / "load")
    server = Server(pdir).start()
    try:
        labelers = [Labeler(f"lab{i:02d}", PASSWORD, PER_LABELER) for i in range(LABELERS)]
        wall = run_load(server.url, labelers, duplicate_every=10)
    finally:
        server.stop()
    assert not [e for lab in labelers for e in lab.errors]
    rows = stored(pdir)
    acked, per_item = check_exact(rows, labelers)
    assert len(rows) == len(acked) == LABELERS * PER_LABELER  # exact: nothing lost, nothing doubled
    assert per_item == OVERLAP  # no item answered by more than `overlap` labelers
    assert sum(lab.retries_sent for lab in labelers) >= LABELERS * PER_LABELER // 10
    report("load", labelers, wall)


def test_sigkill_mid_load_loses_no_acknowledged_submission(tmp_path):
    pdir = make_load_project(tmp_path / "crash")
    server = Server(pdir).start()
    labelers = [Labeler(f"lab{i:02d}", PASSWORD, PER_LABELER) for i in range(LABELERS)]
    try:
        run_load(server.url, labelers, kill_after=LABELERS * PER_LABELER // 3, on_kill=server.kill)
        acked_before = [cid for lab in labelers for cid in lab.acked]
        done_before = [len(lab.latencies) for lab in labelers]
        assert 0 < len(acked_before) < LABELERS * PER_LABELER
        # 1. Right after the crash: every acknowledged submission is in the database.
        present = {r[0] for r in stored(pdir)}
        missing = [cid for cid in acked_before if cid not in present]
        assert not missing, f"{len(missing)} acknowledged submissions lost"
        in_flight = sum(lab.pending is not None for lab in labelers)
        # 2. Restart on the same port; labelers re-send what was in flight (same client id) and finish.
        server = Server(pdir, port=server.port).start()
        wall = run_load(server.url, labelers)
    finally:
        server.stop()
    assert not [e for lab in labelers for e in lab.errors]
    rows = stored(pdir)
    acked, per_item = check_exact(rows, labelers)
    assert len(rows) == len(acked) == LABELERS * PER_LABELER and per_item == OVERLAP
    already = sum(lab.resent_already_stored for lab in labelers)
    print(f"\ncrash: SIGKILL after {len(acked_before)} acknowledged submissions; all {len(acked_before)} present "
          f"after restart; {in_flight} in flight were re-sent with their ids ({already} of them had been committed "
          f"before the kill and were answered 'duplicate'); final count {len(rows)}, no duplicates, nothing lost")
    report("after restart", labelers, wall, skip_first=done_before)
