"""Handing out items, skips and submissions.

Rules (tested in tests/labelapp/test_assignment.py):
- An item is handed to at most `overlap` labelers at a time: submitted answers plus open assignments whose
  lease has not run out count against it; an expired lease frees its slot for someone else.
- A labeler whose lease is valid can always submit or skip (their slot is counted). One whose lease ran
  out may still do either while the slot is free (the item's other answers and valid leases leave room);
  otherwise they are refused with 409 (a lost lease is no skip either), and the labeler who took the slot
  over keeps it.
- A labeler never gets the same item twice (UNIQUE(item_id, user_id)), skipped or not.
- Items already started by others come first, so items are completed (all `overlap` answers) before new
  ones are opened: the pipeline waits for complete items.
- Each labeler sees the completions in their own shuffled order, recorded in the assignment; the client
  only ever sends display positions, and the server maps them back to original completion indices.
- In a thumbs project (settings.mode) a submission gives every reply exactly one thumb, up or down, per
  criterion, instead of a ranking; everything else (leases, ids, flags, comment) is the same.
- A submission carries a client-generated id; a retry with the same id (same labeler, same assignment) is
  answered "duplicate" and not stored again; the same id for another assignment is a 409 conflict. A
  submission is committed (fsync'd) before the answer leaves the server.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sqlite3
import time

from rlhfkit.core.errors import DataError
from rlhfkit.data.contract import STRENGTH_MARGINS, validate_ranking
from rlhfkit.labelapp.db import transaction
from rlhfkit.labelapp.project import ProjectSettings

CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")  # used with fullmatch: "$" would accept a trailing newline
FLAG_REASONS = ("unsafe", "nonsense", "other")
MAX_COMMENT = 2000


class AppError(Exception):
    """A request the app refuses, with the HTTP status and a message for the person or client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


_ACTIVE = "(status = 'submitted' OR (status = 'open' AND lease_expires_at > :now))"


def _active_count(conn: sqlite3.Connection, item_id: int, now: float, except_user: int | None = None) -> int:
    sql = f"SELECT COUNT(*) FROM assignments WHERE item_id = :item AND {_ACTIVE}"
    if except_user is not None:
        sql += " AND user_id != :user"
    return conn.execute(sql, {"item": item_id, "now": now, "user": except_user}).fetchone()[0]


def _display_order(item_id: int, user_id: int, k: int) -> list[int]:
    # Seeded from (item, user) so the order is reproducible from the database alone; it is recorded too.
    seed = int.from_bytes(hashlib.sha256(f"{item_id}:{user_id}".encode()).digest()[:8], "big")
    order = list(range(k))
    random.Random(seed).shuffle(order)
    return order


def next_assignment(conn: sqlite3.Connection, user_id: int, settings: ProjectSettings, now: float | None = None) -> int | None:
    """The labeler's current assignment, or a new one; None when nothing is left for them."""
    now = time.time() if now is None else now
    with transaction(conn):
        mine = conn.execute(
            "SELECT id, item_id FROM assignments WHERE user_id = ? AND status = 'open' ORDER BY id", (user_id,)
        ).fetchall()
        for row in mine:
            # Resume an unfinished item, unless the lease ran out and others filled the item meanwhile.
            if _active_count(conn, row["item_id"], now, except_user=user_id) < settings.overlap:
                conn.execute("UPDATE assignments SET lease_expires_at = ? WHERE id = ?",
                             (now + settings.lease_seconds, row["id"]))
                return row["id"]
            conn.execute("UPDATE assignments SET status = 'expired' WHERE id = ?", (row["id"],))
        row = conn.execute(
            f"""SELECT i.id, i.completions,
                   (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND {_ACTIVE}) AS active
                FROM items i
                WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.user_id = :user)
                  AND active < :overlap
                ORDER BY active DESC, i.id LIMIT 1""",
            {"now": now, "user": user_id, "overlap": settings.overlap},
        ).fetchone()
        if row is None:
            return None
        order = _display_order(row["id"], user_id, len(json.loads(row["completions"])))
        cur = conn.execute(
            "INSERT INTO assignments (item_id, user_id, display_order, status, created_at, lease_expires_at)"
            " VALUES (?, ?, ?, 'open', ?, ?)",
            (row["id"], user_id, json.dumps(order), now, now + settings.lease_seconds),
        )
        return cur.lastrowid


