"""Credentials, invitations, sessions and CSRF tokens.

- Passwords: scrypt (RFC 7914) from the standard library, per-user random salt; only the hash is stored.
- Invitations: a one-time random token sent as a link; only its SHA-256 is stored, and it expires.
- Sessions: a random cookie value; the DB stores its SHA-256 and an expiry (a copied DB grants no session).
- CSRF: a random token per session (synchronizer token); every state-changing form carries it in a hidden
  field and every state-changing JSON call in the X-CSRF-Token header. Sign-in forms, which have no
  session yet, use a double-submit cookie instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass

SCRYPT_N = 2**14  # ~16 MiB and ~50 ms per hash: slow for an attacker, fine for one sign-in
SCRYPT_R, SCRYPT_P = 8, 1
MIN_PASSWORD = 8


def hash_password(password: str, n: int = SCRYPT_N) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=2**26)
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        _, n, r, p, salt, digest = stored.split("$")
        candidate = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), maxmem=2**26
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(candidate.hex(), digest)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str
    csrf_token: str

    @property
    def is_lead(self) -> bool:
        return self.role == "lead"


def create_session(conn: sqlite3.Connection, user_id: int, ttl_seconds: float) -> str:
    token = new_token()
    now = time.time()
    conn.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))  # keep the table small
    conn.execute(
        "INSERT INTO sessions (token_hash, user_id, csrf_token, expires_at) VALUES (?, ?, ?, ?)",
        (token_hash(token), user_id, new_token(), now + ttl_seconds),
    )
    return token


def session_user(conn: sqlite3.Connection, token: str | None) -> User | None:
    """The signed-in user for a session cookie, or None when missing, unknown, expired or deactivated."""
    if not token or len(token) > 200:
        return None
    row = conn.execute(
        "SELECT u.id, u.name, u.role, s.csrf_token, s.expires_at FROM sessions s JOIN users u ON u.id = s.user_id"
        " WHERE s.token_hash = ? AND u.active = 1",
        (token_hash(token),),
    ).fetchone()
    if row is None or row["expires_at"] < time.time():
        return None
    return User(row["id"], row["name"], row["role"], row["csrf_token"])


def end_session(conn: sqlite3.Connection, token: str | None) -> None:
    if token:
        conn.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash(token),))


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))
