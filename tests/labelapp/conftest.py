"""Fixtures: every test gets a fresh project directory and database (flaskr style)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the labeling app needs the 'app' extra: pip install -e '.[app,dev]'")

from fastapi.testclient import TestClient

from rlhfkit.labelapp import db, project
from rlhfkit.labelapp.app import create_app

PASSWORD = "correct-horse-1"
FAST_SCRYPT = 2**4  # hashing cost is not what these tests measure
# The app's settings in tests: fast hashing, and TestClient's host name among the allowed ones.
TEST_SETTINGS = {"scrypt_n": FAST_SCRYPT, "allowed_hosts": ["testserver"]}
XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = '<img src=x onerror="alert(2)">'


def make_items(n: int, k: int = 3, models: bool = True) -> list[dict]:
    items = []
    for i in range(n):
        completions = [f"reply {j} to prompt {i}" for j in range(k)]
        items.append({"prompt": f"prompt number {i}", "completions": completions,
                      "model_ids": [f"model-{j % 2}" for j in range(k)] if models else None, "item_id": f"it-{i:03d}"})
    items[0]["prompt"] = f"Say hi {XSS_SCRIPT}"
    items[0]["completions"][1] = f"{XSS_IMG} and {XSS_SCRIPT}"
    return items


def make_project(path: Path, *, n_items: int = 6, k: int = 3, overlap: int = 2, criteria=("overall",),
                 ask_strength: bool = False, people=("alice", "bob", "carol"), lease_seconds: int = 1800,
                 guidelines: str = "# Rank well\nPrefer **polite** replies. <b>raw</b>", mode: str = "ranking") -> Path:
    settings = project.ProjectSettings(name="test", criteria=list(criteria), k=k, overlap=overlap,
                                       ask_strength=ask_strength, guidelines=guidelines, lease_seconds=lease_seconds,
                                       mode=mode)
    project.create_project(path, settings, make_items(n_items, k))
    with db.opened(path) as conn, db.transaction(conn):
        project.add_person(conn, "lead", "lead")
        project.set_password(conn, "lead", PASSWORD, scrypt_n=FAST_SCRYPT)
        for name in people:
            project.add_person(conn, name, "labeler")
            project.set_password(conn, name, PASSWORD, scrypt_n=FAST_SCRYPT)
    return path


@pytest.fixture
def project_dir(tmp_path) -> Path:
    return make_project(tmp_path / "proj")


@pytest.fixture
def app(project_dir):
    return create_app(project_dir, TEST_SETTINGS)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


def new_client(app) -> TestClient:
    return TestClient(app)


def api_login(client, name: str, password: str = PASSWORD) -> str:
    """Sign in through the JSON API; returns the CSRF token (the cookie stays in the client)."""
    r = client.post("/api/session", json={"name": name, "password": password})
    assert r.status_code == 200, r.text
    return r.json()["csrf_token"]


def next_item(client, csrf: str) -> dict:
    r = client.post("/api/next", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    return r.json()


def submit(client, csrf: str, assignment_id: int, ranking, client_id: str, criteria=("overall",), **extra):
    body = {"client_id": client_id, "assignment_id": assignment_id,
            "rankings": {c: ranking for c in criteria}, **extra}
    return client.post("/api/submissions", json=body, headers={"X-CSRF-Token": csrf})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