def assignment_view(conn: sqlite3.Connection, assignment_id: int, user_id: int) -> dict:
    """What the labeler sees: prompt and completions in their display order (no original indices)."""
    row = conn.execute(
        "SELECT a.id, a.user_id, a.status, a.display_order, i.item_key, i.prompt, i.completions"
        " FROM assignments a JOIN items i ON i.id = a.item_id WHERE a.id = ?",
        (assignment_id,),
    ).fetchone()
    # Someone else's assignment answers exactly like a missing one: no probing of other labelers' work.
    if row is None or row["user_id"] != user_id:
        raise AppError(404, f"assignment {assignment_id} not found among your assignments")
    completions = json.loads(row["completions"])
    order = json.loads(row["display_order"])
    return {
        "assignment_id": row["id"],
        "status": row["status"],
        "prompt": row["prompt"],
        "completions": [{"position": pos, "text": completions[orig]} for pos, orig in enumerate(order)],
    }


LEASE_LOST = "your lease on this item ran out and someone else took it over; ask for the next item"


def _lease_lost(conn: sqlite3.Connection, row: sqlite3.Row, settings: ProjectSettings, now: float) -> bool:
    """Whether an open assignment's lease is lost; a lost one is marked expired (the caller commits that).

    A valid lease holds a slot (hand-outs keep answers + valid leases <= overlap). A lapsed one gets the
    slot back only if it is still free: the answers and valid leases of others leave room.
    """
    others = _active_count(conn, row["item_id"], now, except_user=row["user_id"])
    if row["lease_expires_at"] <= now and others >= settings.overlap:
        conn.execute("UPDATE assignments SET status = 'expired' WHERE id = ?", (row["id"],))
        return True
    return False


def skip(conn: sqlite3.Connection, user_id: int, settings: ProjectSettings, assignment_id: int,
         now: float | None = None) -> None:
    """Skip an assignment; skipping one already skipped is a no-op (a retry). Raises AppError."""
    now = time.time() if now is None else now
    with transaction(conn):
        lost = _skip(conn, user_id, settings, assignment_id, now)
    if lost:  # raised after the commit, which keeps the assignment marked expired
        raise AppError(409, LEASE_LOST)


def _skip(conn: sqlite3.Connection, user_id: int, settings: ProjectSettings, assignment_id: int, now: float) -> bool:
    """skip's work inside its transaction; True when the lease was lost (nothing skipped)."""
    row = conn.execute("SELECT * FROM assignments WHERE id = ?", (assignment_id,)).fetchone()
    if row is None or row["user_id"] != user_id:
        raise AppError(404, f"assignment {assignment_id} not found among your assignments")
    if row["status"] == "submitted":
        raise AppError(409, f"assignment {assignment_id} was already submitted and cannot be skipped")
    if row["status"] == "expired" or (row["status"] == "open" and _lease_lost(conn, row, settings, now)):
        return True
    conn.execute("UPDATE assignments SET status = 'skipped' WHERE id = ?", (assignment_id,))
    return False


def submit(conn: sqlite3.Connection, user_id: int, settings: ProjectSettings, payload: dict, now: float | None = None) -> tuple[str, int]:
    """Store one submission; returns ("stored" | "duplicate", submission id). Raises AppError."""
    now = time.time() if now is None else now
    client_id = payload.get("client_id")
    if not isinstance(client_id, str) or not CLIENT_ID_RE.fullmatch(client_id):
        raise AppError(422, "client_id: send 8-64 letters, digits, '-' or '_' (e.g. a UUID), new for each submission")
    with transaction(conn):
        outcome = _store(conn, user_id, settings, payload, client_id, now)
    if outcome[0] == "lease lost":
        raise AppError(409, LEASE_LOST)
    return outcome


