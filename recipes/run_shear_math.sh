#!/usr/bin/env bash
# SHEAR on MATH with Qwen2.5-Math-7B: the paper's main experiment (SHEAR_SPEC.md section 3, App. J).
#
#   python scripts/prepare_math.py --out ~/data/shear/math        # train.parquet, val.parquet
#   bash recipes/run_shear_math.sh [--dry-run] [hydra overrides ...]
#
# Every setting is an environment variable (NNODES=2 MODEL_PATH=/models/qwen SEED=1 ...; the list
# and the paper's values are in recipes/common.sh: recipe_main); hydra overrides given on the
# command line come last and win. DRY_RUN=1 or --dry-run prints the command instead of running it.
# recipes/run_grpo_math.sh is the same run with plain GRPO. Several nodes: scripts/slurm/shear.sbatch.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_DIR/recipes/common.sh"

TASK=math
ADV_ESTIMATOR="${ADV_ESTIMATOR:-${ADV:-shear}}"  # the one knob: ADV=grpo|entropy_adv|... (README)
MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-Math-7B}"
DATA_DIR="${DATA_DIR:-$HOME/data/shear/math}"
REWARD_FN="${REWARD_FN:-$REPO_DIR/reward_fns/math.py}"
MAX_PROMPT_LENGTH="${MAX_PROMPT_LENGTH:-1024}"   # + 3072 response = Qwen2.5-Math-7B's 4096 context
# (verl filters out longer prompts: 7 of the 7,498 MATH train problems with the Qwen2.5 tokenizer)
recipe_main "$@"
