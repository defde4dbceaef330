"""python -m shear_verl.diagnose --model PATH --data FILE.parquet --out DIR [--quick] [options]

Continuation success of rollout prefixes against the span distance to the opposing group (the
paper's Sections 2, 5.1 and Appendix K). Defaults are the paper's settings; --quick scales spans,
prefixes and lengths to the tiny counting task (CPU, a few minutes); any option given overrides both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from shear_verl.diagnose.run import QUICK, Diagnostic, Settings

_REQUIRED = ("model", "data", "out")


def parse(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(prog="python -m shear_verl.diagnose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"tiny-task settings: {QUICK}")
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.name in _REQUIRED:
            p.add_argument(flag, required=True)
            continue
        kind = int if f.name == "limit" else type(f.default)
        quick = f", --quick {QUICK[f.name]!r}" if f.name in QUICK else ""
        p.add_argument(flag, type=kind, default=None, help=f"default {f.default!r}{quick}")
    args = vars(p.parse_args(argv))
    values = {**(QUICK if args.pop("quick") else {}), **{k: v for k, v in args.items() if v is not None}}
    if values.get("answer_marker") == "":
        values["answer_marker"] = None  # --answer-marker '': no final-answer span to exclude
    try:
        return Settings(**values)
    except ValueError as err:
        p.error(str(err))


def main(argv: list[str] | None = None) -> int:
    s = parse(sys.argv[1:] if argv is None else argv)
    from shear_verl.diagnose.report import write_report

    t0 = time.perf_counter()
    result = Diagnostic(s).run()
    result["runtime_s"] = round(time.perf_counter() - t0, 1)  # this invocation (cached stages are not redone)
    out = Path(s.out)
    (out / "diagnostic.json").write_text(json.dumps(result, indent=1))
    write_report(result, out)
    print(json.dumps({k: result[k] for k in ("problems", "mixed_groups", "rollout_accuracy", "spans", "runtime_s",
                                             "spearman_delta", "spearman_delta_by_side", "auc_rising")}))
    print("shift events:", len(result["shift_events"]), "AUC bins:",
          [None if b["auc"] is None else round(b["auc"], 3) for b in result["auc_bins"]])
    print(f"wrote {out / 'diagnostic.json'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
