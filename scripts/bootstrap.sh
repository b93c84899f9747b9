#!/usr/bin/env bash
# Create ./.venv (if missing) and install shardflow with the given extras.
#   usage: scripts/bootstrap.sh [EXTRAS]      (default: dev,dali)
# Idempotent: a second run only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev,dali}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
# pip is quiet but warnings about unreachable extra indexes are noise here.
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
echo "bootstrap: installing shardflow[$EXTRAS] (torch is large: the first run takes a few minutes)" >&2
.venv/bin/python -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import shard_tools, pipeline, train, benchmarks, torch" \
  || { echo "bootstrap: install failed (see pip output above)" >&2; exit 1; }
