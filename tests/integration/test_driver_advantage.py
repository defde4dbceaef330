"""The driver path through verl's real V1 `_compute_advantage`, TransferQueue on a local Ray.

The trainer object is created with `object.__new__` (its __init__ builds workers and datasets);
`_compute_advantage` itself -- TQ fetch, DataProto, KL/rollout-correction switches, verl's
compute_advantage dispatch to the registered `shear` estimator, nested write-back -- is verl's code
with shear-verl's wrapper around it.
"""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import NonTensorStack, TensorDict

from shear_verl.core import ShearConfig
from shear_verl.integration import patches
from shear_verl.integration.estimator import register_estimator
from shear_verl.integration.settings import ShearSettings
from shear_verl.integration.worker import STATS_COLUMNS, STATS_KEY, WEIGHTS_KEY


@pytest.fixture(scope="module")
def tq_session():
    import ray
    import transfer_queue as tq

    ray.init(address="local", num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()


def make_trainer():
    from verl.trainer.ppo.v1 import trainer_sync

    patches.install()
    register_estimator()
    trainer = object.__new__(trainer_sync.PPOTrainerSync)
    trainer.config = OmegaConf.create(
        {
            "algorithm": {"adv_estimator": "shear", "gamma": 1.0, "lam": 1.0, "norm_adv_by_std_in_grpo": True,
                          "use_kl_in_reward": False, "shear": {}},
            "actor_rollout_ref": {"rollout": {"n": 4}},
        }
    )
    trainer._shear_settings = ShearSettings(engine=ShearConfig())
    return trainer


def put_batch(tq, partition, uids, scores, resp_lens, weights, capped=0.0):
    keys = [f"{u}_{i}_0" for i, u in enumerate(uids)]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    rm = [torch.zeros(n).index_fill_(0, torch.tensor([n - 1]), s) for n, s in zip(resp_lens, scores)]
    masks = [torch.ones(n, dtype=torch.int64) for n in resp_lens]
    stats = torch.zeros(len(uids), len(STATS_COLUMNS))
    stats[0] = torch.tensor([10.0, 40.0, 30.0, 12.0, capped, 0.5])  # in STATS_COLUMNS order
    fields = TensorDict(
        {"response_mask": nested(masks), "rm_scores": nested(rm), WEIGHTS_KEY: nested(weights), STATS_KEY: stats},
        batch_size=len(uids),
    )
    fields["uid"] = NonTensorStack.from_list(list(uids))
    tags = [{"seq_len": n, "prompt_len": 0, "response_len": n} for n in resp_lens]
    return tq.kv_batch_put(keys=keys, partition_id=partition, fields=fields, tags=tags)


def grpo_reference(scores, uids, eps=1e-6):
    """GRPO outcome advantage per rollout, written out: (r - mean_G r) / (std_G r + eps)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.zeros_like(scores)
    for u in set(uids):
        idx = [i for i, v in enumerate(uids) if v == u]
        s = scores[idx]
        out[idx] = (s - s.mean()) / (s.std(ddof=1) + eps)
    return out


def test_advantages_equal_grpo_times_weights(tq_session, caplog):
    tq = tq_session
    g = torch.Generator().manual_seed(1)
    uids = ["mixed"] * 4 + ["allright"] * 4 + ["allwrong"] * 4
    scores = [1.0, 0.0, 0.0, 1.0] + [1.0] * 4 + [0.0] * 4
    resp_lens = [5, 7, 3, 6, 4, 4, 8, 2, 5, 5, 3, 9]
    weights = [torch.rand(n, generator=g) * 2 for n in resp_lens[:4]] + [torch.ones(n) for n in resp_lens[4:]]
    meta = put_batch(tq, "t1", uids, scores, resp_lens, weights)
    trainer = make_trainer()
    metrics = {}
    out = trainer._compute_advantage(meta, metrics)

    assert WEIGHTS_KEY not in (out.fields or []) and STATS_KEY not in (out.fields or [])
    adv = tq.kv_batch_get(keys=meta.keys, partition_id="t1", select_fields=["advantages"])["advantages"].unbind()
    ref = grpo_reference(scores, uids)
    for i, a in enumerate(adv):
        expect = torch.tensor(ref[i], dtype=torch.float32) * weights[i]
        torch.testing.assert_close(a, expect, rtol=1e-5, atol=1e-6)
    # all-correct / all-wrong groups: exactly GRPO (zero advantage, weights 1)
    for i in range(4, 12):
        assert torch.all(adv[i] == 0)
    assert metrics["shear/mixed_group_frac"] == pytest.approx(1 / 3)
    assert metrics["shear/fallback_rollout_frac"] == pytest.approx(8 / 12)
    assert metrics["shear/sinkhorn_solves"] == 10.0
    assert metrics["shear/pruned_frac"] == pytest.approx(0.75)
    assert metrics["shear/dual_pruned_frac"] == pytest.approx(0.3)
    w_correct = torch.cat([weights[0], weights[3]]).mean().item()
    assert metrics["shear/weight_mean_correct"] == pytest.approx(w_correct, rel=1e-5)
    assert metrics["shear/capped_solves"] == 0.0 and "max_iter" not in caplog.text


def test_capped_solves_warn_once_with_the_knobs(tq_session, caplog):
    tq = tq_session
    uids, scores, resp_lens = ["g"] * 4, [1.0, 0.0, 0.0, 1.0], [5, 7, 3, 6]
    trainer = make_trainer()
    for step, capped in enumerate((3.0, 3.0)):  # 3 of 10 solves capped, twice
        meta = put_batch(tq, f"cap{step}", uids, scores, resp_lens, [torch.ones(n) for n in resp_lens], capped=capped)
        metrics = {}
        trainer._compute_advantage(meta, metrics)
        assert metrics["shear/capped_solves"] == 3.0
    warnings = [r.getMessage() for r in caplog.records if "max_iter" in r.getMessage()]
    assert len(warnings) == 1  # once per run
    assert "3 of 10 Sinkhorn solves" in warnings[0] and "algorithm.shear.max_iter" in warnings[0]


def test_missing_weights_raise_with_the_reason(tq_session):
    tq = tq_session
    trainer = make_trainer()
    keys = ["a_0_0", "a_1_0"]
    fields = TensorDict(
        {"response_mask": torch.nested.as_nested_tensor([torch.ones(3, dtype=torch.int64)] * 2, layout=torch.jagged),
         "rm_scores": torch.nested.as_nested_tensor([torch.zeros(3)] * 2, layout=torch.jagged)},
        batch_size=2,
    )
    fields["uid"] = NonTensorStack.from_list(["a", "a"])
    meta = tq.kv_batch_put(keys=keys, partition_id="t2", fields=fields, tags=[{"seq_len": 3}] * 2)
    with pytest.raises(RuntimeError, match="bypass_mode"):
        trainer._compute_advantage(meta, {})


def test_estimator_without_driver_hand_over_raises():
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    register_estimator()
    fn = get_adv_estimator_fn("shear")
    with pytest.raises(RuntimeError, match="no SHEAR token weights"):
        fn(token_level_rewards=torch.zeros(2, 3), response_mask=torch.ones(2, 3), index=np.array(["a", "a"]),
           config=OmegaConf.create({}))
