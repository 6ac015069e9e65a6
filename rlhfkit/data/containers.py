"""Containers: the files records come in (JSONL, JSON, Parquet, a `datasets` directory, plain text lines).

A container yields plain dicts, each with a location for error messages (`FILE:LINE` for line-based
files, `FILE: record N` otherwise, 1-based); rlhfkit.data.formats turns the dicts into records. Writing is
atomic: the output appears complete or not at all (a temporary file or directory, then a rename).

Parquet and `datasets` directories need pyarrow (`pip install rlhfkit[data]`), imported only when such
a file is read or written. A `datasets` directory is what `Dataset.save_to_disk` writes (Arrow IPC
stream files listed in state.json); a `DatasetDict` directory holds one such directory per split. Both are
read with pyarrow alone, so the `datasets` package is not needed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rlhfkit.core.errors import DataError
from rlhfkit.data.contract import _decode_line, parse_jsonl_line

CONTAINERS = ("jsonl", "json", "parquet", "datasets", "txt")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
DATASET_STATE = "state.json"  # what Dataset.save_to_disk writes beside its .arrow files
DATASET_DICT = "dataset_dict.json"  # ... and DatasetDict.save_to_disk at the top, with one directory per split


def container_of(path: str | Path) -> str:
    """The container a path names: by suffix for a file, `datasets` for a directory (or a suffix-less name)."""
    path = Path(path)
    if path.is_dir() or (not path.exists() and path.suffix == ""):
        return "datasets"
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    raise DataError(f"{path}: unknown file type '{path.suffix}'; use .jsonl, .json, .parquet, .txt, "
                    "or a `datasets` directory (Dataset.save_to_disk)")


def pyarrow():
    """pyarrow, or a DataError that says how to install it."""
    try:
        import pyarrow  # noqa: PLC0415 (optional dependency, imported where used)
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("reading or writing Parquet and `datasets` directories needs pyarrow: "
                        "pip install 'rlhfkit[data]'") from None
    return pyarrow


# ----------------------------------------------------------------------------------------------------
# Reading


def read_rows(path: str | Path, split: str | None = None, tolerant: bool = False) -> Iterator[tuple[str, dict | DataError]]:
    """Yield (location, row) for every record of the file (a .txt line is the row {"prompt": line}).

    A record that cannot be read (bad JSON, not UTF-8, not an object) raises a DataError naming it; with
    `tolerant`, it is yielded in place of the row and reading goes on (`rlhfkit data check` lists them all).
    A file that cannot be read at all always raises."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    kind = container_of(path)
    if split is not None and kind != "datasets":
        raise DataError(f"{path}: a split ('{split}') can only be chosen in a `datasets` directory")
    if kind in ("parquet", "datasets"):
        table = _read_parquet(path) if kind == "parquet" else _read_dataset_dir(path, split)
        for i, row in enumerate(table.to_pylist(), start=1):
            yield f"{path}: record {i}", row
        return
    rows = _read_json(path) if kind == "json" else _read_lines(path, txt=kind == "txt")
    for where, row in rows:
        if isinstance(row, DataError) and not tolerant:
            raise row
        yield where, row


def _read_json(path: Path) -> Iterator[tuple[str, dict]]:
    text = _decode_line(path.read_bytes(), f"{path}", first=True)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        hint = " (one object per line is JSON Lines: name the file .jsonl)" if isinstance(data, dict) else ""
        raise DataError(f"{path}: a .json file must hold a list of records, got {type(data).__name__}{hint}")
    for i, obj in enumerate(data, start=1):
        where = f"{path}: record {i}"
        yield where, obj if isinstance(obj, dict) else DataError(
            f"{where}: each record must be a JSON object, got {type(obj).__name__}")


def _read_lines(path: Path, txt: bool) -> Iterator[tuple[str, dict | DataError]]:
    """JSONL (an object a line) or .txt (a prompt a line); blank lines are skipped."""
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    with path.open("rb") as f:  # bytes, decoded per line, so an encoding error can name its line
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                if txt:
                    line = _decode_line(raw, where, first=lineno == 1).rstrip("\r\n")
                    row = {"prompt": line} if line.strip() else None
                else:
                    row = parse_jsonl_line(raw, where, first=lineno == 1)
            except DataError as e:
                row = e
            if row is not None:
                yield where, row


