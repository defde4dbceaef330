"""End to end: verl's stock CLI with `algorithm.adv_estimator=oar_g` on CPU (tiny model, vLLM-CPU
rollouts), 2 steps, nothing mocked: the plugin's flag reaches the FSDP actor's old-log-prob pass,
the workers compute the input-gradient saliency, the driver hands it to the estimator. Assertions
read the metrics verl's file logger wrote."""

import math

import pytest

from shear_verl.tiny import TinyConfig, run_tiny

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_stock_cli_runs_oar_g_and_logs_its_metrics(tmp_path):
    metrics = run_tiny(tmp_path, adv="oar_g", steps=2, config=TinyConfig(prompts_per_step=4, group_size=4),
                       timeout=600)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["actor/grad_norm"])
        # tail answers (tiny run): every response longer than 4 tokens is reshaped
        assert m["oar_g/reshaped_frac"] > 0.5
        assert m["oar_g/saliency_time_s"] > 0
        # Bi-Level weights: suppressed tokens in [0.1, 1), boosted above 1, reasoning mass kept
        assert 0.0 < m["oar_g/weight_min"] < 1.0 < m["oar_g/weight_max"]
        assert m["oar_g/mass_ratio"] == pytest.approx(1.0, rel=1e-4)
