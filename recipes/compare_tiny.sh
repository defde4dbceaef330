#!/usr/bin/env bash
# SHEAR vs GRPO over seeds on the tiny counting task (CPU): for each seed both estimators train the
# same warm-started model; writes $OUT/compare.png (mean +- std reward curves), compare.md (table:
# steps to a reward threshold, final reward, wall time, divergence_auc) and compare.json.
#
#   SEEDS=3 bash recipes/compare_tiny.sh            # ~6 runs of ~5 min on 2 cores
#   SEEDS=5 STEPS=24 THRESHOLD=0.65 bash recipes/compare_tiny.sh
#   METHODS="grpo shear entropy_adv top_entropy" bash recipes/compare_tiny.sh   # baselines too
#
# Settings (environment): METHODS ("grpo shear"), SEEDS (3), STEPS (16), THRESHOLD (0.6), OUT (outputs/compare),
# SHEAR_VENV (./.venv). Finished runs are reused; pass --fresh to retrain. Library: shear_verl/tiny/compare.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SHEAR_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || bash "$ROOT/scripts/setup_cpu.sh"
# shellcheck disable=SC2086  # METHODS is a list of names
exec "$VENV/bin/python" -m shear_verl.tiny.compare --adv ${METHODS:-grpo shear} --seeds "${SEEDS:-3}" --steps "${STEPS:-16}" \
  --threshold "${THRESHOLD:-0.6}" --out "${OUT:-$ROOT/outputs/compare}" "$@"
