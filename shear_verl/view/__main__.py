"""``python -m shear_verl.view DUMP.jsonl [DUMP.jsonl ...] --out credit.html [--scale dump|group] [--step S ...]``

Renders per-token credit dumps (``algorithm.shear.dump_every``) as one self-contained HTML page:
every rollout's tokens shaded by SHEAR weight and coloured by the sign of their advantage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .dump import DumpError
from .page import SCALES, write_credit_page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shear_verl.view", description=__doc__.split("\n\n")[1])
    parser.add_argument("dumps", nargs="+", type=Path, metavar="DUMP.jsonl", help="credit dump file(s), JSON lines")
    parser.add_argument("--out", type=Path, default=Path("credit.html"), help="HTML page to write (default: credit.html)")
    parser.add_argument("--scale", choices=SCALES, default="dump",
                        help="shade = weight / max weight of the dump's mixed groups (default) or of each group")
    parser.add_argument("--step", type=int, action="append", dest="steps", metavar="S",
                        help="render only this step (repeatable; default: all steps)")
    args = parser.parse_args(argv)
    try:
        out = write_credit_page(args.dumps, args.out, scale=args.scale, steps=args.steps)
    except (DumpError, ValueError, OSError) as e:
        print(f"shear_verl.view: error: {e}", file=sys.stderr)
        return 2
    print(f"credit page: {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
