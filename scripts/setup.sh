#!/usr/bin/env bash
# Create .venv and install forwardlearn (editable) with its test tools and the `hf` extra (fine-tuning), once;
# later runs return at once unless pyproject.toml or constraints.txt changed. torch is pinned to the CPU build
# in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('forwardlearn') is None)" 2>/dev/null; then
    exit 0
fi
echo "setting up .venv (first run only)..." >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)   # the local CPU wheel of torch, where the machine has it
.venv/bin/python -m pip install -q --disable-pip-version-check "${links[@]}" -c constraints.txt \
    torch -e ".[dev,hf]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "$want" > "$stamp"
