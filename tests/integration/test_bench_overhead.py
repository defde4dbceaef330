"""scripts/bench_overhead.py through its command line: the layout table's arithmetic on a tiny
measured group, and --from-logs on hand-written metric logs in verl's file-logger format."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_overhead.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def write_log(workdir: Path, steps: list[dict]) -> None:
    """metrics-0.jsonl as verl's ``file`` logger writes it: one {"step": n, "data": {...}} per line."""
    workdir.mkdir()
    with open(workdir / "metrics-0.jsonl", "w") as f:
        for n, data in enumerate(steps, start=1):
            f.write(json.dumps({"step": n, "data": data}) + "\n")
    (workdir / "wall-0.txt").write_text(str(sum(d["timing_s/step"] for d in steps)))


def test_layout_table_on_a_tiny_group():
    out = run_script("--groups", "1", "--group-size", "4", "--t-min", "120", "--t-max", "180", "--d", "16",
                     "--target-t", "0", "--gpus", "8", "--tp", "2", "--prompts-per-step", "20",
                     "--grpo-step-s", "10", "40")
    assert out.returncode == 0, out.stdout + out.stderr
    per_group = float(re.search(r"measured: ([\d.]+) s/group", out.stdout).group(1))
    rows = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+) \|\s+([\d.]+)\s+([+-][\d.]+)%", out.stdout, re.M)
    assert [float(r[3]) for r in rows] == [10.0, 40.0]
    groups_per_rank = math.ceil(20 / (8 / 2))  # prompts / data-parallel ranks
    assert "+15.5 % / +10.4 % / +7.4 %" in out.stdout
    for groups, group_s, shear_s, step_s, overhead in rows:
        assert int(groups) == groups_per_rank == 5
        expected_shear = groups_per_rank * per_group / 2  # two TP peers split the rank's groups
        slack = 0.005 * groups_per_rank / 2  # per_group is printed to 0.01 s
        assert float(shear_s) == pytest.approx(expected_shear, abs=slack + 0.05)
        assert float(overhead) == pytest.approx(100 * expected_shear / float(step_s), abs=100 * slack / float(step_s) + 0.05)


def test_layout_refuses_gpus_not_divisible():
    out = run_script("--groups", "1", "--group-size", "2", "--t-min", "50", "--t-max", "60", "--d", "8",
                     "--gpus", "6", "--tp", "4", "--target-t", "0")
    assert out.returncode != 0 and "not a multiple of tp * sp" in out.stderr


def test_from_logs_skips_warm_up_and_computes_overhead(tmp_path):
    shear = [{"timing_s/step": t, "shear/time_s": s} for t, s in [(30.0, 1.0), (12.0, 2.0), (13.0, 3.0), (14.0, 1.5)]]
    grpo = [{"timing_s/step": t} for t in (25.0, 10.0, 11.0, 12.0)]
    write_log(tmp_path / "shear", shear)
    write_log(tmp_path / "grpo", grpo)
    out = run_script("--from-logs", str(tmp_path / "shear"), str(tmp_path / "grpo"))
    assert out.returncode == 0, out.stdout + out.stderr
    overhead = (12 + 13 + 14) / 3 / ((10 + 11 + 12) / 3) - 1  # first step dropped in both runs
    share = (2 / 12 + 3 / 13 + 1.5 / 14) / 3
    assert "first step skipped as warm-up in SHEAR and GRPO" in out.stdout
    assert float(re.search(r"overhead ([+-][\d.]+) %", out.stdout).group(1)) == pytest.approx(100 * overhead, abs=0.05)
    assert float(re.search(r"share of the SHEAR step ([\d.]+) %", out.stdout).group(1)) == pytest.approx(
        100 * share, abs=0.05)


def test_from_logs_two_steps_keeps_both(tmp_path):
    write_log(tmp_path / "shear", [{"timing_s/step": 8.0, "shear/time_s": 1.0}, {"timing_s/step": 6.0, "shear/time_s": 1.0}])
    write_log(tmp_path / "grpo", [{"timing_s/step": 5.0}, {"timing_s/step": 5.0}])
    out = run_script("--from-logs", str(tmp_path / "shear"), str(tmp_path / "grpo"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skipped" not in out.stdout
    assert "overhead +40.0 %" in out.stdout  # (8 + 6) / 2 / 5 - 1


def test_from_logs_clear_errors(tmp_path):
    write_log(tmp_path / "grpo", [{"timing_s/step": 5.0}])
    out = run_script("--from-logs", str(tmp_path / "missing"), str(tmp_path / "grpo"))
    assert out.returncode != 0 and "no tiny-run metrics" in out.stderr
    out = run_script("--from-logs", str(tmp_path / "grpo"), str(tmp_path / "grpo"))
    assert out.returncode != 0 and "lacks 'shear/time_s'" in out.stderr


def test_epsilon_sweep_absolute_at_n_bar_90_is_relative_0_05():
    out = run_script("--groups", "1", "--group-size", "4", "--t-min", "110", "--t-max", "140", "--d", "16",
                     "--target-t", "0", "--epsilon-sweep")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = dict(((m, n), (int(solves), int(capped))) for m, n, solves, capped in re.findall(
        r"^(relative 0.05|absolute 4.5)\s+(\S+)\s+[\d.]+ \|\s+[\d.]+\s+[\d.]+\s+(\d+)\s+(\d+)$", out.stdout, re.M))
    assert set(rows) == {("relative 0.05", "any"), *(("absolute 4.5", n) for n in ("45", "90", "180", "360"))}, out.stdout
    # eps = 4.5 raw at n_bar = 90 is eps = 0.05 in n_bar units: the same problems, the same solves
    assert rows[("absolute 4.5", "90")] == rows[("relative 0.05", "any")]
