"""Print the README's config reference table from the config dataclasses (their defaults and help), or with
--write replace the table in README.md. tests/test_config.py checks the README's table equals this output.

    .venv/bin/python scripts/config-reference.py [--write]
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADER = "| field | default | meaning |\n|---|---|---|\n"


def reference_table() -> str:
    from rlhfkit.core.config import toml_value
    from rlhfkit.pipeline.config import Config
    from rlhfkit.tasks import get_task

    cfg = Config()
    task = Config().task
    overrides = get_task(task).default_overrides()  # what the default task sets: what `rlhfkit config` prints

    def default(section: str, name: str, value) -> str:
        if name in overrides.get(section, {}):
            return f"`{toml_value(value)}` (task '{task}': `{toml_value(overrides[section][name])}`)"
        return f"`{toml_value(value)}`"

    rows = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if hasattr(value, "__dataclass_fields__"):
            doc = (type(value).__doc__ or "").strip().split("\n")[0]
            rows.append(f"| **[{f.name}]** | | {doc.split('] ', 1)[-1]} |")
            rows += [f"| `{f.name}.{sf.name}` | {default(f.name, sf.name, getattr(value, sf.name))} | {sf.metadata['help']} |"
                     for sf in fields(value)]
        else:
            rows.append(f"| `{f.name}` | `{toml_value(value)}` | {f.metadata['help']} |")
    return HEADER + "\n".join(rows) + "\n"


def readme_table(text: str) -> tuple[int, int]:
    """(start, end) of the table under '## Config reference'."""
    section = text.index("## Config reference")
    start = text.index(HEADER, section)
    end = start + len(HEADER)
    while end < len(text) and text.startswith("|", end):
        end = text.index("\n", end) + 1
    return start, end


def main() -> int:
    table = reference_table()
    if "--write" in sys.argv:
        readme = ROOT / "README.md"
        text = readme.read_text()
        start, end = readme_table(text)
        readme.write_text(text[:start] + table + text[end:])
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
