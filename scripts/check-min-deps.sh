#!/usr/bin/env bash
# Check the declared minimum versions: a scratch venv (under /tmp, never in the checkout) with every lower
# bound of pyproject.toml's dependencies pinned exactly, then the fast tests against it.
#   bash scripts/check-min-deps.sh            # VENV=/path/to/venv to reuse one, PYTHON=python3.11 to choose
# torch is the exception: it gets the CPU wheel scripts/setup.sh pins (TORCH=...), since an older torch from
# PyPI would be a multi-GB CUDA build. Downloads packages, so it is a documented check, not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
VENV=${VENV:-$(mktemp -d /tmp/rlhfkit-min-deps.XXXXXX)}
FAST_TESTS=(tests/test_models.py tests/test_ops.py tests/test_config.py tests/test_report.py)

# "name>=X" -> "name==X" for every dependency but torch.
pins=$("$PYTHON" - <<'PY'
import re, tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)\s*", dep)
    if not m:
        raise SystemExit(f"pyproject.toml: {dep!r} has no plain lower bound (name>=X) to pin")
    if m.group(1) != "torch":
        print(f"{m.group(1)}=={m.group(2)}")
PY
)
echo "venv: $VENV"
echo "pins: $TORCH $(echo $pins)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH"  # first, so nothing else can pull a CUDA torch
"$VENV/bin/python" -m pip install -q $pins pytest
# rlhfkit itself without dependencies, built from a copy (no build/ in the checkout); then pip check
# fails if the pinned lower bounds contradict each other or rlhfkit's own requirements.
src=$(mktemp -d /tmp/rlhfkit-src.XXXXXX)
cp -r pyproject.toml README.md rlhfkit "$src"/
"$VENV/bin/python" -m pip install -q --no-deps "$src"
rm -rf "$src"
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|numpy|transformers|tokenizers|safetensors|tqdm|matplotlib) "
# Tests run against the checkout's code (python -m puts the working directory first on sys.path).
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${FAST_TESTS[@]}"
