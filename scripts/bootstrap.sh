#!/usr/bin/env bash
# Create ./.venv (if missing) and install shardflow with the given extras.
#   usage: scripts/bootstrap.sh [EXTRAS]      (default: dev,dali)
# Idempotent: a second run only installs what changed. Any install error ends
# the script with a non-zero status; with the dali extra, DALI must import.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev,dali}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi

# pip, quietly: its warnings about unreachable extra indexes are noise here,
# but a failure prints everything it said and stops the bootstrap.
pip_install() {
  local log status=0
  log=$(mktemp)
  .venv/bin/python -m pip install -q "$@" >"$log" 2>&1 || status=$?
  grep -v '^WARNING: Location' "$log" >&2 || true
  rm -f "$log"
  if [ "$status" -ne 0 ]; then
    echo "bootstrap: 'pip install $*' failed (exit $status); see the pip output above" >&2
    exit 1
  fi
}

pip_install --upgrade pip
echo "bootstrap: installing shardflow[$EXTRAS] (torch is large: the first run takes a few minutes)" >&2
pip_install -e ".[$EXTRAS]"
.venv/bin/python -c "import shard_tools, pipeline, train, benchmarks, torch" \
  || { echo "bootstrap: install failed: the packages do not import (see above)" >&2; exit 1; }
case ",$EXTRAS," in
  *,dali,*)
    .venv/bin/python -c "import nvidia.dali" \
      || { echo "bootstrap: the dali extra was asked for but nvidia.dali does not import" >&2; exit 1; }
    ;;
esac
