"""Creating a labeling project and the people who work on it.

A project directory holds one SQLite database (labels.sqlite3) with the settings, the items (a prompt and
its completions in their original order) and everything labelers do. Items come either from a JSONL file
of already sampled completions or from a policy directory, sampled with rlhfkit.models.sampling.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.core.config import CRITERION_NAME
from rlhfkit.core.errors import ConfigError, DataError
from rlhfkit.data.contract import STRENGTH_MARGINS, iter_jsonl
from rlhfkit.labelapp import db
from rlhfkit.labelapp.security import MIN_PASSWORD, SCRYPT_N, hash_password, new_token, token_hash

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
CRITERION_RE = CRITERION_NAME  # one rule for the app and `feedback.criteria`, so the config fails early
MAX_K = 9  # more completions than this do not fit a ranking screen
# What labelers give: a ranking of the K replies (-> comparisons, reward model, DPO) or a thumb up or down on
# each reply (-> the unpaired records KTO trains on, rlhfkit.data.contract.Thumb).
MODES = ("ranking", "thumbs")
INVITE_SECONDS = 7 * 24 * 3600
MAX_LEASE_SECONDS = 7 * 24 * 3600  # a lease longer than a week would hold an item for good
# What transformers' from_pretrained loads a PyTorch causal LM from: a directory without any of these has
# no weights (the saved config and tokenizer alone load, then the model fails deep inside transformers).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class ProjectSettings:
    """What the lead chooses when creating a project."""

    name: str = "labeling"
    criteria: list[str] = field(default_factory=lambda: ["overall"])  # one ranking per criterion per item
    k: int = 4  # completions per prompt when sampling from a policy
    overlap: int = 1  # labelers per item; >= 2 gives agreement figures and a consensus
    ask_strength: bool = False  # Llama-2-style strength between adjacent ranks -> comparison margins
    guidelines: str = ""  # Markdown
    lease_seconds: int = 1800  # an assignment not answered in this time is handed to someone else
    mode: str = "ranking"  # MODES: rank the replies, or thumbs up / down on each one (for KTO)

    def validate(self) -> ProjectSettings:
        if self.mode not in MODES:
            raise ConfigError(f"mode: {self.mode!r} is not one of {list(MODES)}; 'thumbs' asks for a thumb up or "
                              "down on each reply (KTO's data), 'ranking' for a ranking of the replies")
        if self.mode == "thumbs" and self.ask_strength:
            raise ConfigError("strength: asking how much better each rank is needs rankings; leave out --strength "
                              "with --mode thumbs")
        if not self.criteria:
            raise ConfigError("criteria: give at least one criterion, e.g. --criteria helpfulness,harmlessness")
        for c in self.criteria:
            if not isinstance(c, str) or not CRITERION_RE.fullmatch(c):
                raise ConfigError(f"criteria: {c!r} is not a valid name; use lowercase letters, digits, '-' or '_'")
        if len(set(self.criteria)) != len(self.criteria):
            raise ConfigError(f"criteria: {self.criteria} lists a criterion twice")
        if not min_completions(self.mode) <= self.k <= MAX_K:
            raise ConfigError(f"k: {self.k} completions per prompt; choose between {min_completions(self.mode)} "
                              f"and {MAX_K}")
        if not 1 <= self.overlap <= 20:
            raise ConfigError(f"overlap: {self.overlap} labelers per item; choose between 1 and 20")
        lease = self.lease_seconds
        if not (isinstance(lease, int) and not isinstance(lease, bool) and 1 <= lease <= MAX_LEASE_SECONDS):
            raise ConfigError(f"lease: {self.lease_seconds!r} seconds; choose between 1 second and 7 days")
        return self


def min_completions(mode: str) -> int:
    """Fewest completions an item may have: a ranking needs two, a thumb judges one reply on its own."""
    return 1 if mode == "thumbs" else 2


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file's content; an unreadable or non-UTF-8 file is a one-line DataError naming the
    file, the line and what to do."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such {what}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what} ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: the {what} is not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "save it as UTF-8") from None


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a prompt file in any format rlhfkit reads (a text file with one prompt per line, JSONL
    with 'prompt', JSON, Parquet, a `datasets` directory, or the prompts of a preference or SFT file: the
    same files `[data] prompts` takes; docs/data.md). The app shows plain-text prompts only."""
    from rlhfkit.data.load import load_prompts as read_prompts

    records = read_prompts(path)
    for n, r in enumerate(records, start=1):
        if not isinstance(r.prompt, str):
            raise DataError(f"{path}: prompt {n} is a conversation; the labeling app shows plain-text prompts only "
                            "(render it to text first)")
        if not r.prompt.strip():
            raise DataError(f"{path}: prompt {n} is empty")
    if not records:
        raise DataError(f"{path}: contains no prompts")
    return [r.prompt for r in records]


