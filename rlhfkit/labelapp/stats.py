"""What the lead sees: progress, agreement, per-labeler figures, flags and the Elo ladder.

Agreement figures use rlhfkit.feedback.agreement (pairwise agreement, Kendall tau-b) and
rlhfkit.feedback.krippendorff (alpha, ordinal, unit = (item, completion), value = rank position).
A labeler's "agreement with consensus" compares each of their rankings with the Borda consensus of the
*other* labelers of that item (leave-one-out), so a careless labeler cannot pull the consensus toward
themselves and hide.

Thumbs projects (settings.mode = "thumbs") have the same figures for binary labels: pairwise agreement =
the share of pairs of labelers who gave a reply the same thumb, over the replies two or more labelers
judged; Krippendorff's alpha, nominal, unit = (item, completion), value = 1 (up) or 0 (down); a labeler's
agreement with consensus = the share of their thumbs equal to the majority thumb of the *other* labelers of
that reply (replies where the others split evenly are left out); and the share of thumbs up, per criterion,
per labeler (one who gives every reply the same thumb stands out) and per model.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
from collections import defaultdict
from dataclasses import asdict
from itertools import combinations

from rlhfkit.data.consensus import borda_consensus
from rlhfkit.feedback.agreement import mean_agreement, pairwise_agreement
from rlhfkit.feedback.elo import elo_ladder, matches_from_ranking
from rlhfkit.feedback.krippendorff import alpha_for_rankings, krippendorff_alpha
from rlhfkit.labelapp.project import ProjectSettings


def load_labels(conn: sqlite3.Connection) -> list[dict]:
    """Every submission joined with its item and labeler, rankings and thumbs in original indices."""
    rows = conn.execute(
        "SELECT s.id, s.rankings, s.thumbs, s.strengths, s.flags, s.comment, s.seconds, u.name AS labeler,"
        " i.id AS item_id, i.item_key, i.prompt, i.completions, i.model_ids"
        " FROM submissions s JOIN users u ON u.id = s.user_id JOIN items i ON i.id = s.item_id ORDER BY s.id"
    ).fetchall()
    return [
        {
            "item_id": r["item_id"], "item_key": r["item_key"], "prompt": r["prompt"],
            "completions": json.loads(r["completions"]),
            "model_ids": json.loads(r["model_ids"]) if r["model_ids"] else None,
            "labeler": r["labeler"], "rankings": json.loads(r["rankings"]),
            "thumbs": json.loads(r["thumbs"]) if r["thumbs"] else {},  # {criterion: [True = up, per completion]}
            "strengths": json.loads(r["strengths"]) if r["strengths"] else {},
            "flags": json.loads(r["flags"]), "comment": r["comment"], "seconds": r["seconds"],
        }
        for r in rows
    ]


def by_item(labels: list[dict], criterion: str, kind: str = "rankings") -> dict[int, list[dict]]:
    """The labels of each item that rank (kind "rankings") or give thumbs (kind "thumbs") by `criterion`."""
    out: dict[int, list[dict]] = defaultdict(list)
    for lab in labels:
        if criterion in lab[kind]:
            out[lab["item_id"]].append(lab)
    return out


def project_stats(conn: sqlite3.Connection, settings: ProjectSettings, elo_rounds: int = 200) -> dict:
    labels = load_labels(conn)
    n_items = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    per_item = conn.execute(
        "SELECT item_id, COUNT(*) AS n FROM submissions GROUP BY item_id").fetchall()
    complete = sum(1 for r in per_item if r["n"] >= settings.overlap)
    skips = conn.execute("SELECT COUNT(*) FROM assignments WHERE status = 'skipped'").fetchone()[0]
    progress = {"mode": settings.mode, "items": n_items, "items_complete": complete, "items_started": len(per_item),
                "submissions": len(labels), "skips": skips, "overlap": settings.overlap}
    flags = [{"item_id": lab["item_key"], "labeler": lab["labeler"], "reason": f["reason"],
              "completion": lab["completions"][f["completion"]], "comment": lab["comment"]}
             for lab in labels for f in lab["flags"]]
    if settings.mode == "thumbs":
        return {**progress, **thumbs_stats(labels, settings), "labelers": labeler_stats(conn, labels, settings),
                "flags": flags, "elo": {}}

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
        **progress,
        "krippendorff_alpha": alpha_for_rankings(all_units),  # whole project, all criteria
        "criteria": criteria,
        "labelers": labeler_stats(conn, labels, settings),
        # the items people disagree on most: candidates for clearer guidelines or for --min-agreement
        "low_agreement_items": sorted(item_agreement, key=lambda r: r["agreement"])[:10],
        "flags": flags,
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
    ups: dict[str, list[bool]] = defaultdict(list)  # thumbs projects: every thumb each labeler gave
    for c in settings.criteria:
        if settings.mode == "thumbs":
            for labs in by_item(labels, c, "thumbs").values():
                for lab in labs:
                    ups[lab["labeler"]].extend(lab["thumbs"][c])
                for lab, agreed in thumbs_agreement_with_others(labs, c):
                    agree[lab["labeler"]].append(agreed)
            continue
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
            "up_rate": statistics.fmean(ups[p["name"]]) if ups[p["name"]] else None,  # thumbs projects only
        }
        for p in people
    ]


def thumbs_agreement(labels_per_item: list[list[list[bool]]]) -> float | None:
    """Share of agreeing pairs of labelers over every reply that two or more labelers gave a thumb:
    labels_per_item[item][labeler][completion]. None when no reply has two thumbs."""
    pairs = [a == b for labels in labels_per_item for reply in zip(*labels) for a, b in combinations(reply, 2)]
    return statistics.fmean(pairs) if pairs else None


def thumbs_agreement_with_others(labs: list[dict], criterion: str) -> list[tuple[dict, float]]:
    """(label, 1.0 or 0.0) for each thumb of each labeler of one item: whether it equals the majority thumb
    of the item's *other* labelers for that reply (leave-one-out); replies where they split evenly count
    for nothing."""
    out = []
    for n, lab in enumerate(labs):
        for i, mine in enumerate(lab["thumbs"][criterion]):
            others = [o["thumbs"][criterion][i] for m, o in enumerate(labs) if m != n]
            up, down = sum(others), len(others) - sum(others)
            if up != down:
                out.append((lab, float(mine == (up > down))))
    return out


def thumbs_stats(labels: list[dict], settings: ProjectSettings) -> dict:
    """A thumbs project's figures per criterion: counts, share up, agreement, Krippendorff's alpha
    (nominal), the least-agreed items, and the share up per model when several models wrote the replies."""
    criteria, all_units, item_agreement = {}, [], []
    by_model: dict[str, list[dict]] = {}
    for c in settings.criteria:
        items = by_item(labels, c, "thumbs")
        grouped = {item: [lab["thumbs"][c] for lab in labs] for item, labs in items.items()}
        thumbs = [t for per_labeler in grouped.values() for lab_thumbs in per_labeler for t in lab_thumbs]
        units = [[int(t) for t in reply]  # one unit per (item, completion) judged by two or more labelers
                 for per_labeler in grouped.values() if len(per_labeler) >= 2 for reply in zip(*per_labeler)]
        all_units.extend(units)
        criteria[c] = {"thumbs_up": sum(thumbs), "thumbs_down": len(thumbs) - sum(thumbs),
                       "up_rate": statistics.fmean(thumbs) if thumbs else None,
                       "pairwise_agreement": thumbs_agreement(list(grouped.values())),
                       "krippendorff_alpha": krippendorff_alpha(units, "nominal")}
        for item, per_labeler in grouped.items():
            if len(per_labeler) >= 2:
                first = items[item][0]
                item_agreement.append({"item_id": first["item_key"], "criterion": c, "labelers": len(per_labeler),
                                       "agreement": thumbs_agreement([per_labeler]), "prompt": first["prompt"]})
        if has_several_models(labels):
            per_model: dict[str, list[bool]] = defaultdict(list)
            for labs in items.values():
                for lab in labs:
                    for model, thumb in zip(lab["model_ids"] or [], lab["thumbs"][c]):
                        per_model[model].append(thumb)
            by_model[c] = sorted(({"model": m, "thumbs": len(t), "up_rate": statistics.fmean(t)}
                                  for m, t in per_model.items()), key=lambda r: -r["up_rate"])
    return {
        "krippendorff_alpha": krippendorff_alpha(all_units, "nominal"),  # whole project, all criteria
        "criteria": criteria,
        "low_agreement_items": sorted(item_agreement, key=lambda r: r["agreement"])[:10],
        "up_rate_by_model": by_model,
    }


def has_several_models(labels: list[dict]) -> bool:
    return len({m for lab in labels for m in (lab["model_ids"] or [])}) >= 2


def elo_matches(labels: list[dict], criterion: str):
    return [m for lab in labels if lab["model_ids"] and criterion in lab["rankings"]
            for m in matches_from_ranking(lab["rankings"][criterion], lab["model_ids"])]


def items_complete(conn: sqlite3.Connection, overlap: int) -> int:
    return conn.execute(
        "SELECT COUNT(*) FROM (SELECT item_id FROM submissions GROUP BY item_id HAVING COUNT(*) >= ?)", (overlap,)
    ).fetchone()[0]
