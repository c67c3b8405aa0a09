#!/usr/bin/env bash
# Set up, then run the embedded default: paper 003's toy on three topologies and a digits MLP.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/gradsparse demo --out "${1:-runs/demo}"
