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
  # optional extras (TensorBoard output, the Lightning / Accelerate recipes): their tests skip
  # without them; gradsparse's torch==2.13.0 pin keeps the resolver from replacing torch
  .venv/bin/python -m pip install --quiet -e '.[dev,tensorboard,frameworks]' \
    || echo "setup: optional extras (tensorboard, pytorch-lightning, accelerate) not installed; their tests skip" >&2
  .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 'setup: torch is ' + torch.__version__ + ', not 2.13.0')"
  echo "$want" > "$stamp"
fi
# iproute2 (ip, tc) for benchmarks/bench_network.py; optional: skipped cleanly without root/apt
if ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing iproute2 (ip, tc) for benchmarks/bench_network.py" >&2
    (apt-get install -y -qq iproute2 >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq iproute2 >/dev/null 2>&1; }) \
      || echo "setup: iproute2 could not be installed; benchmarks/bench_network.py will skip" >&2
  else
    echo "setup: no ip/tc and no root apt-get: benchmarks/bench_network.py will skip" >&2
  fi
fi
