"""scripts/bench_weights.py runs end to end and its table says what the engine computed: the same
weights as brute force and the same span distances as POT (the script's own comparisons)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench_weights.py"


def test_quick_bench_prints_one_row_matching_brute_force_and_pot(capsys, monkeypatch):
    bench = runpy.run_path(str(BENCH))  # defines main() without running it
    monkeypatch.setattr(sys, "argv", ["bench_weights.py", "--quick", "--samples", "3", "--floor-samples", "5",
                                      "--repeat", "2"])
    bench["main"]()
    lines = capsys.readouterr().out.splitlines()
    assert "fastest of 2 runs" in lines[0]
    assert lines[1].split()[:2] == ["case", "pairs"] and len(lines) == 4
    engine, brute, pot, floor = (part.split() for part in lines[3].split("|")[1:])
    pairs = int(lines[3].split("|")[0].split()[-1])
    solves, stopped, capped = int(engine[1]), int(engine[3]), int(engine[4])
    assert 0 < solves <= pairs and 0 <= stopped <= pairs - solves and capped == 0
    assert float(brute[2]) <= 1e-5  # weights: engine vs no-prune
    assert float(pot[2]) <= 1e-5  # span distances: engine's solver vs ot.sinkhorn2
    assert float(engine[0]) > 0 and float(pot[0]) > 0
