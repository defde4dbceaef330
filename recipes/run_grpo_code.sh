#!/usr/bin/env bash
# The GRPO baseline twin of recipes/run_shear_code.sh: the identical run (same data, model, seeds
# and every other setting, including the environment knobs) with one knob changed,
# algorithm.adv_estimator=grpo (so SHEAR's algorithm.shear.* keys are not passed).
# Same usage: bash recipes/run_grpo_code.sh [--dry-run] [overrides ...]
set -euo pipefail
ADV_ESTIMATOR=grpo exec bash "$(dirname "${BASH_SOURCE[0]}")/run_shear_code.sh" "$@"
