#!/usr/bin/env bash
# SHEAR on MATH with Qwen2.5-Math-7B on verl's Megatron engine (model_engine=megatron): the same
# run as recipes/run_shear_math.sh (the paper's settings, the same SHEAR knobs) with Megatron
# parallelism instead of FSDP. For 14B-70B models set MODEL_PATH and the parallel sizes.
#
#   python scripts/prepare_math.py --out ~/data/shear/math
#   TP=4 PP=2 CP=1 bash recipes/run_shear_math_megatron.sh [--dry-run] [hydra overrides ...]
#
# Parallelism knobs: TP (tensor, with sequence parallelism), PP (pipeline), VPP (virtual pipeline
# stages per rank, default none), CP (static context parallelism; dynamic CP is not supported by
# SHEAR and refused at start-up). Every other knob is the FSDP recipe's (recipes/common.sh); the
# SHEAR capture needs megatron-core >=0.16,<0.18. Hydra overrides on the command line come last and win.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_DIR/recipes/common.sh"

ENGINE=megatron
TASK=math
ADV_ESTIMATOR="${ADV_ESTIMATOR:-${ADV:-shear}}"
MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-Math-7B}"
DATA_DIR="${DATA_DIR:-$HOME/data/shear/math}"
REWARD_FN="${REWARD_FN:-$REPO_DIR/reward_fns/math.py}"
MAX_PROMPT_LENGTH="${MAX_PROMPT_LENGTH:-1024}"   # + 3072 response = Qwen2.5-Math-7B's 4096 context
TP="${TP:-2}"
PP="${PP:-1}"
VPP="${VPP:-null}"
CP="${CP:-1}"
ROLLOUT_TP="${ROLLOUT_TP:-2}"
MODEL_TAG="$(basename "$MODEL_PATH" | tr '[:upper:]' '[:lower:]')"
EXPERIMENT_NAME="${EXPERIMENT_NAME:-${MODEL_TAG}-math-${ADV_ESTIMATOR}-megatron-tp${TP}pp${PP}cp${CP}-seed${SEED:-42}}"
recipe_main "$@"
