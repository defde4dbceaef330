# shellcheck shell=bash
# Shared by the recipes/run_*.sh scripts (sourced, never run). The recipes stay thin: each one
# lists its verl settings; this file holds the dry-run switch, the SHEAR knobs and the launcher.

# recipe_init "$@": split the recipe's own flag (--dry-run) from the hydra overrides.
# Sets RECIPE_DRY_RUN (0/1; DRY_RUN=1 in the environment does the same) and RECIPE_EXTRA_ARGS.
recipe_init() {
  RECIPE_DRY_RUN="${DRY_RUN:-0}"
  RECIPE_EXTRA_ARGS=()
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) RECIPE_DRY_RUN=1 ;;
      *) RECIPE_EXTRA_ARGS+=("$arg") ;;
    esac
  done
}

# shear_args: the `algorithm.shear.*` overrides, from SHEAR_* environment variables.
# verl's stock config has no `algorithm.shear` node, hence the `+` (append) prefix.
# Defaults: the paper's spans (w=100, s=25, Sinkhorn, max pooling, group n_bar normalisation).
# epsilon: the paper's value is eps ~= 4.5 in raw hidden-state units of Qwen2.5-Math-7B (it prints
# only eps*log(100) ~= 20.8); this project's default is eps = 0.05 in units of the group's mean
# hidden-state norm (SHEAR_SPEC section 4), which does not depend on the model's scale. For the
# literal paper value: SHEAR_EPSILON_MODE=absolute SHEAR_EPSILON=4.5.
# The remaining engine knobs are passed only when set, else the engine's defaults apply.
shear_args() {
  SHEAR_ARGS=(
    "+algorithm.shear.span_len=${SHEAR_SPAN_LEN:-100}"
    "+algorithm.shear.stride=${SHEAR_STRIDE:-25}"
    "+algorithm.shear.metric=${SHEAR_METRIC:-sinkhorn}"
    "+algorithm.shear.epsilon_mode=${SHEAR_EPSILON_MODE:-relative}"
    "+algorithm.shear.epsilon=${SHEAR_EPSILON:-0.05}"
    "+algorithm.shear.normalization=${SHEAR_NORMALIZATION:-group}"
    "+algorithm.shear.pooling=${SHEAR_POOLING:-max}"
    "+algorithm.shear.correct_threshold=${SHEAR_CORRECT_THRESHOLD:-0.5}"
  )
  local knob var
  for knob in tol max_iter prune memory_budget_mb compute_dtype offload_to_cpu; do
    var="SHEAR_${knob^^}"
    if [ -n "${!var:-}" ]; then
      SHEAR_ARGS+=("+algorithm.shear.${knob}=${!var}")
    fi
  done
}

# recipe_launch CMD...: run CMD, or with --dry-run / DRY_RUN=1 print it and return: the program
# and its leading options on the first line, then one override per line, shell-quoted, so the
# output pastes back into a shell.
recipe_launch() {
  if [ "$RECIPE_DRY_RUN" = 1 ]; then
    local arg head=1
    printf '%q' "$1"
    shift
    for arg in "$@"; do
      if [ "$head" = 1 ] && [[ "$arg" != *=* ]]; then
        printf ' %q' "$arg"
      else
        head=0
        printf ' \\\n    %q' "$arg"
      fi
    done
    printf '\n'
    return 0
  fi
  exec "$@"
}

