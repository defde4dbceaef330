#!/usr/bin/env bash
# The weight engine's checks on a GPU, in one run (a few minutes on one H100/H200):
#   1. the core test suite with its inputs on the GPU (SHEAR_TEST_DEVICE), against POT as on the CPU;
#   2. the benchmark table with the engine and the POT loop on the GPU's tensors;
#   3. the paper-scale group (8 x 3000 x 3584) on the GPU, at the default and at a larger memory budget.
#
#   bash scripts/gpu_check.sh [LOG_DIR]      # python: $PYTHON or python3, with torch (CUDA), POT,
#                                            # numba, hypothesis, omegaconf and pytest importable
# Each step's output also goes to LOG_DIR (default outputs/gpu_check). Exits non-zero if a step fails.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
LOGS="${1:-outputs/gpu_check}"
DEVICE="${SHEAR_TEST_DEVICE:-cuda}"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, numba, ot; print('torch', torch.__version__, 'numba', numba.__version__, 'POT', ot.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" || exit 1
rc=0
step() { local name=$1; shift; echo "== $name: $*"; "$@" 2>&1 | tee "$LOGS/$name.log" || rc=1; }
# the bench smoke test times the CPU path; it is not a device check
step core_tests env SHEAR_TEST_DEVICE="$DEVICE" "$PY" -m pytest tests/core -q -p no:cacheprovider \
  --deselect tests/core/test_core_bench_weights.py
step bench "$PY" scripts/bench_weights.py --device "$DEVICE" --repeat 2
step paper_scale "$PY" scripts/bench_weights.py --device "$DEVICE" --paper-scale
step paper_scale_8g "$PY" scripts/bench_weights.py --device "$DEVICE" --paper-scale --budget-mb 8192
exit $rc