def _store(conn: sqlite3.Connection, user_id: int, settings: ProjectSettings, payload: dict, client_id: str,
           now: float) -> tuple[str, int | None]:
    """submit's work inside its transaction; ("lease lost", None) commits the assignment as expired."""
    assignment_id = payload.get("assignment_id")
    existing = conn.execute("SELECT id, user_id, assignment_id FROM submissions WHERE client_id = ?",
                            (client_id,)).fetchone()
    if existing is not None:
        if existing["user_id"] != user_id or existing["assignment_id"] != assignment_id:
            raise AppError(409, "client_id: already used by another submission; generate a new one for each submission")
        return "duplicate", existing["id"]  # a retry of a request whose answer was lost
    row = conn.execute(
        "SELECT a.*, i.completions FROM assignments a JOIN items i ON i.id = a.item_id WHERE a.id = ?",
        (assignment_id,),
    ).fetchone()
    if row is None or row["user_id"] != user_id:
        raise AppError(404, f"assignment {assignment_id} not found among your assignments")
    if row["status"] != "open":
        raise AppError(409, f"assignment {assignment_id} is {row['status']}; ask for the next item")
    if _lease_lost(conn, row, settings, now):
        return "lease lost", None
    order = json.loads(row["display_order"])
    thumbs = None
    if settings.mode == "thumbs":
        if payload.get("rankings") is not None:
            raise AppError(422, "rankings: this project collects thumbs, not rankings; send 'thumbs' instead")
        rankings, strengths, thumbs = {}, {}, _parse_thumbs(payload, settings, order)
    else:
        if payload.get("thumbs") is not None:
            raise AppError(422, "thumbs: this project collects rankings, not thumbs; send 'rankings' instead")
        rankings, strengths = _parse_rankings(payload, settings, order)
    flags = _parse_flags(payload.get("flags"), order)
    comment = payload.get("comment") or ""
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise AppError(422, f"comment: must be text of at most {MAX_COMMENT} characters")
    cur = conn.execute(
        "INSERT INTO submissions (client_id, assignment_id, user_id, item_id, rankings, strengths, flags, comment,"
        " seconds, created_at, thumbs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (client_id, row["id"], user_id, row["item_id"], json.dumps(rankings),
         json.dumps(strengths) if strengths else None, json.dumps(flags), comment, now - row["created_at"], now,
         None if thumbs is None else json.dumps(thumbs)),
    )
    conn.execute("UPDATE assignments SET status = 'submitted' WHERE id = ?", (row["id"],))
    return "stored", cur.lastrowid


def _parse_rankings(payload: dict, settings: ProjectSettings, order: list[int]) -> tuple[dict, dict]:
    given = payload.get("rankings")
    if not isinstance(given, dict):
        raise AppError(422, f"rankings: send an object with one ranking per criterion: {settings.criteria}")
    missing = [c for c in settings.criteria if c not in given]
    extra = [c for c in given if c not in settings.criteria]
    if missing or extra:
        raise AppError(422, f"rankings: expected criteria {settings.criteria}; missing {missing}, unknown {extra}")
    strengths_in = payload.get("strengths") or {}
    if not isinstance(strengths_in, dict):
        raise AppError(422, "strengths: send an object {criterion: [strength, ...]} or leave it out")
    rankings, strengths = {}, {}
    for criterion in settings.criteria:
        try:
            ranking = validate_ranking(given[criterion], len(order), f"rankings.{criterion}")
        except DataError as e:
            raise AppError(422, f"{e} (display positions 0..{len(order) - 1}, tie groups best first)") from None
        # display position -> original completion index: the export speaks original indices only.
        rankings[criterion] = [sorted(order[pos] for pos in group) for group in ranking]
        if settings.ask_strength and len(ranking) > 1:
            s = strengths_in.get(criterion)
            if not isinstance(s, list) or len(s) != len(ranking) - 1 or not all(x in STRENGTH_MARGINS for x in s):
                raise AppError(
                    422,
                    f"strengths.{criterion}: give {len(ranking) - 1} strength(s), one per step between adjacent"
                    f" ranks, each one of {list(STRENGTH_MARGINS)}",
                )
            strengths[criterion] = s
    return rankings, strengths


