#!/usr/bin/env bash
# Set up and run the default test suite (heavier tests are marked `slow`; run them with
# `.venv/bin/pytest -m slow` or through benchmarks/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 KERAS_BACKEND=torch RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
exec .venv/bin/pytest -q -m "not slow" "$@"
