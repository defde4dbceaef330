#!/usr/bin/env bash
# The tiny end-to-end run on CPU: builds ./.venv if missing (scripts/setup_cpu.sh), builds a tiny
# Qwen2 + tokenizer + the counting task ("Count by 7 from 123, 20 terms."; the grader names each
# wrong rollout's first error) and warm-starts it by a short supervised pass (~2 min, cached under
# $OUT/assets), trains it with verl's stock trainer (python -m verl.trainer.main_ppo; vLLM-CPU
# rollouts; GRPO groups of 8; SHEAR spans of 16 tokens every 4), dumps every group's per-token
# credit, then writes $OUT/reward.png, $OUT/summary.json and $OUT/credit-shear.html, and prints the
# reward, divergence_auc and the credit page.
#
#   bash recipes/run_shear_tiny.sh                 # SHEAR (algorithm.adv_estimator=shear)
#   ADV=grpo bash recipes/run_shear_tiny.sh        # the same task with plain GRPO (same plot)
#   TASK=parity STEPS=30 bash recipes/run_shear_tiny.sh            # the quick random-init parity toy
#   STEPS=30 bash recipes/run_shear_tiny.sh trainer.save_freq=10   # extra args: hydra overrides
#   RESUME=1 STEPS=40 bash recipes/run_shear_tiny.sh               # continue from the last checkpoint
#
# Settings (environment): TASK (counting|parity), ADV (shear, the default; grpo; or a baseline of
# the README's "Baselines"), STEPS (the task's: 16 counting, 30 parity), SEED (0), OUT (outputs/tiny), SAVE_FREQ (-1: never), RESUME (0/1),
# SHEAR_VENV (./.venv). Library code: shear_verl/tiny/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SHEAR_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || bash "$ROOT/scripts/setup_cpu.sh"
args=(--task "${TASK:-counting}" --adv "${ADV:-shear}" --seed "${SEED:-0}" --out "${OUT:-$ROOT/outputs/tiny}"
      --save-freq "${SAVE_FREQ:--1}")
[ -n "${STEPS:-}" ] && args+=(--steps "$STEPS")
[ "${RESUME:-0}" = 1 ] && args+=(--resume)
exec "$VENV/bin/python" -m shear_verl.tiny "${args[@]}" -- "$@"
