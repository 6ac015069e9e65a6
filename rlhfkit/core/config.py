"""Config machinery shared by every section: typed dataclass fields with their help, reading TOML and `--set`
layers with the origin of each key, checks whose messages say where a value came from, and writing TOML back.

The sections themselves live next to the code that reads them: each policy-optimisation method's in its file
(rlhfkit/algorithms/), the stages' in rlhfkit/pipeline/config.py, which assembles `Config` from the registry.
Field types: str, int, float, bool, a nested dataclass (a section, `[ppo]`), `list[str | int | float]`
(a TOML array) and `list[SomeDataclass]` (an array of tables, `[[reward.sources]]`). The reading,
checking and writing below work on any such dataclass, not only on `Config`.

Layer: core (imports nothing else of rlhfkit but rlhfkit.core.errors; no torch).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from rlhfkit.core.errors import ConfigError

# A criterion name as the labeling app accepts it (rlhfkit.labelapp.project uses this same rule).
CRITERION_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def F(default, help: str):
    """A config field with its one-line documentation (used by errors, `rlhfkit config` and docs).
    A list default becomes a factory that copies it, so no two configs share (and mutate) one list."""
    if isinstance(default, list):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def get_value(cfg: Any, dotted: str):
    """The value at a dotted key; 'reward.sources[1].kind' indexes an array of tables."""
    obj = cfg
    for part in dotted.split("."):
        name, *index = re.split(r"\[(\d+)\]", part)
        obj = getattr(obj, name)
        for i in index[::2]:
            obj = obj[int(i)]
    return obj


class Checks:
    """The two helpers every section's `validate` uses, so that each message says where a value came from:
    `need(ok, key, msg)` raises a ConfigError about `key` unless ok; `ref(key)` is another value a message
    mentions, with its origin. `origins` maps dotted keys to the Source that set them (load_config records it)."""

    def __init__(self, cfg: Any, origins: dict[str, "Source"] | None = None):
        self.cfg, self.origins = cfg, origins or {}

    def source(self, key: str) -> "Source":
        while key:
            if key in self.origins:
                return self.origins[key]
            key = _parent(key)
        return Source("default")

    def ref(self, key: str) -> str:
        return f"{key} = {get_value(self.cfg, key)!r} ({self.source(key).origin(key)})"

    def need(self, ok: bool, key: str, msg: str) -> None:
        if not ok:
            src = self.source(key)
            if src.kind in ("default", "task", "model"):
                raise ConfigError(f"{self.ref(key)}: {msg}")
            raise ConfigError(f"{src.prefix(key)}{key} = {get_value(self.cfg, key)!r}: {msg}")

    def at_least_one(self, *keys: str) -> None:
        for key in keys:
            self.need(get_value(self.cfg, key) >= 1, key, "must be at least 1")

    def positive(self, *keys: str) -> None:
        for key in keys:
            self.need(get_value(self.cfg, key) > 0, key, "must be > 0")

# ----------------------------------------------------------------------------------------------------
# Where a value came from


def _parent(key: str) -> str:
    """'reward.sources[0].kind' -> 'reward.sources[0]' -> 'reward.sources' -> 'reward' -> ''."""
    return re.sub(r"(\[\d+\]|\.?[^.\[\]]+)$", "", key)


_BARE_OR_QUOTED = r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'"""
_TOML_KEY = re.compile(rf"""^\s*((?:{_BARE_OR_QUOTED})(?:\s*\.\s*(?:{_BARE_OR_QUOTED}))*)\s*=(.*)$""")
_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_MULTILINE_QUOTES = ('"' * 3, "'" * 3)


def _key_parts(text: str) -> list[str]:
    return [p[1:-1] if p[0] in "\"'" else p for p in re.findall(_BARE_OR_QUOTED, text)]


def toml_key_lines(text: str) -> dict[str, int]:
    """The 1-based line of each key and table header of a TOML text, by dotted path: 'seed', 'ppo',
    'ppo.kl_coef', and for arrays of tables the element's index: 'reward.sources[1].kind'.

    tomllib gives values, not positions, so this scans the lines: a [table] or [[array]] header sets the
    path that the `key = value` lines below it extend; lines inside a multi-line string are skipped.
    Good enough to point a person at a line; the file is parsed by tomllib, never by this."""
    lines: dict[str, int] = {}
    arrays: dict[str, int] = {}  # path of an array of tables -> index of its current element
    table, in_string = "", None

    def resolve(parts: list[str]) -> str:  # dotted parts -> path with the current array indices
        path = ""
        for part in parts:
            path = f"{path}.{part}" if path else part
            if path in arrays:
                path = f"{path}[{arrays[path]}]"
        return path

    for lineno, line in enumerate(text.splitlines(), start=1):
        if in_string:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        header = _TOML_HEADER.match(line)
        if header:
            parts = _key_parts(header.group(2))
            if header.group(1) == "[[":
                parent = resolve(parts[:-1])
                name = f"{parent}.{parts[-1]}" if parent else parts[-1]
                arrays[name] = arrays.get(name, -1) + 1
                table = f"{name}[{arrays[name]}]"
            else:
                table = resolve(parts)
            lines.setdefault(table, lineno)
            continue
        key = _TOML_KEY.match(line)
        if key:
            lines.setdefault(".".join(([table] if table else []) + _key_parts(key.group(1))), lineno)
            for quote in _MULTILINE_QUOTES:  # a multi-line string opened on this line
                if key.group(2).count(quote) % 2 == 1:
                    in_string = quote
    return lines


