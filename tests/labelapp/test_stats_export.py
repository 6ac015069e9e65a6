"""Agreement, per-labeler figures, consensus, the min-agreement filter and Elo in the export."""

from __future__ import annotations

import json

import pytest

from rlhfkit.data.contract import read_comparisons, read_rankings
from rlhfkit.labelapp import db, project
from rlhfkit.labelapp.assignment import next_assignment, submit
from rlhfkit.labelapp.export import export_project
from rlhfkit.labelapp.stats import project_stats

from .conftest import make_project, read_jsonl

AGREE = [[0], [1], [2]]
REVERSED = [[2], [1], [0]]


def answer(conn, settings, user_id, ranking_orig, client_id):
    aid = next_assignment(conn, user_id, settings)
    order = json.loads(conn.execute("SELECT display_order FROM assignments WHERE id = ?", (aid,)).fetchone()[0])
    display = [[order.index(i) for i in g] for g in ranking_orig]
    submit(conn, user_id, settings, {"client_id": client_id, "assignment_id": aid, "rankings": {"overall": display}})
    return conn.execute("SELECT item_id FROM assignments WHERE id = ?", (aid,)).fetchone()[0]


@pytest.fixture
def labeled(tmp_path):
    """4 items x 4 labelers; carol reverses everyone else on items 1 and 2 only."""
    pdir = make_project(tmp_path / "p", n_items=4, overlap=4, people=("alice", "bob", "carol", "dan"))
    with db.opened(pdir) as conn:
        settings = project.get_settings(conn)
        ids = {r["name"]: r["id"] for r in conn.execute("SELECT id, name FROM users")}
        n = 0
        for _ in range(4):
            for name in ("alice", "bob", "dan", "carol"):
                item = conn.execute(
                    "SELECT MIN(i.id) FROM items i WHERE NOT EXISTS (SELECT 1 FROM assignments a "
                    "WHERE a.item_id = i.id AND a.user_id = ?)", (ids[name],)).fetchone()[0]
                ranking = REVERSED if name == "carol" and item in (1, 2) else AGREE
                assert answer(conn, settings, ids[name], ranking, f"cid-{n:05d}") == item
                n += 1
    return pdir


def test_agreement_and_careless_labeler(labeled):
    with db.opened(labeled) as conn:
        s = project_stats(conn, project.get_settings(conn), elo_rounds=20)
    assert s["items_complete"] == 4 and s["submissions"] == 16
    people = {p["name"]: p for p in s["labelers"]}
    # leave-one-out consensus: the others agree, so alice is always with them; carol on half the items
    assert people["alice"]["agreement_with_consensus"] == pytest.approx(1.0)
    assert people["carol"]["agreement_with_consensus"] == pytest.approx(0.5)
    fig = s["criteria"]["overall"]
    # per item: 6 labeler pairs; items 1-2 have 3 disagreeing pairs (agreement 0, tau -1)
    assert fig["pairwise_agreement"] == pytest.approx((2 * 6 + 2 * 3) / 24)
    assert fig["kendall_tau"] == pytest.approx((2 * 6 + 2 * (3 - 3)) / 24)
    assert 0 < fig["krippendorff_alpha"] < 1 and s["krippendorff_alpha"] == pytest.approx(fig["krippendorff_alpha"])
    low = s["low_agreement_items"]
    assert [r["item_id"] for r in low[:2]] == ["it-000", "it-001"] and low[0]["agreement"] == pytest.approx(0.5)
    assert low[-1]["agreement"] == pytest.approx(1.0)


def test_export_majority_pairs_and_min_agreement(labeled, tmp_path):
    full = export_project(labeled, tmp_path / "all")
    comps = read_comparisons(tmp_path / "all" / "comparisons.jsonl")
    assert full["items_exported"] == 4 and len(read_rankings(tmp_path / "all" / "rankings.jsonl")) == 16
    assert len(comps) == 4 * 3  # every item: the 3 pairs of the majority order
    by_item = {c.item_id: sorted(c.labeler_ids) for c in comps}
    assert by_item["it-000"] == ["alice", "bob", "dan"]  # carol reversed item 1 (it-000): not a supporter
    assert by_item["it-002"] == ["alice", "bob", "carol", "dan"]
    consensus = read_jsonl(tmp_path / "all" / "consensus.jsonl")
    assert all(r["labeler_id"] == "consensus" and r["ranking"] == AGREE for r in consensus)

    kept = export_project(labeled, tmp_path / "strict", min_agreement=0.9)
    assert kept["items_dropped_low_agreement"] == ["it-000", "it-001"] and kept["items_exported"] == 2
    assert {c.item_id for c in read_comparisons(tmp_path / "strict" / "comparisons.jsonl")} == {"it-002", "it-003"}


def test_elo_ladder_in_export(labeled, tmp_path):
    export_project(labeled, tmp_path / "e")
    elo = json.loads((tmp_path / "e" / "elo.json").read_text())
    ladder = elo["overall"]
    # completions 0 and 2 come from model-0, completion 1 from model-1: rank 0 > 1 > 2 mostly
    assert {row["model"] for row in ladder} == {"model-0", "model-1"}
    assert all(row["ci_low"] <= row["rating"] <= row["ci_high"] for row in ladder)
    assert sum(row["matches"] for row in ladder) == 2 * 16 * 2  # 2 cross-model pairs per ranking


def test_export_refuses_bad_threshold_and_missing_project(tmp_path, labeled):
    from rlhfkit.core.errors import RlhfkitError

    with pytest.raises(RlhfkitError, match="between 0 and 1"):
        export_project(labeled, tmp_path / "x", min_agreement=2)
    with pytest.raises(RlhfkitError, match="no labeling project"):
        export_project(tmp_path / "nothing", tmp_path / "y")


def test_min_agreement_leaves_out_the_whole_item_across_criteria(tmp_path):
    """Two labelers agree on helpfulness and disagree on harmlessness for every item: an item below the
    threshold on any criterion is left out whole, not exported for the criteria it passed."""
    pdir = make_project(tmp_path / "p", n_items=2, overlap=2, criteria=("helpfulness", "harmlessness"),
                        people=("alice", "bob"))
    with db.opened(pdir) as conn:
        settings = project.get_settings(conn)
        ids = {r["name"]: r["id"] for r in conn.execute("SELECT id, name FROM users")}
        n = 0
        for name in ("alice", "bob"):
            while (aid := next_assignment(conn, ids[name], settings)) is not None:
                order = json.loads(conn.execute("SELECT display_order FROM assignments WHERE id = ?", (aid,)).fetchone()[0])
                harm = AGREE if name == "alice" else REVERSED
                rankings = {"helpfulness": [[order.index(i) for i in g] for g in AGREE],
                            "harmlessness": [[order.index(i) for i in g] for g in harm]}
                submit(conn, ids[name], settings, {"client_id": f"two-crit-{n:04d}", "assignment_id": aid,
                                                   "rankings": rankings})
                n += 1
    summary = export_project(pdir, tmp_path / "out", min_agreement=0.5)
    assert summary["items_dropped_low_agreement"] == ["it-000", "it-001"]
    assert summary["items_exported"] == 0 and summary["comparisons"] == summary["rankings"] == 0
    assert read_jsonl(tmp_path / "out" / "rankings.jsonl") == []
    assert read_jsonl(tmp_path / "out" / "consensus.jsonl") == []
