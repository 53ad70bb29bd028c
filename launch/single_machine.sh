#!/usr/bin/env bash
# Train on all accelerators of this machine (one process). Arguments go to maejax.train, e.g.
#   launch/single_machine.sh --config configs/mae_scale.py:preset=L8 --workdir runs/l8 --config.data.dir=DATA
# SIGTERM (e.g. from a scheduler) saves a checkpoint at the next step and exits with status 75;
# running the same command again resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1; then
  source launch/gpu_flags.sh
fi
exec "${PYTHON:-.venv/bin/python}" -m maejax.train "$@"