def load_completions(path: str | Path, mode: str = "ranking") -> list[dict]:
    """Items from a JSONL file of {"prompt", "completions"[, "model_ids"][, "item_id"]} objects (in thumbs
    mode an item may have a single completion)."""
    read_text(path, "completions file")  # a non-UTF-8 line is named here, not a UnicodeDecodeError mid-read
    items = []
    for where, obj in iter_jsonl(path):
        items.append(_check_item(obj, where, min_completions(mode)))
    if not items:
        raise DataError(f"{path}: contains no items")
    return items


def _check_item(obj: dict, where: str, fewest: int = 2) -> dict:
    prompt, completions = obj.get("prompt"), obj.get("completions")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise DataError(f"{where}: field 'completions' must be a list of strings")
    if not fewest <= len(completions) <= MAX_K:
        raise DataError(f"{where}: {len(completions)} completions; an item needs between {fewest} and {MAX_K}")
    model_ids = obj.get("model_ids")
    if model_ids is not None and (
        not isinstance(model_ids, list) or len(model_ids) != len(completions) or not all(isinstance(m, str) for m in model_ids)
    ):
        raise DataError(f"{where}: field 'model_ids' must be a list of strings, one per completion")
    item_id = obj.get("item_id")
    # bool is an int to Python: without the first test, `true` became the item id "True"
    if item_id is not None and (isinstance(item_id, bool) or not isinstance(item_id, (str, int))):
        raise DataError(f"{where}: field 'item_id' must be a string or an integer, got {json.dumps(item_id)[:40]}")
    return {"prompt": prompt, "completions": completions, "model_ids": model_ids,
            "item_id": None if item_id is None else str(item_id)}


def sample_items(policy_dir: str | Path, prompts: list[str], k: int, *, seed: int = 0, max_new_tokens: int = 32,
                 temperature: float = 1.0, device: str = "auto", sampling=None) -> list[dict]:
    """K completions per prompt from a policy directory (imported here: only this path needs torch).
    `temperature`, `device` and `sampling` (rlhfkit.models.sampling.SamplingParams: the [sampling] filters and stop
    strings; None = none) come from the run's config when the pipeline calls this."""
    from rlhfkit.models.load import check_model_dir
    from rlhfkit.models.sampling import sample_completions

    policy_dir = Path(policy_dir)
    if (policy_dir / "config.json").is_file():
        read_text(policy_dir / "config.json", "policy's config.json")
    check_model_dir(policy_dir, "policy", causal=True)
    if not any((policy_dir / name).is_file() for name in WEIGHT_FILES):
        raise DataError(f"policy: {policy_dir} has no model weights (none of {', '.join(WEIGHT_FILES)}); "
                        "save the model there with save_pretrained")
    try:
        completions = sample_completions(policy_dir, prompts, k, seed=seed, max_new_tokens=max_new_tokens,
                                         temperature=temperature, device=device, sampling=sampling)
    except OSError as e:  # transformers reports unloadable files as OSError, over several lines
        raise DataError(f"policy: cannot load the model from {policy_dir}: {str(e).strip().splitlines()[0]}") from None
    model = Path(policy_dir).name
    return [{"prompt": p, "completions": list(c), "model_ids": [model] * len(c), "item_id": None}
            for p, c in zip(prompts, completions)]


