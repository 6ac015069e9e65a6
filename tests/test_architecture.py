"""The house: imports run one way through the layers (docs/architecture.md), with no circle, and `import rlhfkit`
stays light. A new method is one file plus one registration line.

The layering itself is import-linter's contracts in pyproject.toml; this test runs `lint-imports` so that CI
fails on a broken contract, and checks what import-linter does not: no import circle anywhere (inside a layer
too), and no function-local import of rlhfkit used to dodge one.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhfkit"
BIN = Path(sys.executable).parent

# Where a function-local import of rlhfkit is allowed, and why: the CLI and the package's lazy exports import the
# pipeline (and so torch) only when a command runs, so `rlhfkit --help` and `import rlhfkit` stay light; the
# labeling app imports the sampler (torch) only where it samples, so serving labels needs no torch.
LAZY_ALLOWED = {"__init__.py", "cli.py", "labelapp"}


def test_lint_imports_keeps_every_contract():
    lint = BIN / "lint-imports"
    assert lint.is_file(), "import-linter is a dev dependency (pyproject.toml): bash scripts/setup.sh dev"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def _import_graph():
    import grimp

    return grimp.build_graph("rlhfkit", exclude_type_checking_imports=True)


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import circles."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in graph.modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return out


def test_no_import_circle():
    assert _cycles(_import_graph()) == []


def test_the_circle_finder_finds_a_circle():
    """The check above is not vacuous: a graph with a circle has one."""
    import grimp

    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def _function_local_rlhfkit_imports(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("rlhfkit"):
                    lines.append(sub.lineno)
                if isinstance(sub, ast.Import) and any(a.name.startswith("rlhfkit") for a in sub.names):
                    lines.append(sub.lineno)
    return lines


def test_function_local_imports_only_where_lightness_needs_them():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if str(rel) in LAZY_ALLOWED or rel.parts[0] in LAZY_ALLOWED:
            continue
        found += [f"{rel}:{line}" for line in _function_local_rlhfkit_imports(path)]
    assert found == [], "move these imports to the top of their modules (a function-local import is for a heavy " \
                        f"optional dependency, never a way around a circle): {found}"


def _modules_loaded(code: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_import_rlhfkit_and_help_do_not_import_torch():
    assert "torch" not in _modules_loaded("import rlhfkit")
    loaded = _modules_loaded(textwrap.dedent("""
        import contextlib, io
        from rlhfkit.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["--help"])
            except SystemExit:
                pass
        assert "rejection_sampling" in out.getvalue() and "grpo" in out.getvalue(), out.getvalue()
    """))
    assert "torch" not in loaded and "transformers" not in loaded
    assert "rlhfkit.cli" in loaded  # the check ran what it claims to


TOY_METHOD = '''
"""A toy method, for tests/test_architecture.py: its file and its registration line are all it takes."""
from dataclasses import dataclass

from rlhfkit.algorithms import Method
from rlhfkit.core.config import F


@dataclass
class ToyConfig:
    """[toy] A toy method."""

    knob: int = F(3, "A knob that must be odd.")

    def validate(self, cfg, checks) -> None:
        checks.need(self.knob % 2 == 1, "toy.knob", "must be odd")


METHOD = Method("toy", ToyConfig, ("sft",), (("toy curve", ("objective/scores",)),))


def run(cfg, task, out, stage_dir, rt) -> dict:
    return {"knob": cfg.toy.knob}
'''


def test_a_new_method_is_one_file_and_one_registration_line(tmp_path):
    """A method file in rlhfkit/algorithms/ and its line in REGISTRY: its config section (with its validation),
    the CLI subcommand, `rlhfkit config`, the pipeline's stages and its stage all follow."""
    (tmp_path / "toy.py").write_text(TOY_METHOD)
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        import rlhfkit.algorithms as algorithms
        algorithms.__path__.append({str(tmp_path)!r})  # as if toy.py were in rlhfkit/algorithms/
        algorithms.REGISTRY["toy"] = "a toy method"      # the registration line

        from rlhfkit.cli import main
        from rlhfkit.core.errors import ConfigError
        from rlhfkit.pipeline.config import load_config
        from rlhfkit.pipeline.stages import STAGES, pipeline_stages, stage_inputs

        cfg = load_config(overrides=["method='toy'", "toy.knob=5"])
        assert cfg.toy.knob == 5 and "toy" in STAGES
        assert pipeline_stages(cfg) == ["sft", "toy", "eval"], pipeline_stages(cfg)
        assert stage_inputs("toy", cfg)["toy"] == {{"knob": 5}}
        try:
            load_config(overrides=["toy.knob=4"])
            raise SystemExit("an even knob was accepted")
        except ConfigError as e:
            assert "toy.knob = 4: must be odd" in str(e), e
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["config", "--set", "method='toy'"]) == 0
        assert "[toy]" in out.getvalue() and "knob = 3  # A knob that must be odd." in out.getvalue()
        with contextlib.redirect_stdout(out):
            try:
                main(["--help"])
            except SystemExit:
                pass
        assert "a toy method" in out.getvalue()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.parametrize("folder", ["core", "ops", "data", "models", "spine", "algorithms", "tasks", "feedback",
                                    "evaluation", "labelapp", "pipeline"])
def test_each_layer_says_what_it_may_import(folder):
    doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text())) or ""
    assert "May import" in doc, f"rlhfkit/{folder}/__init__.py: say which layers it may import (docs/architecture.md)"
