#!/usr/bin/env bash
# The whole test suite: lint, then every test (CPU; Triton kernels run interpreted).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${TANGRAM_VENV:-.venv}/bin/python
"$PY" -m ruff check .
"$PY" -m pytest -rA -q "$@" tests