def create_project(project_dir: str | Path, settings: ProjectSettings, items: list[dict], source: str = "") -> int:
    """Write the settings and items into a new project database; returns the number of items."""
    settings.validate()
    path = db.db_path(project_dir)
    db.init_db(path)
    with db.opened(project_dir) as conn, db.transaction(conn):
        if conn.execute("SELECT 1 FROM project").fetchone():
            raise ConfigError(f"{project_dir}: already holds a labeling project; choose another directory")
        conn.execute(
            "INSERT INTO project (id, name, criteria, k, overlap, ask_strength, guidelines, lease_seconds, source,"
            " created_at, mode) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (settings.name, json.dumps(settings.criteria), settings.k, settings.overlap, int(settings.ask_strength),
             settings.guidelines, settings.lease_seconds, source, time.time(), settings.mode),
        )
        seen = set()
        for n, item in enumerate(items):
            key = item.get("item_id") or f"{settings.name}-{n:06d}"
            if key in seen:
                raise DataError(f"item {n + 1}: item_id {key!r} appears twice; item ids must be unique")
            seen.add(key)
            conn.execute(
                "INSERT INTO items (item_key, prompt, completions, model_ids) VALUES (?, ?, ?, ?)",
                (key, item["prompt"], json.dumps(item["completions"]),
                 json.dumps(item["model_ids"]) if item.get("model_ids") else None),
            )
    return len(items)


def project_exists(project_dir: str | Path) -> bool:
    if not db.db_path(project_dir).is_file():
        return False
    with db.opened(project_dir) as conn:
        return get_settings(conn) is not None


def get_settings(conn: sqlite3.Connection) -> ProjectSettings | None:
    row = conn.execute("SELECT * FROM project WHERE id = 1").fetchone()
    if row is None:
        return None
    return ProjectSettings(
        name=row["name"], criteria=json.loads(row["criteria"]), k=row["k"], overlap=row["overlap"],
        ask_strength=bool(row["ask_strength"]), guidelines=row["guidelines"], lease_seconds=row["lease_seconds"],
        mode=row["mode"],
    )


def set_guidelines(conn: sqlite3.Connection, text: str) -> None:
    conn.execute("UPDATE project SET guidelines = ? WHERE id = 1", (text,))


def add_person(conn: sqlite3.Connection, name: str, role: str | None = None,
               invite_seconds: float = INVITE_SECONDS) -> str:
    """Add a lead or labeler, or send an existing person a new invitation (a password reset); returns the
    one-time invitation token for the link /invite/TOKEN. role=None: 'labeler' for a new person, and an
    existing person keeps theirs (a lead resetting their password must not demote themselves)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    if role is not None and role not in ("lead", "labeler"):
        raise ConfigError(f"role {role!r}: must be 'lead' or 'labeler'")
    token = new_token()
    row = conn.execute("SELECT id, password_hash FROM users WHERE name = ?", (name,)).fetchone()
    expires = time.time() + invite_seconds
    if row is None:
        conn.execute(
            "INSERT INTO users (name, role, invite_hash, invite_expires_at, created_at) VALUES (?, ?, ?, ?, ?)",
            (name, role or "labeler", token_hash(token), expires, time.time()),
        )
    else:
        # A new invitation for an existing person is a password reset: the old password stops working
        # (whoever knew it is out) and their sessions end; the link sets a new one.
        conn.execute("UPDATE users SET invite_hash = ?, invite_expires_at = ?, password_hash = NULL,"
                     " role = COALESCE(?, role) WHERE id = ?", (token_hash(token), expires, role, row["id"]))
        conn.execute("DELETE FROM sessions WHERE user_id = ?", (row["id"],))
    return token


def set_password(conn: sqlite3.Connection, name: str, password: str, scrypt_n: int = SCRYPT_N) -> None:
    """Set a password directly (CLI `add-labeler --password`, tests)."""
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"password: use at least {MIN_PASSWORD} characters")
    conn.execute("UPDATE users SET password_hash = ?, invite_hash = NULL WHERE name = ?",
                 (hash_password(password, scrypt_n), name))


def accept_invitation(conn: sqlite3.Connection, token: str, password: str, scrypt_n: int = SCRYPT_N) -> str | None:
    """Use an invitation token to set a password; returns the user's name, or None if the link is
    unknown or expired. The token works once."""
    row = conn.execute("SELECT id, name, invite_expires_at FROM users WHERE invite_hash = ?", (token_hash(token),)).fetchone()
    if row is None or (row["invite_expires_at"] or 0) < time.time():
        return None
    conn.execute("UPDATE users SET password_hash = ?, invite_hash = NULL, invite_expires_at = NULL WHERE id = ?",
                 (hash_password(password, scrypt_n), row["id"]))
    return row["name"]


def strength_names() -> list[str]:
    return list(STRENGTH_MARGINS)
