#!/usr/bin/env bash
# README's first command: set up ./.venv (once) and run the main job on the synthetic screen.
#   bash launch/demo.sh [--workdir runs/demo] [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m launch.demo "$@"
