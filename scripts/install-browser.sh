#!/usr/bin/env bash
# Install what the labeling app's browser test needs, idempotently:
#   - Debian's Chromium at /usr/bin/chromium (Playwright drives this system browser; we never run
#     `playwright install`, which downloads a browser build of its own)
#   - the Python side: the `app` and `dev` extras (fastapi, uvicorn, ..., playwright, schemathesis)
# Usage: scripts/install-browser.sh            (PYTHON=path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
/usr/bin/chromium --version 2>/dev/null | head -n 1 || true

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import playwright.sync_api, fastapi, uvicorn, jinja2, multipart, markdown_it, schemathesis, httpx" 2>/dev/null; then
  "$PYTHON" -m pip install -q -e ".[app,dev]"
fi
"$PYTHON" -c "import playwright; print('playwright for python', __import__('importlib.metadata').metadata.version('playwright'))"
