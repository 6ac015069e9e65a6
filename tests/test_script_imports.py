"""Every `from rlhfkit... import NAME` and `import rlhfkit...` written in the scripts beside the package (benchmarks/,
examples/, scripts/) still resolves, including those inside code the scripts run in a subprocess from a string.
Nothing else in CI runs most of these scripts, so a module moved in the package would break them unseen (as
benchmarks/lora_memory.py was broken by the one-way-house move)."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for d in ("benchmarks", "examples", "scripts") for p in (ROOT / d).glob("*.py"))
FROM = re.compile(r"^\s*from (rlhfkit(?:\.\w+)*) import (\([^)]*\)|[\w, ]+)", re.M)
PLAIN = re.compile(r"^\s*import (rlhfkit(?:\.\w+)*)", re.M)


def imports(text: str) -> list[tuple[str, str | None]]:
    """(module, name) for each `from module import name` (an `as` alias dropped), (module, None) for each
    `import module`."""
    found = [(m, None) for m in PLAIN.findall(text)]
    for module, names in FROM.findall(text):
        names = re.sub(r"\s+as\s+\w+", "", names)
        found += [(module, name) for name in re.split(r"[\s,()]+", names) if name]
    return found


def test_the_scan_finds_imports_in_code_and_in_strings():
    text = 'import rlhfkit.models\nSTAGE = """\nfrom rlhfkit.pipeline.config import load_config\n"""\n' \
           "    from rlhfkit.data.batching import (\n        pad_left as left,\n        pad_right,\n    )\n"
    assert imports(text) == [("rlhfkit.models", None), ("rlhfkit.pipeline.config", "load_config"),
                             ("rlhfkit.data.batching", "pad_left"), ("rlhfkit.data.batching", "pad_right")]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_scripts_rlhfkit_imports_resolve(script):
    for module, name in imports(script.read_text()):
        loaded = importlib.import_module(module)  # ModuleNotFoundError names the moved module
        if name is not None and not hasattr(loaded, name):
            importlib.import_module(f"{module}.{name}")  # a submodule imported by name