@dataclass
class Source:
    """Where one layer of config values comes from, so that a message can say it: a TOML file (with the
    line of each key), a `--set` override, the task's defaults, the defaults of the model in policy.path,
    load_config()'s keyword arguments, or the dataclass default."""

    kind: str  # 'file', 'set', 'task', 'model', 'python', 'default', or 'text' (a fixed message prefix)
    name: str = ""  # the file's path, the override's text, the task's name, the model default's origin, or the prefix
    lines: dict[str, int] = field(default_factory=dict, repr=False)  # 'file': toml_key_lines of its text

    @classmethod
    def file(cls, path: str | Path, text: str) -> "Source":
        return cls("file", str(path), toml_key_lines(text))

    def origin(self, key: str) -> str:
        """Where `key` came from, in a few words: 'my.toml:7', '--set', "task 'digits' default", 'default', or a
        model default's own words ('models/x/generation_config.json')."""
        if self.kind == "file":
            while key and key not in self.lines:
                key = _parent(key)
            return f"{self.name}:{self.lines[key]}" if key else self.name
        return {"set": "--set", "task": f"task '{self.name}' default", "python": "load_config()",
                "default": "default", "model": self.name}.get(self.kind, self.name.rstrip(": "))

    def prefix(self, key: str) -> str:
        """How a message about `key` from this layer starts: 'my.toml:7: ', '--set ', ..."""
        if self.kind == "file":
            return f"{self.origin(key)}: "
        return {"set": "--set ", "task": f"task '{self.name}' defaults: ", "python": "load_config(): ",
                "default": "", "model": f"{self.name}: "}.get(self.kind, self.name)


# ----------------------------------------------------------------------------------------------------
# Reading layers into a Config


def _type_name(typ: Any) -> str:
    """How a field type reads in an error message: 'float', 'a list of str', 'a list of tables'."""
    if get_origin(typ) is list:
        item = get_args(typ)[0]
        return "a list of tables" if is_dataclass(item) else f"a list of {_type_name(item)}"
    return "a table" if is_dataclass(typ) else typ.__name__


def _coerce(value: Any, typ: Any, key: str, where: Source) -> Any:
    """`value` checked (and ints widened to float) as a `typ`; a list is checked element by element."""
    if get_origin(typ) is list:
        item = get_args(typ)[0]
        if not isinstance(value, list):
            hint = (f"write one [[{key}]] table per element" if is_dataclass(item)
                    else f"write a TOML array such as [{toml_value(value)}]")
            raise ConfigError(f"{where.prefix(key)}{key} = {value!r}: expected {_type_name(typ)}, "
                              f"got {type(value).__name__}; {hint}")
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if is_dataclass(typ):
        return _from_table(typ, value, key, where)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str) and value.lower() in ("inf", "+inf"):
        return math.inf
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{where.prefix(key)}{key} = {value!r}: expected {typ.__name__}, got {type(value).__name__}")
    return value


def _did_you_mean(name: str, options: list[str], prefix: str = "") -> str:
    """The closest valid key by its full dotted name ('ppo.kl_coef'), else the valid keys of that table."""
    hint = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{hint[0]}'?" if hint else f"; valid keys: {', '.join(options)}"


def _check_keys(data: dict, typ: type, prefix: str, where: Source) -> None:
    names = [f.name for f in fields(typ)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{where.prefix(prefix + key)}unknown key '{prefix}{key}'"
                              f"{_did_you_mean(key, names, prefix)}")