# prm_args: the process reward model the PRM baselines (pure, prm_reshape) take their step scores
# from, served by verl's own reward model (reward.reward_model.*: vLLM pooling servers behind verl's
# reward router) on a resource pool of its own, PRM_NNODES x PRM_N_GPUS_PER_NODE GPUs besides the
# trainer's, one vLLM replica per PRM_TP GPUs; verl's reward loop runs PRMRewardManager
# (shear_verl/baselines/prm_reward.py), which posts every rollout's steps to it. Default PRM: the
# paper's Qwen2.5-Math-PRM-7B (its <extra_0> separator). Optional: PRM_MAX_MODEL_LEN, PRM_TIMEOUT_S
# (seconds per request, default 600), PRM_STEP_TAG_ID (the separator's id: the server returns the
# separators' rows only).
prm_args() {
  local rm=reward.reward_model
  PRM_ARGS=(
    "$rm.enable=True"
    "$rm.enable_resource_pool=True"
    "$rm.model_path=${PRM_PATH:-Qwen/Qwen2.5-Math-PRM-7B}"
    "$rm.nnodes=${PRM_NNODES:-1}"
    "$rm.n_gpus_per_node=${PRM_N_GPUS_PER_NODE:-8}"
    "$rm.rollout.name=vllm"
    "$rm.rollout.dtype=${PRM_DTYPE:-bfloat16}"
    "$rm.rollout.tensor_model_parallel_size=${PRM_TP:-1}"
    "$rm.rollout.gpu_memory_utilization=${PRM_GPU_MEMORY_UTILIZATION:-0.8}"
    reward.reward_manager.source=importlib
    "reward.reward_manager.module.path=$REPO_DIR/shear_verl/baselines/prm_reward.py"
    reward.reward_manager.name=PRMRewardManager
  )
  if [ -n "${PRM_MAX_MODEL_LEN:-}" ]; then
    PRM_ARGS+=("$rm.rollout.max_model_len=${PRM_MAX_MODEL_LEN}")
  fi
  if [ -n "${PRM_TIMEOUT_S:-}" ]; then
    PRM_ARGS+=("+reward.reward_kwargs.prm_timeout_s=${PRM_TIMEOUT_S}")
  fi
  if [ -n "${PRM_STEP_TAG_ID:-}" ]; then
    PRM_ARGS+=("+$rm.rollout.engine_kwargs.vllm.pooler_config={step_tag_id:${PRM_STEP_TAG_ID}}")
  fi
}

# method_args: the active method's `algorithm.<name>.*` overrides, by ADV_ESTIMATOR. SHEAR's come
# from the SHEAR_* environment (shear_args); every baseline (README, "Baselines") runs at its
# paper's defaults, changed by hydra overrides on the command line (+algorithm.<name>.<key>=...).
# Only the active method's keys are passed: the trainer refuses another method's non-default keys
# at start-up, so a SHEAR_* knob left in the environment cannot break the GRPO twin.
# The PRM baselines also get their process reward model (prm_args).
# HIDDEN_ALIGN_COEF (unset: off) adds Hidden-Align's auxiliary loss to any method.
method_args() {
  METHOD_ARGS=()
  if [ "$ADV_ESTIMATOR" = shear ]; then
    shear_args
    METHOD_ARGS=("${SHEAR_ARGS[@]}")
  fi
  case "$ADV_ESTIMATOR" in
    pure|prm_reshape) prm_args; METHOD_ARGS+=("${PRM_ARGS[@]}") ;;
  esac
  if [ -n "${HIDDEN_ALIGN_COEF:-}" ]; then
    METHOD_ARGS+=("+actor_rollout_ref.actor.hidden_align.coef=${HIDDEN_ALIGN_COEF}")
  fi
}

# engine_args: the actor-engine settings, by ENGINE (fsdp, the default, or megatron). Everything
# else in recipe_main is engine-independent, so the two backends run the same experiment.
engine_args() {
  case "${ENGINE:-fsdp}" in
    fsdp)
      ENGINE_ARGS=(
        actor_rollout_ref.model.use_remove_padding=True
        actor_rollout_ref.model.enable_gradient_checkpointing=True
        actor_rollout_ref.actor.ulysses_sequence_parallel_size="$SP_SIZE"
        actor_rollout_ref.actor.fsdp_config.param_offload="$PARAM_OFFLOAD"
        actor_rollout_ref.actor.fsdp_config.optimizer_offload="$OPTIMIZER_OFFLOAD"
      ) ;;
    megatron)
      # TP (with sequence parallelism), PP, VPP (virtual stages per rank; null: none), CP (static).
      ENGINE_ARGS=(
        model_engine=megatron
        actor_rollout_ref.actor.megatron.tensor_model_parallel_size="$TP"
        actor_rollout_ref.actor.megatron.sequence_parallel=True
        actor_rollout_ref.actor.megatron.pipeline_model_parallel_size="$PP"
        actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size="$VPP"
        actor_rollout_ref.actor.megatron.context_parallel_size="$CP"
        actor_rollout_ref.actor.megatron.dynamic_context_parallel=False
        actor_rollout_ref.actor.megatron.use_remove_padding=True
        actor_rollout_ref.actor.megatron.param_offload="$PARAM_OFFLOAD"
        actor_rollout_ref.actor.megatron.optimizer_offload="$OPTIMIZER_OFFLOAD"
        actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full
        actor_rollout_ref.actor.megatron.override_transformer_config.recompute_method=uniform
        actor_rollout_ref.actor.megatron.override_transformer_config.recompute_num_layers=1
      ) ;;
    *) echo "ENGINE=${ENGINE} is not supported: use fsdp or megatron" >&2; return 2 ;;
  esac
}

