#!/usr/bin/env bash
# GRPO advantages reshaped by a process reward model's step scores (a reading of the SHEAR paper's "PRM (Reshape adv.)")
# on MATH with Qwen2.5-Math-7B: the paper's Table 1 baseline, run_shear_math.sh with ADV=prm_reshape.
#
#   bash recipes/run_prm_reshape_math.sh [--dry-run] [hydra overrides ...]
#
# The PRM (default Qwen/Qwen2.5-Math-PRM-7B) is served by verl's reward model on a pool of its own:
# PRM_PATH, PRM_NNODES (1), PRM_N_GPUS_PER_NODE (8), PRM_TP (1), PRM_GPU_MEMORY_UTILIZATION (0.8);
# the full list is recipes/common.sh: prm_args. Its knobs: +algorithm.prm_reshape.<key>=... (README, "Baselines").
set -euo pipefail
ADV_ESTIMATOR=prm_reshape exec bash "$(dirname "${BASH_SOURCE[0]}")/run_shear_math.sh" "$@"
