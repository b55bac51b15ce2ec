#!/usr/bin/env bash
# Set up (first run only), then the main job: every rule compared on the bundled digits data.
# Extra arguments go to `forwardlearn compare` (e.g. ./run.sh --rules backprop,fa).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/forwardlearn compare --data digits "$@"
