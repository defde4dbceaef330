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
recipe_init "$@"

ADV_ESTIMATOR="${ADV_ESTIMATOR:-shear}"
MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-Math-7B}"
DATA_DIR="${DATA_DIR:-$HOME/data/shear/math}"
TRAIN_FILES="${TRAIN_FILES:-$DATA_DIR/train.parquet}"
VAL_FILES="${VAL_FILES:-$DATA_DIR/val.parquet}"
REWARD_FN="${REWARD_FN:-$REPO_DIR/reward_fns/math.py}"
MAX_PROMPT_LENGTH="${MAX_PROMPT_LENGTH:-1024}"   # + 3072 response = Qwen2.5-Math-7B's 4096 context
NNODES="${NNODES:-1}"
N_GPUS_PER_NODE="${N_GPUS_PER_NODE:-8}"
SEED="${SEED:-42}"
# Paper (App. J), as in recipes/common.sh: recipe_main.
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-512}"
PPO_MINI_BATCH_SIZE="${PPO_MINI_BATCH_SIZE:-32}"
ROLLOUT_N="${ROLLOUT_N:-8}"
LR="${LR:-1e-6}"
CLIP_RATIO_LOW="${CLIP_RATIO_LOW:-0.2}"
CLIP_RATIO_HIGH="${CLIP_RATIO_HIGH:-0.28}"
LOSS_AGG_MODE="${LOSS_AGG_MODE:-token-mean}"
MAX_RESPONSE_LENGTH="${MAX_RESPONSE_LENGTH:-3072}"
TEMPERATURE="${TEMPERATURE:-1.0}"
TOP_P="${TOP_P:-1.0}"
VAL_TEMPERATURE="${VAL_TEMPERATURE:-0.1}"
VAL_TOP_P="${VAL_TOP_P:-1.0}"
VAL_N="${VAL_N:-1}"
KL_COEF="${KL_COEF:-0}"
ENTROPY_COEFF="${ENTROPY_COEFF:-0}"
TOTAL_TRAINING_STEPS="${TOTAL_TRAINING_STEPS:-300}"
TOTAL_EPOCHS="${TOTAL_EPOCHS:-100}"
TEST_FREQ="${TEST_FREQ:-5}"
SAVE_FREQ="${SAVE_FREQ:-25}"
# Megatron parallelism and throughput (not from the paper).
TP="${TP:-2}"
PP="${PP:-1}"
VPP="${VPP:-null}"
CP="${CP:-1}"
ROLLOUT_TP="${ROLLOUT_TP:-2}"
GPU_MEMORY_UTILIZATION="${GPU_MEMORY_UTILIZATION:-0.6}"
PPO_MAX_TOKEN_LEN_PER_GPU="${PPO_MAX_TOKEN_LEN_PER_GPU:-16384}"
PARAM_OFFLOAD="${PARAM_OFFLOAD:-False}"
OPTIMIZER_OFFLOAD="${OPTIMIZER_OFFLOAD:-False}"
PROJECT_NAME="${PROJECT_NAME:-shear-verl}"
MODEL_TAG="$(basename "$MODEL_PATH" | tr '[:upper:]' '[:lower:]')"
EXPERIMENT_NAME="${EXPERIMENT_NAME:-${MODEL_TAG}-math-${ADV_ESTIMATOR}-megatron-tp${TP}pp${PP}cp${CP}-seed${SEED}}"
OUTPUT_ROOT="${OUTPUT_ROOT:-$HOME/shear_runs}"
OUTPUT_DIR="${OUTPUT_DIR:-$OUTPUT_ROOT/$PROJECT_NAME/$EXPERIMENT_NAME}"
LOGGER="${LOGGER:-[\"console\",\"file\"]}"
# verl's file logger truncates its file at start: one metrics file per launch (see common.sh).
RUN_STAMP="${RUN_STAMP:-$(date +%Y%m%d-%H%M%S)}"
METRICS_FILE="${METRICS_FILE:-$OUTPUT_DIR/metrics-$RUN_STAMP.jsonl}"
PYTHON="${PYTHON:-python3}"
shear_args
[ "$RECIPE_DRY_RUN" = 1 ] || mkdir -p "$(dirname "$METRICS_FILE")"

