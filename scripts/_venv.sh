# Sourced by scripts/*: make sure ./.venv exists with the project and its test tools installed.
# Re-installs only when pyproject.toml changed since the last install, so repeated runs are fast.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MULTISPOOL_VENV:-$ROOT/.venv}"
PY="${MULTISPOOL_PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.13 python3.12 python3.11 python3.10 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "need Python >= 3.10 on PATH" >&2; exit 2; }
stamp="$VENV/.multispool-installed"
want="$(cat "$ROOT/pyproject.toml" | (sha256sum 2>/dev/null || shasum -a 256) | cut -c1-64)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up $VENV with $PY ..." >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]" >&2
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
