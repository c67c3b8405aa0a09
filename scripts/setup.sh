#!/usr/bin/env bash
# Create .venv (if needed) and install gradsparse with its test dependencies.
# torch is pinned to 2.13.0 (the CPU build lies on the machines' disk; installing it first keeps
# pip from resolving a different torch build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.gradsparse-installed
want=$( (cat pyproject.toml; [ -f setup.py ] && cat setup.py || true) | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing torch==2.13.0 and gradsparse into .venv" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet torch==2.13.0
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  echo "$want" > "$stamp"
fi
