#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install, lint, type-check, then every test
# (real PostgreSQL, NATS, vLLM on CPU and localstripe, all started by the tests themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh full
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== pytest"; python -m pytest "$@"
