"""Credentials, invitations, sessions, sign-in tickets and CSRF tokens.

- Passwords: scrypt (RFC 7914) from the standard library, per-user random salt; only the hash is stored.
  A new password needs MIN_PASSWORD characters and must not be one of COMMON_PASSWORDS.
- Invitations: a one-time random token sent as a link; only its SHA-256 is stored, and it expires.
- Sessions: a random cookie value; the DB stores its SHA-256 and an expiry (a copied DB grants no session).
- CSRF: a random token per session (synchronizer token); every state-changing form carries it in a hidden
  field and every state-changing JSON call in the X-CSRF-Token header. Sign-in forms, which have no
  session yet, use a double-submit cookie instead, plus the browser's Origin (deps.check_origin).
- Sign-in tickets: an HMAC-signed note, kept by a browser, that it signed in as a name before (or used that
  person's invitation); the sign-in throttle counts such a browser's failures against the ticket rather
  than its address (deps.LoginThrottle). The key is made once per project and kept in its database.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass

from rlhfkit.core.errors import ConfigError

SCRYPT_N = 2**14  # ~16 MiB and ~50 ms per hash: slow for an attacker, fine for one sign-in
SCRYPT_R, SCRYPT_P = 8, 1
MIN_PASSWORD = 8
TICKET_SECONDS = 180 * 24 * 3600  # a sign-in ticket (and its cookie) lasts about half a year
# What a guesser tries first: the 8+ character passwords at the top of public breach-frequency lists
# (NIST SP 800-63B 5.1.1.2 asks verifiers to refuse such "commonly-used" values). Compared
# case-insensitively. Deliberately short: the sign-in throttle bounds guesses beyond the first few dozen.
COMMON_PASSWORDS = frozenset("""
    password password1 password12 password123 password1234 passw0rd p@ssw0rd p@ssword letmein1 letmein123
    12345678 123456789 1234567890 0123456789 87654321 11111111 00000000 88888888 12341234 11223344 12344321
    123123123 147258369 1q2w3e4r 1q2w3e4r5t 1qaz2wsx zaq12wsx qwertyuiop qwerty12 qwerty123 asdfghjkl
    asdf1234 abcd1234 abc12345 abcdefgh iloveyou iloveyou1 sunshine princess football baseball basketball
    superman batman123 starwars trustno1 whatever welcome1 welcome123 changeme changeme1 admin123
    administrator computer internet michelle jennifer charlie1 monkey123 dragon123 master123 shadow123
""".split())


def password_problem(password: str) -> str | None:
    """Why a new password is refused (a sentence to show the person), or None when it is acceptable."""
    if len(password) < MIN_PASSWORD:
        return f"use at least {MIN_PASSWORD} characters"
    if password.lower() in COMMON_PASSWORDS:
        return "this is one of the most common passwords, the first a guesser tries; choose another"
    return None


def hash_password(password: str, n: int = SCRYPT_N) -> str:
    # Every password the app stores is hashed here (set_password, accept_invitation), so the rules for a
    # new password hold on every path: the invitation form, `add-labeler --password-stdin`, any caller.
    problem = password_problem(password)
    if problem is not None:
        raise ConfigError(f"password: {problem}")
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
    # Compared as bytes: compare_digest refuses str with non-ASCII characters (a TypeError, i.e. a 500 for
    # a client that sent "é" as its token).
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected).encode(), str(given).encode())


def app_key(conn: sqlite3.Connection, purpose: str) -> bytes:
    """A random server-side key for `purpose`, made the first time and kept in the project's database, so
    what it signed outlives a restart. Call inside a transaction."""
    conn.execute("INSERT OR IGNORE INTO app_keys (purpose, key) VALUES (?, ?)", (purpose, secrets.token_hex(32)))
    return bytes.fromhex(conn.execute("SELECT key FROM app_keys WHERE purpose = ?", (purpose,)).fetchone()[0])


def new_ticket(key: bytes, name: str) -> str:
    """A sign-in ticket for `name`: ISSUED.ID.MAC, where MAC signs the name, the time and the random ID."""
    issued, tid = int(time.time()), secrets.token_urlsafe(12)
    return f"{issued}.{tid}.{_ticket_mac(key, name, issued, tid)}"


def ticket_id(key: bytes, ticket: str | None, name: str) -> str | None:
    """The ticket's ID when `ticket` is an unexpired ticket this server issued for `name`; otherwise None."""
    if not ticket or len(ticket) > 200:
        return None
    issued, _, rest = ticket.partition(".")
    tid, _, mac = rest.partition(".")
    if not (issued.isascii() and issued.isdigit() and tid and mac):
        return None
    if not 0 <= time.time() - int(issued) <= TICKET_SECONDS:
        return None
    if not hmac.compare_digest(mac.encode(), _ticket_mac(key, name, int(issued), tid).encode()):
        return None
    return tid


def _ticket_mac(key: bytes, name: str, issued: int, tid: str) -> str:
    return hmac.new(key, f"sign-in ticket\n{name}\n{issued}\n{tid}".encode(), hashlib.sha256).hexdigest()
