#!/usr/bin/env bash
# Create .venv and install the project (idempotent: skipped when pyproject.toml is unchanged).
# facenet-pytorch and opennsfw2 are installed with --no-deps: their pins (torch<2.3, numpy<2,
# tensorflow) are stale, and pyproject.toml lists what they really need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
STAMP=.venv/.curation-installed
WANT="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import curation, ray, faiss, torch" 2>/dev/null; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
.venv/bin/pip install -q --no-deps facenet-pytorch==2.6.0 opennsfw2==0.19.0
# Optional system tools used by some tests (they skip cleanly without them): Chromium renders
# the HTML report headless. Installed only where we are root and apt is available.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "bootstrap: chromium not installed; the report rendering test will be skipped" >&2
fi
echo "$WANT" > "$STAMP"
