"""The seed comparison's figures and the tiny report's SHEAR fields, on hand-made metrics."""

import statistics

import pytest

from shear_verl.tiny.compare import aggregate, format_table, plot_compare, steps_to_threshold
from shear_verl.tiny.report import summarize


def metrics(rewards, shear_time=None):
    rows = []
    for step, r in enumerate(rewards, 1):
        row = {"step": step, "critic/score/mean": r, "actor/grad_norm": 0.1 * step, "timing_s/step": 10.0}
        if shear_time is not None:
            row["shear/time_s"] = shear_time
        rows.append(row)
    return rows


def test_steps_to_threshold_uses_the_trailing_mean():
    steps = [1, 2, 3, 4, 5]
    assert steps_to_threshold(steps, [0.0, 1.0, 0.0, 1.0, 1.0], 0.6, window=2) == 5
    assert steps_to_threshold(steps, [0.0, 1.0, 0.0, 1.0, 1.0], 0.6, window=1) == 2
    assert steps_to_threshold(steps, [0.1] * 5, 0.6, window=2) is None


def test_aggregate_over_seeds(tmp_path):
    runs = {
        "grpo": {0: {"metrics": metrics([0.2, 0.4, 0.6, 0.8]), "wall_s": 100.0},
                 1: {"metrics": metrics([0.2, 0.2, 0.2, 0.2]), "wall_s": 120.0}},
        "shear": {0: {"metrics": metrics([0.4, 0.6, 0.8, 0.8]), "wall_s": 110.0, "divergence_auc": 0.9},
                  1: {"metrics": metrics([0.6, 0.6, 0.6, 0.6]), "wall_s": 130.0, "divergence_auc": 0.8}},
    }
    out = aggregate(runs, threshold=0.6, window=2)["estimators"]
    assert out["grpo"]["steps_to_threshold"] == {"0": 4, "1": None} and out["grpo"]["reached"] == "1/2"
    assert out["shear"]["steps_to_threshold"] == {"0": 3, "1": 1}  # a trailing mean of what there is
    assert out["shear"]["steps_to_threshold_mean_std"] == (2.0, statistics.stdev([3, 1]))
    assert out["grpo"]["final_reward_mean_std"] == pytest.approx((0.45, statistics.stdev([0.7, 0.2])))
    assert out["shear"]["wall_s_mean_std"] == (120.0, statistics.stdev([110.0, 130.0]))
    assert out["shear"]["divergence_auc_mean_std"] == pytest.approx((0.85, statistics.stdev([0.9, 0.8])))
    table = format_table({"threshold": 0.6, "window": 2, "estimators": out})
    assert "| grpo | 2 | 4.0 +- 0.0 | 1/2 |" in table and "| shear | 2 | 2.0 +- 1.4 | 2/2 |" in table
    png = plot_compare({"threshold": 0.6, "window": 2, "estimators": out}, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_reports_shear_share_and_grad_norms():
    s = summarize(metrics([0.1, 0.2, 0.3], shear_time=2.5))
    assert s["shear_time_share"] == pytest.approx(0.25)
    assert s["grad_norm_mean"] == pytest.approx(0.2) and s["grad_norm"] == pytest.approx(0.3)
    assert "shear_time_share" not in summarize(metrics([0.1, 0.2]))