# recipe_main "$@": the paper's RL run (SHEAR_SPEC.md section 3, App. J) on verl's stock trainer.
# The calling recipe sets TASK, MODEL_PATH, DATA_DIR, REWARD_FN, MAX_PROMPT_LENGTH and
# ADV_ESTIMATOR (the method: shear, grpo or a baseline); every other setting is an environment
# variable with the paper's value (or, for throughput settings the paper does not give, a sensible
# one for 8 x 80 GB GPUs per node).
# Hydra overrides on the command line come last and win.
recipe_main() {
  recipe_init "$@"
  : "${TASK:?}" "${MODEL_PATH:?}" "${DATA_DIR:?}" "${REWARD_FN:?}" "${MAX_PROMPT_LENGTH:?}" "${ADV_ESTIMATOR:?}"
  TRAIN_FILES="${TRAIN_FILES:-$DATA_DIR/train.parquet}"
  VAL_FILES="${VAL_FILES:-$DATA_DIR/val.parquet}"  # each benchmark repeated avg@k times
  NNODES="${NNODES:-1}"
  N_GPUS_PER_NODE="${N_GPUS_PER_NODE:-8}"
  SEED="${SEED:-42}"
  # Paper (App. J): 512 prompts x 8 rollouts, mini-batch 32 prompts, lr 1e-6, clip [0.2, 0.28],
  # max response 3k, temperature 1.0 (eval 0.1, top-p 1.0), no KL, no entropy bonus, ~300 steps,
  # validation every 5 steps.
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
  TOTAL_EPOCHS="${TOTAL_EPOCHS:-100}"              # an upper bound: TOTAL_TRAINING_STEPS stops first
  TEST_FREQ="${TEST_FREQ:-5}"
  SAVE_FREQ="${SAVE_FREQ:-25}"
  # Throughput / memory (not from the paper): vLLM rollout, FSDP actor, dynamic micro-batches.
  ROLLOUT_TP="${ROLLOUT_TP:-1}"
  GPU_MEMORY_UTILIZATION="${GPU_MEMORY_UTILIZATION:-0.6}"
  PPO_MAX_TOKEN_LEN_PER_GPU="${PPO_MAX_TOKEN_LEN_PER_GPU:-16384}"
  SP_SIZE="${SP_SIZE:-1}"
  PARAM_OFFLOAD="${PARAM_OFFLOAD:-False}"
  OPTIMIZER_OFFLOAD="${OPTIMIZER_OFFLOAD:-False}"
  # Bookkeeping. OUTPUT_ROOT must be on a file system every node sees for multi-node runs.
  PROJECT_NAME="${PROJECT_NAME:-shear-verl}"
  MODEL_TAG="$(basename "$MODEL_PATH" | tr '[:upper:]' '[:lower:]')"
  EXPERIMENT_NAME="${EXPERIMENT_NAME:-${MODEL_TAG}-${TASK}-${ADV_ESTIMATOR}-seed${SEED}}"
  OUTPUT_ROOT="${OUTPUT_ROOT:-$HOME/shear_runs}"
  OUTPUT_DIR="${OUTPUT_DIR:-$OUTPUT_ROOT/$PROJECT_NAME/$EXPERIMENT_NAME}"
  LOGGER="${LOGGER:-[\"console\",\"file\"]}"      # "file": the METRICS_FILE below
  # verl's file logger truncates its file when it starts, so every launch (a resume too) writes its
  # own; `scripts/evaluate.py --from-log $OUTPUT_DIR` reads them all, in launch order.
  RUN_STAMP="${RUN_STAMP:-$(date +%Y%m%d-%H%M%S)}"
  METRICS_FILE="${METRICS_FILE:-$OUTPUT_DIR/metrics-$RUN_STAMP.jsonl}"
  PYTHON="${PYTHON:-python3}"
  method_args
  engine_args
  # verl's file logger opens METRICS_FILE without creating its directory
  [ "$RECIPE_DRY_RUN" = 1 ] || mkdir -p "$(dirname "$METRICS_FILE")"

  recipe_launch "$PYTHON" -m verl.trainer.main_ppo \
    algorithm.adv_estimator="$ADV_ESTIMATOR" \
    "${METHOD_ARGS[@]}" \
    "${ENGINE_ARGS[@]}" \
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
}
