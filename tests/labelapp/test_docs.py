"""Meta-tests (datasette style): the documentation keeps up with the commands, options, API and settings."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from rlhfkit.labelapp.cli import build_parser
from rlhfkit.labelapp.project import ProjectSettings

DOC = (Path(__file__).resolve().parents[2] / "docs" / "labeling.md").read_text()


def test_every_command_and_option_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, cmd in sub.choices.items():
        assert f"`{name} " in DOC or f"`{name}`" in DOC, f"command {name} missing from docs/labeling.md"
        for action in cmd._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert opt in DOC, f"option {name} {opt} missing from docs/labeling.md"


def test_every_api_route_is_documented(app):
    for route in app.routes:
        path = getattr(route, "path", "")
        if path.startswith("/api/"):
            for method in route.methods - {"HEAD"}:
                assert f"`{method} {path}`" in DOC, f"{method} {path} missing from docs/labeling.md"


def test_every_setting_is_documented():
    names = {"criteria": "--criteria", "k": "--k", "overlap": "--overlap", "ask_strength": "--strength",
             "guidelines": "--guidelines", "name": "--name", "lease_seconds": "--lease-minutes", "mode": "--mode"}
    for f in dataclasses.fields(ProjectSettings):
        assert f.name in names, f"ProjectSettings.{f.name}: add it to this test and to docs/labeling.md"
        assert names[f.name] in DOC
    assert re.search(r"Borda", DOC) and "pairwise majority" in DOC  # the consensus rules are written down
