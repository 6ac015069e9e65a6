#!/usr/bin/env bash
# Set everything up, then run the built-in pipeline (arguments go to `rlhfkit run`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rlhfkit run "$@"
