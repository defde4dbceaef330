#!/usr/bin/env bash
# The test suite, from a fresh machine: builds the environment, then runs pytest.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_cpu.sh
VENV="${SHEAR_VENV:-$ROOT/.venv}"
set +e
"$VENV/bin/python" -m pytest tests -q --durations=20 "$@"  # the slowest tests: the CI time budget
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests -- failing on purpose" >&2
  exit 1
fi
exit "$rc"
