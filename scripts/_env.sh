# Shared set-up for scripts/run-hub.sh and scripts/run-tests.sh: a virtual environment
# with the pinned requirements and the project itself installed in editable mode (so that
# `taskhub` imports from any folder), reinstalled only when requirements.txt or
# pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  # requirements.txt pins the dependencies: install the project alone, resolving nothing
  # (and without setuptools' notice that an editable install is one).
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet --no-deps --editable .
  echo "$want" > "$stamp"
fi