def _parse_thumbs(payload: dict, settings: ProjectSettings, order: list[int]) -> dict[str, list[bool]]:
    """{criterion: [{position, label}, ...]} in display positions -> {criterion: [label per ORIGINAL index]}
    (True = up). Every reply needs exactly one thumb per criterion: a position that is not a reply of the
    item, a label that is not a JSON boolean, a reply left out or given both thumbs are refused (422); the
    same thumb sent twice is kept once."""
    given = payload.get("thumbs")
    k = len(order)
    if not isinstance(given, dict):
        raise AppError(422, f"thumbs: send an object with, per criterion {settings.criteria}, a list of "
                            f"{{position, label}}: one thumb for each reply (positions 0..{k - 1}, label true = up, "
                            "false = down)")
    missing = [c for c in settings.criteria if c not in given]
    extra = [c for c in given if c not in settings.criteria]
    if missing or extra:
        raise AppError(422, f"thumbs: expected criteria {settings.criteria}; missing {missing}, unknown {extra}")
    out = {}
    for criterion in settings.criteria:
        marks = given[criterion]
        if not isinstance(marks, list) or len(marks) > 2 * k:
            raise AppError(422, f"thumbs.{criterion}: send a list of {{position, label}}, one per reply ({k})")
        labels: dict[int, bool] = {}
        for mark in marks:
            pos = mark.get("position") if isinstance(mark, dict) else None
            label = mark.get("label") if isinstance(mark, dict) else None
            if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos < k:
                raise AppError(422, f"thumbs.{criterion}: position {json.dumps(pos)[:40]} is not a reply of this item; "
                                    f"its replies are at positions 0..{k - 1}")
            if not isinstance(label, bool):  # "false" or 0 must never count as a thumb either way
                raise AppError(422, f"thumbs.{criterion}: the label of position {pos} must be true (thumb up) or "
                                    f"false (thumb down), got {json.dumps(label)[:40]}")
            if labels.setdefault(pos, label) != label:
                raise AppError(422, f"thumbs.{criterion}: position {pos} has both a thumb up and a thumb down; "
                                    "send one thumb per reply")
        unlabeled = [pos for pos in range(k) if pos not in labels]
        if unlabeled:
            raise AppError(422, f"thumbs.{criterion}: no thumb for position(s) {unlabeled}; give every reply a "
                                "thumb up or down")
        # display position -> original completion index: the export speaks original indices only.
        out[criterion] = [labels[order.index(i)] for i in range(k)]
    return out


def _parse_flags(flags, order: list[int]) -> list[dict]:
    """One flag per reply at most: a repeated identical flag is kept once, two reasons for one reply are refused."""
    if flags is None:
        return []
    if not isinstance(flags, list) or len(flags) > 2 * len(order):
        raise AppError(422, "flags: send a list of {position, reason}, at most one per completion")
    reasons: dict[int, str] = {}
    for f in flags:
        pos = f.get("position") if isinstance(f, dict) else None
        reason = f.get("reason") if isinstance(f, dict) else None
        if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos < len(order) or reason not in FLAG_REASONS:
            raise AppError(422, f"flags: each flag needs a position 0..{len(order) - 1} and a reason in {list(FLAG_REASONS)}")
        if reasons.setdefault(pos, reason) != reason:
            raise AppError(422, f"flags: position {pos} is flagged twice with different reasons; send one flag per reply")
    return [{"completion": order[pos], "reason": reason} for pos, reason in reasons.items()]


def labeler_progress(conn: sqlite3.Connection, user_id: int, overlap: int, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    done = conn.execute("SELECT COUNT(*) FROM assignments WHERE user_id = ? AND status = 'submitted'", (user_id,)).fetchone()[0]
    skipped = conn.execute("SELECT COUNT(*) FROM assignments WHERE user_id = ? AND status = 'skipped'", (user_id,)).fetchone()[0]
    available = conn.execute(
        f"""SELECT COUNT(*) FROM items i
            WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.user_id = :user)
              AND (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND {_ACTIVE}) < :overlap""",
        {"user": user_id, "now": now, "overlap": overlap},
    ).fetchone()[0]
    open_ = conn.execute("SELECT COUNT(*) FROM assignments WHERE user_id = ? AND status = 'open'", (user_id,)).fetchone()[0]
    return {"done": done, "skipped": skipped, "remaining": available + open_}
