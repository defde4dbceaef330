"""python -m shear_verl.diagnose --model PATH --data FILE.parquet --out DIR [options]"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from shear_verl.diagnose.run import Diagnostic, Settings


def parse(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(prog="python -m shear_verl.diagnose", description=__doc__)
    defaults = Settings(model="", data="", out="")
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("model", "data", "out"):
            p.add_argument(flag, required=True)
            continue
        kind = {int: int, float: float, str: str}.get(type(getattr(defaults, f.name)), str)
        if f.name == "limit":
            kind = int
        p.add_argument(flag, type=kind, default=getattr(defaults, f.name), help=f"default {getattr(defaults, f.name)!r}")
    args = p.parse_args(argv)
    if args.answer_marker == "":
        args.answer_marker = None
    return Settings(**vars(args))


def main(argv: list[str] | None = None) -> int:
    s = parse(sys.argv[1:] if argv is None else argv)
    from shear_verl.diagnose.report import write_report

    result = Diagnostic(s).run()
    out = Path(s.out)
    (out / "diagnostic.json").write_text(json.dumps(result, indent=1))
    write_report(result, out)
    print(json.dumps({k: result[k] for k in ("problems", "mixed_groups", "rollout_accuracy", "spans",
                                             "spearman_delta", "spearman_delta_by_side", "auc_rising")}))
    print("AUC bins:", [None if b["auc"] is None else round(b["auc"], 3) for b in result["auc_bins"]])
    print(f"wrote {out / 'diagnostic.json'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