def _read_parquet(path: Path):
    pa = pyarrow()
    try:
        return pa.parquet.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _read_dataset_dir(path: Path, split: str | None):
    """The rows of a Dataset.save_to_disk directory, or of one split of a DatasetDict directory."""
    pa = pyarrow()
    if (path / DATASET_DICT).is_file():
        splits = json.loads((path / DATASET_DICT).read_text()).get("splits", [])
        if split is None:
            if "train" not in splits and len(splits) != 1:
                raise DataError(f"{path}: a DatasetDict with splits {splits} and none named 'train'; choose one "
                                "(split=..., or --split)")
            split = "train" if "train" in splits else splits[0]
        if split not in splits:
            raise DataError(f"{path}: no split '{split}'; the splits are {splits}")
        path = path / split
    elif split is not None:
        raise DataError(f"{path}: not a DatasetDict directory (no {DATASET_DICT}), so there is no split '{split}'")
    if (path / DATASET_STATE).is_file():
        files = [path / f["filename"] for f in json.loads((path / DATASET_STATE).read_text())["_data_files"]]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(f"{path}: not a `datasets` directory (no {DATASET_STATE} or .arrow files); "
                        "save one with Dataset.save_to_disk, or give a .jsonl/.json/.parquet file")
    tables = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: not a readable Arrow file ({e})") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


# ----------------------------------------------------------------------------------------------------
# Writing (atomic)


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> int:
    """Write rows in the container the path names; a .txt file takes rows {"prompt": str}, one per line."""
    path = Path(path)
    kind = container_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "datasets":
        _write_dataset_dir(path, rows)
        return len(rows)
    if kind == "parquet":
        table = _table(path, rows)
        with _atomic_file(path, "wb") as f:
            pyarrow().parquet.write_table(table, f)
        return len(rows)
    with _atomic_file(path, "w") as f:
        if kind == "jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        elif kind == "json":
            json.dump(rows, f, ensure_ascii=False, indent=1)
            f.write("\n")
        else:  # txt
            for n, r in enumerate(rows, start=1):
                prompt = r.get("prompt")
                if set(r) != {"prompt"} or not isinstance(prompt, str) or not prompt.strip() or "\n" in prompt:
                    raise DataError(f"{path}: record {n} cannot be one line of text (a .txt file holds one text prompt "
                                    "a line, without item ids); write .jsonl instead")
                f.write(prompt + "\n")
    return len(rows)


class _atomic_file:
    """open() on a temporary file beside `path`, renamed onto it when the block ends without an error."""

    def __init__(self, path: Path, mode: str):
        self.path, self.mode = path, mode

    def __enter__(self):
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.f = os.fdopen(fd, self.mode, **({} if "b" in self.mode else {"encoding": "utf-8"}))
        return self.f

    def __exit__(self, exc_type, exc, tb):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            Path(self.tmp).unlink(missing_ok=True)


def _table(path: Path, rows: list[dict]):
    pa = pyarrow()
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError) as e:
        raise DataError(f"{path}: these records do not fit one Arrow table ({e}); a column must hold one type in every "
                        "record (e.g. all text prompts or all conversations), or write .jsonl instead") from None


def _write_dataset_dir(path: Path, rows: list[dict]) -> None:
    """A directory that datasets.load_from_disk reads: one Arrow stream file and the state that lists it."""
    pa = pyarrow()
    table = _table(path, rows)
    if path.exists() and not (path.is_dir() and ((path / DATASET_STATE).is_file() or not any(path.iterdir()))):
        raise DataError(f"{path}: exists and is not a `datasets` directory; refusing to replace it")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        name = "data-00000-of-00001.arrow"
        with pa.OSFile(str(tmp / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        state = {"_data_files": [{"filename": name}], "_fingerprint": "rlhfkit", "_format_columns": None,
                 "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
        (tmp / DATASET_STATE).write_text(json.dumps(state, indent=2))
        (tmp / "dataset_info.json").write_text("{}")
        old = None
        if path.exists():  # a directory cannot be renamed onto a non-empty one: move the old one aside first
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
