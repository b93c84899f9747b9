#!/usr/bin/env bash
# The test command: bootstrap, lint, then the whole test suite (CPU only;
# S3 tests start a real SeaweedFS server on 127.0.0.1; GPU tests skip).
#   usage: scripts/test.sh [PYTEST ARGS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev,dali
echo "== ruff" >&2
.venv/bin/ruff format --check .
.venv/bin/ruff check .
echo "== pytest" >&2
# The dali extra was installed: a DALI that does not import fails the run (tests/conftest.py).
SHARDFLOW_REQUIRE_DALI=1 exec .venv/bin/python -m pytest "$@"