recipe_launch "$PYTHON" -m verl.trainer.main_ppo \
  model_engine=megatron \
  algorithm.adv_estimator="$ADV_ESTIMATOR" \
  "${SHEAR_ARGS[@]}" \
  algorithm.use_kl_in_reward=False \
  algorithm.kl_ctrl.kl_coef="$KL_COEF" \
  data.train_files="$TRAIN_FILES" \
  data.val_files="$VAL_FILES" \
  data.train_batch_size="$TRAIN_BATCH_SIZE" \
  data.max_prompt_length="$MAX_PROMPT_LENGTH" \
  data.max_response_length="$MAX_RESPONSE_LENGTH" \
  data.filter_overlong_prompts=True \
  data.truncation=error \
  data.seed="$SEED" \
  actor_rollout_ref.model.path="$MODEL_PATH" \
  actor_rollout_ref.actor.optim.lr="$LR" \
  actor_rollout_ref.actor.ppo_mini_batch_size="$PPO_MINI_BATCH_SIZE" \
  actor_rollout_ref.actor.use_dynamic_bsz=True \
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu="$PPO_MAX_TOKEN_LEN_PER_GPU" \
  actor_rollout_ref.actor.clip_ratio_low="$CLIP_RATIO_LOW" \
  actor_rollout_ref.actor.clip_ratio_high="$CLIP_RATIO_HIGH" \
  actor_rollout_ref.actor.loss_agg_mode="$LOSS_AGG_MODE" \
  actor_rollout_ref.actor.use_kl_loss=False \
  actor_rollout_ref.actor.kl_loss_coef="$KL_COEF" \
  actor_rollout_ref.actor.entropy_coeff="$ENTROPY_COEFF" \
  actor_rollout_ref.actor.megatron.tensor_model_parallel_size="$TP" \
  actor_rollout_ref.actor.megatron.sequence_parallel=True \
  actor_rollout_ref.actor.megatron.pipeline_model_parallel_size="$PP" \
  actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size="$VPP" \
  actor_rollout_ref.actor.megatron.context_parallel_size="$CP" \
  actor_rollout_ref.actor.megatron.dynamic_context_parallel=False \
  actor_rollout_ref.actor.megatron.use_remove_padding=True \
  actor_rollout_ref.actor.megatron.param_offload="$PARAM_OFFLOAD" \
  actor_rollout_ref.actor.megatron.optimizer_offload="$OPTIMIZER_OFFLOAD" \
  actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full \
  actor_rollout_ref.actor.megatron.override_transformer_config.recompute_method=uniform \
  actor_rollout_ref.actor.megatron.override_transformer_config.recompute_num_layers=1 \
  actor_rollout_ref.actor.checkpoint.save_contents='["model","optimizer","extra","hf_model"]' \
  actor_rollout_ref.actor.checkpoint.load_contents='["model","optimizer","extra"]' \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.n="$ROLLOUT_N" \
  actor_rollout_ref.rollout.temperature="$TEMPERATURE" \
  actor_rollout_ref.rollout.top_p="$TOP_P" \
  actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP" \
  actor_rollout_ref.rollout.gpu_memory_utilization="$GPU_MEMORY_UTILIZATION" \
  actor_rollout_ref.rollout.val_kwargs.temperature="$VAL_TEMPERATURE" \
  actor_rollout_ref.rollout.val_kwargs.top_p="$VAL_TOP_P" \
  actor_rollout_ref.rollout.val_kwargs.n="$VAL_N" \
  actor_rollout_ref.rollout.val_kwargs.do_sample=True \
  reward.custom_reward_function.path="$REWARD_FN" \
  reward.custom_reward_function.name=compute_score \
  trainer.nnodes="$NNODES" \
  trainer.n_gpus_per_node="$N_GPUS_PER_NODE" \
  trainer.total_training_steps="$TOTAL_TRAINING_STEPS" \
  trainer.total_epochs="$TOTAL_EPOCHS" \
  trainer.test_freq="$TEST_FREQ" \
  trainer.save_freq="$SAVE_FREQ" \
  trainer.val_before_train=True \
  trainer.project_name="$PROJECT_NAME" \
  trainer.experiment_name="$EXPERIMENT_NAME" \
  trainer.logger="$LOGGER" \
  trainer.default_local_dir="$OUTPUT_DIR/checkpoints" \
  +ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="$METRICS_FILE" \
  "${RECIPE_EXTRA_ARGS[@]}"