def _from_table(typ: type, value: Any, key: str, where: Source) -> Any:
    """A new `typ` from one table of an array of tables; keys it leaves out keep their defaults."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where.prefix(key)}{key} = {value!r}: expected a table of "
                          f"{', '.join(f.name for f in fields(typ))}, got {type(value).__name__}")
    _check_keys(value, typ, f"{key}.", where)
    hints = get_type_hints(typ)
    for f in fields(typ):
        if f.name not in value and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{where.prefix(key)}{key}: missing key '{f.name}' (it has no default)")
    return typ(**{k: _coerce(v, hints[k], f"{key}.{k}", where) for k, v in value.items()})


def apply_dict(obj: Any, data: dict, where: str | Source = "", prefix: str = "",
               origins: dict[str, Source] | None = None) -> Any:
    """Set fields of the dataclass `obj` (a Config, or any config dataclass) from a nested dict in the TOML
    layout, checking names and types. A nested dataclass is a section updated in place, so layers merge
    key by key; a list is replaced whole (layers never append). `prefix` is `obj`'s dotted path; `where`
    says where `data` came from (a Source, or a plain message prefix); `origins`, when given, records
    the Source of each dotted key set."""
    where = where if isinstance(where, Source) else Source("text", where)
    _check_keys(data, type(obj), prefix, where)
    hints = get_type_hints(type(obj))
    for key, value in data.items():
        path = prefix + key
        if is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where.prefix(path)}'{path}' is a section; write [{path}] with key = value lines")
            apply_dict(getattr(obj, key), value, where, f"{path}.", origins)
        else:
            setattr(obj, key, _coerce(value, hints[key], path, where))
            if origins is not None:
                origins[path] = where
    return obj


def parse_override(text: str) -> dict:
    """'section.key=value' -> {'section': {'key': value}}; the value is read as TOML, else as a string.
    Lists are TOML arrays: feedback.criteria=["a", "b"]; reward.sources=[{kind = "x", weight = 1.0}]."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write section.key=value (for example --set ppo.kl_coef=0)")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.split(".")
    if len(parts) > 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: keys are 'field' or 'section.field'")
    return {parts[0]: value} if len(parts) == 1 else {parts[0]: {parts[1]: value}}


def _line(raw: bytes, offset: int) -> int:
    return raw[:offset].count(b"\n") + 1


NUL = bytes(1)


def _read_text(path: Path) -> str:
    """A config file's text; anything but UTF-8 (a binary file, UTF-16) is a one-line error."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}:1: not UTF-8 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    if NUL in raw:
        raise ConfigError(f"{path}:{_line(raw, raw.index(NUL))}: not UTF-8 text (it holds NUL bytes: a binary "
                          "file, or UTF-16 without a byte-order mark); save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is harmless: skip it
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}:{_line(raw, e.start)}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None


def read_toml_file(path: str | Path) -> tuple[dict, str]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = _read_text(path)
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def read_toml(path: str | Path) -> dict:
    """A TOML config file as a dict; a missing, non-UTF-8 or invalid file is a ConfigError naming it."""
    return read_toml_file(path)[0]




def config_to_dict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def toml_value(v: Any) -> str:
    """One value as TOML; a dataclass (an element of an array of tables) as an inline table."""
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if is_dataclass(v):
        return "{" + ", ".join(f"{f.name} = {toml_value(getattr(v, f.name))}" for f in fields(v)) + "}"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "inf" if v == math.inf else repr(v)
    if isinstance(v, int):
        return str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_lines(obj: Any, path: str, lines: list[str]) -> None:
    """`obj`'s keys as `key = value  # help` lines, then its tables: a [path.section] for a nested
    dataclass, one [[path.key]] block per element of a list of dataclasses. (TOML needs all of a table's
    keys before the next header, hence keys first.)"""
    tables = []
    for f in fields(obj):
        value, sub = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
        comment = f"  # {f.metadata['help']}" if "help" in f.metadata else ""
        if is_dataclass(value):
            tables.append((f"[{sub}]{comment}", sub, value))
        elif isinstance(value, list) and value and all(is_dataclass(v) for v in value):
            tables += [(f"[[{sub}]]{comment}", sub, v) for v in value]
        else:  # an empty array of tables is written `key = []`
            lines.append(f"{f.name} = {toml_value(value)}{comment}")
    for header, sub, table in tables:
        lines.append(f"\n{header}")
        _toml_lines(table, sub, lines)


def config_to_toml(cfg) -> str:
    """The resolved config as TOML (what `rlhfkit run FILE` reads back), with each field's help."""
    lines: list[str] = []
    _toml_lines(cfg, "", lines)
    return "\n".join(lines) + "\n"


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [line for k in a for line in _diff(a[k], b.get(k), f"{path}.{k}" if path else k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(isinstance(x, dict) for x in a + b):
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def config_diff(a, b) -> list[str]:
    """Fields that differ, as 'section.key: a -> b'; arrays of tables of one length element by element
    ('reward.sources[0].weight: 1.0 -> 2.0'), other lists as a whole."""
    return _diff(config_to_dict(a), config_to_dict(b), "")
