"""End to end: verl's stock CLI (`python -m verl.trainer.main_ppo`) with `algorithm.adv_estimator=shear`
on CPU (tiny model, vLLM-CPU rollouts, the CPU platform; the main job's run, shared with the tiny
e2e and credit-dump tests). Nothing is mocked: the plugin loads through
`import verl` in every Ray process, the actor workers capture hidden states and compute the weights,
the driver hands them to the `shear` estimator. Assertions read the metrics verl's file logger wrote.
"""

import math

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHEAR_METRICS = (
    "weight_mean", "weight_max", "weight_mean_correct", "weight_mean_incorrect", "mixed_group_frac",
    "fallback_rollout_frac", "sinkhorn_solves", "pruned_frac", "dual_pruned_frac", "capped_solves", "time_s",
)


@pytest.fixture
def shear_run(main_job_runs):
    """The first 2 steps of the main job (SHEAR on the counting task; tests/conftest.py)."""
    return main_job_runs[2]


def test_stock_cli_runs_shear_and_logs_its_metrics(shear_run):
    assert [m["step"] for m in shear_run] == [1, 2]
    for m in shear_run:
        missing = [k for k in SHEAR_METRICS if f"shear/{k}" not in m]
        assert not missing, f"step {m['step']}: shear metrics not logged: {missing}"
        # a mixed group has non-zero advantages; without one a step's are all 0 (vLLM-CPU's sampling varies)
        assert math.isfinite(m["actor/grad_norm"]) and (m["actor/grad_norm"] > 0) == (m["shear/mixed_group_frac"] > 0)
        assert m["training/rollout_probs_diff_max"] < 1e-3


def test_mixed_groups_get_non_trivial_weights(shear_run):
    mixed = [m for m in shear_run if m["shear/mixed_group_frac"] > 0]
    assert mixed, "the warm-started counting model should give groups with both outcomes from the first step"
    for m in mixed:
        assert m["shear/sinkhorn_solves"] > 0
        assert m["shear/fallback_rollout_frac"] < 1.0
        # weights of mixed groups are normalised span distances, not the all-ones fallback
        assert abs(m["shear/weight_mean_incorrect"] - 1.0) > 1e-3
        assert abs(m["shear/weight_mean_correct"] - 1.0) > 1e-3
        assert m["shear/weight_max"] > 0
        assert 0.0 <= m["shear/pruned_frac"] < 1.0
        assert m["shear/capped_solves"] >= 0
