#!/usr/bin/env bash
# Set up and run `curate demo`: a generated crawl served on 127.0.0.1, curated end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/curate demo --out "${1:-demo-run}"
