"""What the lead sees: progress, agreement, per-labeler figures, flags and the Elo ladder.

Agreement figures use rlhfkit.feedback.agreement (pairwise agreement, Kendall tau-b) and
rlhfkit.feedback.krippendorff (alpha, ordinal, unit = (item, completion), value = rank position).
A labeler's "agreement with consensus" compares each of their rankings with the Borda consensus of the
*other* labelers of that item (leave-one-out), so a careless labeler cannot pull the consensus toward
themselves and hide.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
from collections import defaultdict
from dataclasses import asdict

from rlhfkit.data.consensus import borda_consensus
from rlhfkit.feedback.agreement import mean_agreement, pairwise_agreement
from rlhfkit.feedback.elo import elo_ladder, matches_from_ranking
from rlhfkit.feedback.krippendorff import alpha_for_rankings
from rlhfkit.labelapp.project import ProjectSettings


def load_labels(conn: sqlite3.Connection) -> list[dict]:
    """Every submission joined with its item and labeler, rankings in original indices."""
    rows = conn.execute(
        "SELECT s.id, s.rankings, s.strengths, s.flags, s.comment, s.seconds, u.name AS labeler,"
        " i.id AS item_id, i.item_key, i.prompt, i.completions, i.model_ids"
        " FROM submissions s JOIN users u ON u.id = s.user_id JOIN items i ON i.id = s.item_id ORDER BY s.id"
    ).fetchall()
    return [
        {
            "item_id": r["item_id"], "item_key": r["item_key"], "prompt": r["prompt"],
            "completions": json.loads(r["completions"]),
            "model_ids": json.loads(r["model_ids"]) if r["model_ids"] else None,
            "labeler": r["labeler"], "rankings": json.loads(r["rankings"]),
            "strengths": json.loads(r["strengths"]) if r["strengths"] else {},
            "flags": json.loads(r["flags"]), "comment": r["comment"], "seconds": r["seconds"],
        }
        for r in rows
    ]


def by_item(labels: list[dict], criterion: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for lab in labels:
        if criterion in lab["rankings"]:
            out[lab["item_id"]].append(lab)
    return out


def project_stats(conn: sqlite3.Connection, settings: ProjectSettings, elo_rounds: int = 200) -> dict:
    labels = load_labels(conn)
    n_items = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    per_item = conn.execute(
        "SELECT item_id, COUNT(*) AS n FROM submissions GROUP BY item_id").fetchall()
    complete = sum(1 for r in per_item if r["n"] >= settings.overlap)
    skips = conn.execute("SELECT COUNT(*) FROM assignments WHERE status = 'skipped'").fetchone()[0]

    criteria = {}
    all_units: dict[tuple, list] = {}
    item_agreement = []
    for c in settings.criteria:
        items = by_item(labels, c)
        grouped = {item: [lab["rankings"][c] for lab in labs] for item, labs in items.items()}
        for item, rankings in grouped.items():
            if len(rankings) >= 2:
                item_agreement.append({
                    "item_id": items[item][0]["item_key"], "criterion": c, "labelers": len(rankings),
                    "agreement": mean_agreement([rankings])["pairwise_agreement"], "prompt": items[item][0]["prompt"],
                })
        agreement = mean_agreement(list(grouped.values()))
        all_units.update({(item, c): r for item, r in grouped.items()})
        criteria[c] = {**agreement, "krippendorff_alpha": alpha_for_rankings(grouped)}

    return {
        "items": n_items,
        "items_complete": complete,
        "items_started": len(per_item),
        "submissions": len(labels),
        "skips": skips,
        "overlap": settings.overlap,
        "krippendorff_alpha": alpha_for_rankings(all_units),  # whole project, all criteria
        "criteria": criteria,
        "labelers": labeler_stats(conn, labels, settings),
        # the items people disagree on most: candidates for clearer guidelines or for --min-agreement
        "low_agreement_items": sorted(item_agreement, key=lambda r: r["agreement"])[:10],
        "flags": [
            {"item_id": lab["item_key"], "labeler": lab["labeler"], "reason": f["reason"],
             "completion": lab["completions"][f["completion"]], "comment": lab["comment"]}
            for lab in labels for f in lab["flags"]
        ],
        "elo": {c: [asdict(row) for row in elo_ladder(elo_matches(labels, c), rounds=elo_rounds)]
                for c in settings.criteria if has_several_models(labels)},
    }


def labeler_stats(conn: sqlite3.Connection, labels: list[dict], settings: ProjectSettings) -> list[dict]:
    people = conn.execute("SELECT id, name, role, password_hash IS NOT NULL AS joined FROM users ORDER BY name").fetchall()
    counts = {
        (r["user_id"], r["status"]): r["n"]
        for r in conn.execute("SELECT user_id, status, COUNT(*) AS n FROM assignments GROUP BY user_id, status")
    }
    agree: dict[str, list[float]] = defaultdict(list)
    for c in settings.criteria:
        for labs in by_item(labels, c).values():
            if len(labs) < 2:
                continue
            for n, lab in enumerate(labs):
                others = [o["rankings"][c] for m, o in enumerate(labs) if m != n]
                agree[lab["labeler"]].append(pairwise_agreement(lab["rankings"][c], borda_consensus(others)))
    seconds: dict[str, list[float]] = defaultdict(list)
    flags: dict[str, int] = defaultdict(int)
    for lab in labels:
        if lab["seconds"] is not None:
            seconds[lab["labeler"]].append(lab["seconds"])
        flags[lab["labeler"]] += len(lab["flags"])
    return [
        {
            "name": p["name"], "role": p["role"], "joined": bool(p["joined"]),
            "submitted": counts.get((p["id"], "submitted"), 0), "skipped": counts.get((p["id"], "skipped"), 0),
            "open": counts.get((p["id"], "open"), 0), "flags": flags[p["name"]],
            "median_seconds": statistics.median(seconds[p["name"]]) if seconds[p["name"]] else None,
            "agreement_with_consensus": statistics.fmean(agree[p["name"]]) if agree[p["name"]] else None,
        }
        for p in people
    ]


def has_several_models(labels: list[dict]) -> bool:
    return len({m for lab in labels for m in (lab["model_ids"] or [])}) >= 2


def elo_matches(labels: list[dict], criterion: str):
    return [m for lab in labels if lab["model_ids"] and criterion in lab["rankings"]
            for m in matches_from_ranking(lab["rankings"][criterion], lab["model_ids"])]


def items_complete(conn: sqlite3.Connection, overlap: int) -> int:
    return conn.execute(
        "SELECT COUNT(*) FROM (SELECT item_id FROM submissions GROUP BY item_id HAVING COUNT(*) >= ?)", (overlap,)
    ).fetchone()[0]
