#!/usr/bin/env bash
# Set everything up (test tools, the labeling app, a headless browser), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,app
if [ -f scripts/install-browser.sh ]; then bash scripts/install-browser.sh; fi
exec .venv/bin/python -m pytest -q "$@"
