#!/usr/bin/env bash
# Set up (first run only), then lint and run the unit tests (slow training checks: ./test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
.venv/bin/ruff check src tests examples benchmarks
exec .venv/bin/python -m pytest "$@"
