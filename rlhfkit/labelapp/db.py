"""SQLite access: one connection per request, WAL journal, and commits that are durable on return."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from rlhfkit.core.errors import ConfigError
from rlhfkit.labelapp import DB_NAME


def db_path(project_dir: str | Path) -> Path:
    return Path(project_dir) / DB_NAME


_write_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _write_lock(conn: sqlite3.Connection) -> threading.Lock:
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    with _locks_guard:
        return _write_locks.setdefault(path, threading.Lock())


def connect(path: str | Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN ourselves, so a transaction's extent is visible in the code.
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    # WAL lets readers (progress pages) run beside the one writer; synchronous=FULL fsyncs the WAL at
    # every commit, so a submission acknowledged to the client survives a crash of the process or the OS.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def init_db(path: str | Path) -> None:
    """Create the project directory and the tables if they do not exist (schema.sql is idempotent)."""
    project_dir = Path(path).parent
    if project_dir.exists() and not project_dir.is_dir():
        raise ConfigError(f"{project_dir}: is a file, not a directory; give a directory for the labeling project")
    try:
        project_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a parent is a file, or no permission
        raise ConfigError(f"{project_dir}: cannot create the project directory ({e.strerror})") from None
    schema = resources.files("rlhfkit.labelapp").joinpath("schema.sql").read_text(encoding="utf-8")
    conn = connect(path)
    try:
        conn.executescript(schema)
        migrate(conn)
    finally:
        conn.close()


# Columns added after the first release: (table, column, definition). schema.sql's CREATE TABLE IF NOT EXISTS
# leaves the tables of an existing database as they were, so each column missing there is added here, with a
# default that means what the database meant before (a project without `mode` ranks).
ADDED_COLUMNS = (
    ("project", "mode", "TEXT NOT NULL DEFAULT 'ranking'"),
    ("submissions", "thumbs", "TEXT"),
)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a database made by an earlier version up to schema.sql (idempotent; a no-op when up to date).
    Run by init_db and by `opened`, so `serve`, `export`, `status` and the pipeline's hook all see the new
    columns in an old project directory."""
    def lacks(table: str, column: str) -> bool:  # a table not there yet gets the column from schema.sql
        columns = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}  # r[1]: the name
        return bool(columns) and column not in columns

    missing = [added for added in ADDED_COLUMNS if lacks(added[0], added[1])]
    if not missing:
        return
    with transaction(conn):
        for table, column, definition in missing:
            if lacks(table, column):  # re-checked under the write lock: another process may have added it
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT: take the write lock up front, so two requests that both read
    "this item still has a free slot" cannot both act on it.

    Writers of this process first queue on a threading.Lock: SQLite's own busy handler waits by sleeping
    in growing steps (up to 100 ms), which under 20 concurrent labelers turned into a long latency tail.
    The busy timeout still covers other processes (e.g. `rlhfkit label add-labeler` beside the server).
    """
    with _write_lock(conn):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


@contextmanager
def opened(project_dir: str | Path) -> Iterator[sqlite3.Connection]:
    conn = connect(db_path(project_dir))
    try:
        migrate(conn)
        yield conn
    finally:
        conn.close()
