# Creates ./.venv: this checkout installed editable (the maejax-* commands), the pinned stack of
# requirements.txt, the test runner and EFAAR's tables (README "Installation"). Idempotent: re-installs only
# when pyproject.toml or requirements*.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat pyproject.toml requirements.txt requirements-dev.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # First, and without its dependencies (the lock below provides them): a Python outside pyproject.toml's
  # requires-python stops here, with pip's one line naming both.
  .venv/bin/python -m pip install --quiet --quiet --no-deps -e .   # -qq: not setuptools' editable-install notice
  .venv/bin/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
  .venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
  echo "$want" > "$stamp"
fi
