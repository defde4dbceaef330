#!/usr/bin/env bash
# The tiny end-to-end run on CPU: builds ./.venv if missing (scripts/setup_cpu.sh), builds a tiny
# random-init Qwen2 + tokenizer + toy task (cached under $OUT/assets), trains it with verl's stock
# trainer (python -m verl.trainer.main_ppo; vLLM-CPU rollouts; GRPO groups of 8), then writes
# $OUT/reward.png and $OUT/summary.json.
#
#   bash recipes/run_shear_tiny.sh                 # SHEAR (algorithm.adv_estimator=shear)
#   ADV=grpo bash recipes/run_shear_tiny.sh        # the same task with plain GRPO (same plot)
#   STEPS=60 bash recipes/run_shear_tiny.sh trainer.save_freq=20   # extra args: hydra overrides
#   RESUME=1 STEPS=40 bash recipes/run_shear_tiny.sh               # continue from the last checkpoint
#
# Settings (environment): ADV (shear|grpo, default shear), STEPS (30), OUT (outputs/tiny),
# SAVE_FREQ (10), RESUME (0/1), SHEAR_VENV (./.venv). Library code: shear_verl/tiny/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SHEAR_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || bash "$ROOT/scripts/setup_cpu.sh"
args=(--adv "${ADV:-shear}" --steps "${STEPS:-30}" --out "${OUT:-$ROOT/outputs/tiny}" --save-freq "${SAVE_FREQ:-10}")
[ "${RESUME:-0}" = 1 ] && args+=(--resume)
exec "$VENV/bin/python" -m shear_verl.tiny "${args[@]}" -- "$@"
