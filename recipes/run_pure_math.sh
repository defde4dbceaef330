#!/usr/bin/env bash
# PURE's min-form credit from a process reward model (Cheng et al. 2025, arXiv 2504.15275)
# on MATH with Qwen2.5-Math-7B: the paper's Table 1 baseline, run_shear_math.sh with ADV=pure.
#
#   bash recipes/run_pure_math.sh [--dry-run] [hydra overrides ...]
#
# The PRM (default Qwen/Qwen2.5-Math-PRM-7B) is served by verl's reward model on a pool of its own:
# PRM_PATH, PRM_NNODES (1), PRM_N_GPUS_PER_NODE (8), PRM_TP (1), PRM_GPU_MEMORY_UTILIZATION (0.8);
# the full list is recipes/common.sh: prm_args. Its knobs: +algorithm.pure.<key>=... (README, "Baselines").
set -euo pipefail
ADV_ESTIMATOR=pure exec bash "$(dirname "${BASH_SOURCE[0]}")/run_shear_math.sh" "$@"
