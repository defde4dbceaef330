#!/usr/bin/env bash
# SHEAR on Eurus-RL-Code with Qwen2.5-Coder-7B: the paper's code experiment, same RL settings as
# the math run (SHEAR_SPEC.md section 3), graded by reward_fns/code.py (sandboxed test execution).
#
#   python scripts/prepare_code.py --out ~/data/shear/code        # train.parquet, val.parquet
#   bash recipes/run_shear_code.sh [--dry-run] [hydra overrides ...]
#
# Settings and dry run as in recipes/run_shear_math.sh (list in recipes/common.sh: recipe_main).
# recipes/run_grpo_code.sh is the same run with plain GRPO.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_DIR/recipes/common.sh"

TASK=code
ADV_ESTIMATOR="${ADV_ESTIMATOR:-${ADV:-shear}}"  # the one knob: ADV=grpo|entropy_adv|... (README)
MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-Coder-7B}"
DATA_DIR="${DATA_DIR:-$HOME/data/shear/code}"
REWARD_FN="${REWARD_FN:-$REPO_DIR/reward_fns/code.py}"
MAX_PROMPT_LENGTH="${MAX_PROMPT_LENGTH:-2048}"   # programming statements are longer than math problems
recipe_main "$@"
