"""Concurrent labelers over HTTP: each signs in, then loops "next item -> submit ranking".

Used by test_load.py (throughput, exactness, SIGKILL durability). Every submission carries a fresh
client id; when the connection breaks (server killed) the labeler keeps the unanswered submission and
re-sends it with the same id once the server is back, exactly as the page's script does.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx


@dataclass
class Labeler:
    name: str
    password: str
    target: int
    acked: list[str] = field(default_factory=list)  # client ids the server acknowledged (200/201)
    pending: dict | None = None  # a submission sent but not acknowledged
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retries_sent: int = 0
    resent_already_stored: int = 0  # re-sends after a crash answered "duplicate": committed, answer lost
    mode: str = "ranking"  # "thumbs": a random thumb per reply instead of a ranking
    sent: dict[str, dict] = field(default_factory=dict)  # client id -> the body acknowledged (what must be stored)


def run_labeler(lab: Labeler, url: str, stop: threading.Event, ack_counter: list[int], lock: threading.Lock,
                duplicate_every: int = 0, seed: int = 0) -> None:
    """Work until `target` submissions are acknowledged, `stop` is set, or the server is gone."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/api/session", json={"name": lab.name, "password": lab.password})
        r.raise_for_status()
        headers = {"X-CSRF-Token": r.json()["csrf_token"]}
        while len(lab.acked) < lab.target and not stop.is_set():
            try:
                if lab.pending is None:
                    nxt = http.post("/api/next", headers=headers)
                    nxt.raise_for_status()
                    a = nxt.json()["assignment"]
                    if a is None:
                        lab.errors.append("no item left")
                        return
                    k = len(a["completions"])
                    lab.pending = {"client_id": str(uuid.uuid4()), "assignment_id": a["assignment_id"]}
                    if lab.mode == "thumbs":
                        lab.pending["thumbs"] = {"overall": [{"position": i, "label": rng.random() < 0.5}
                                                             for i in range(k)]}
                    else:
                        order = rng.sample(range(k), k)
                        lab.pending["rankings"] = {"overall": [[i] for i in order]}
                t0 = time.perf_counter()
                r = http.post("/api/submissions", json=lab.pending, headers=headers)
                elapsed = time.perf_counter() - t0
                if r.status_code not in (200, 201):
                    lab.errors.append(f"{r.status_code} {r.text[:200]}")
                    return
                if r.status_code == 200:
                    lab.resent_already_stored += 1
                if duplicate_every and len(lab.acked) % duplicate_every == 0:
                    # a client that never saw the answer retries: must be answered "duplicate"
                    again = http.post("/api/submissions", json=lab.pending, headers=headers)
                    lab.retries_sent += 1
                    if again.status_code != 200 or again.json()["status"] != "duplicate":
                        lab.errors.append(f"retry not idempotent: {again.status_code} {again.text[:200]}")
                lab.latencies.append(elapsed)
                lab.acked.append(lab.pending["client_id"])
                lab.sent[lab.pending["client_id"]] = lab.pending
                lab.pending = None
                with lock:
                    ack_counter[0] += 1
            except httpx.TransportError:
                return  # server gone: keep `pending` for the retry after restart


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run_load(url: str, labelers: list[Labeler], *, kill_after: int | None = None, on_kill=None,
             duplicate_every: int = 0, time_limit: float = 240.0) -> float:
    """Run all labelers in threads; optionally call on_kill() once `kill_after` acks were counted.
    Returns the wall time."""
    stop = threading.Event()
    counter, lock = [0], threading.Lock()
    threads = [threading.Thread(target=run_labeler, args=(lab, url, stop, counter, lock, duplicate_every, n), daemon=True)
               for n, lab in enumerate(labelers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    killed = False
    while any(t.is_alive() for t in threads):
        if kill_after is not None and not killed and counter[0] >= kill_after:
            on_kill()
            killed = True
        if time.perf_counter() - t0 > time_limit:
            stop.set()  # bounded in time, whatever happens
        time.sleep(0.005)
    for t in threads:
        t.join()
    return time.perf_counter() - t0
