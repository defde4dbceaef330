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
from shear_verl.integration.driver import SHEAR_SIGNAL, SignalRun
from shear_verl.integration.estimator import register_estimator
from shear_verl.integration.settings import ShearSettings
from shear_verl.integration.worker import COL, STATS_COLUMNS, STATS_KEY, WEIGHTS_KEY


def make_trainer(**settings):
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
    trainer._signal_run = SignalRun(SHEAR_SIGNAL, ShearSettings(engine=ShearConfig(), **settings))
    return trainer


def worker_stats(uids, scores, capped=0.0, threshold=0.5, **columns):
    """The stats rows as the workers write them: group totals on row 0, a fallback flag on every
    row of a group with one outcome only; ``columns`` set whole columns (rank, capture_mb, ...)."""
    stats = torch.zeros(len(uids), len(STATS_COLUMNS))
    for name, value in {"sinkhorn_solves": 10.0, "candidate_pairs": 40.0, "pruned_pairs": 30.0,
                        "dual_pruned_pairs": 12.0, "capped_solves": capped, "time_s": 0.5}.items():
        stats[0, COL[name]] = value
    for u in set(uids):
        rows = [i for i, v in enumerate(uids) if v == u]
        if len({scores[i] > threshold for i in rows}) == 1:
            stats[rows, COL["fallback"]] = 1.0
    for name, value in columns.items():
        stats[:, COL[name]] = torch.as_tensor(value, dtype=torch.float32)
    return stats


def put_batch(tq, partition, uids, scores, resp_lens, weights, capped=0.0, stats=None, keys=None):
    keys = keys or [f"{u}_{i}_0" for i, u in enumerate(uids)]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    rm = [torch.zeros(n).index_fill_(0, torch.tensor([n - 1]), s) for n, s in zip(resp_lens, scores)]
    masks = [torch.ones(n, dtype=torch.int64) for n in resp_lens]
    stats = worker_stats(uids, scores, capped) if stats is None else stats
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


@pytest.mark.parametrize("mode", ["one", "group_mean"])
def test_fallback_rows_with_partial_credit_get_the_chosen_weight_and_a_warning(tq_session, caplog, mode):
    """A partial-credit group (scores 0.1-0.4, all below the threshold: no opposing side) has a nonzero
    GRPO advantage; its rows get weight 1 or the mixed rows' mean weight, and the run warns once."""
    tq = tq_session
    g = torch.Generator().manual_seed(2)
    uids = ["mixed"] * 4 + ["partial"] * 4
    scores = [1.0, 0.0, 0.0, 1.0] + [0.3, 0.4, 0.2, 0.1]
    resp_lens = [5, 7, 3, 6, 4, 6, 8, 2]
    weights = [torch.rand(n, generator=g) * 0.2 for n in resp_lens[:4]] + [torch.ones(n) for n in resp_lens[4:]]
    trainer = make_trainer(fallback=mode)
    for step in range(2):
        meta = put_batch(tq, f"fb-{mode}-{step}", uids, scores, resp_lens, weights)
        metrics = {}
        trainer._compute_advantage(meta, metrics)
        assert metrics["shear/fallback_active_rollouts"] == 4.0
    adv = tq.kv_batch_get(keys=meta.keys, partition_id=meta.partition_id, select_fields=["advantages"])["advantages"].unbind()
    ref = grpo_reference(scores, uids)
    mixed_mean = torch.cat(weights[:4]).mean()
    for i in range(8):
        w = weights[i] if i < 4 else torch.full((resp_lens[i],), 1.0 if mode == "one" else float(mixed_mean))
        torch.testing.assert_close(adv[i], torch.tensor(ref[i], dtype=torch.float32) * w, rtol=1e-5, atol=1e-6)
    assert any(ref[4:] != 0)
    warnings = [r.getMessage() for r in caplog.records if "no opposing side" in r.getMessage()]
    assert len(warnings) == 1 and "4 rollouts" in warnings[0] and f"algorithm.shear.fallback={mode}" in warnings[0]


def test_zero_advantage_fallback_groups_do_not_warn(tq_session, caplog):
    tq = tq_session
    uids, scores, resp_lens = ["m"] * 2 + ["right"] * 2, [1.0, 0.0, 1.0, 1.0], [3, 4, 5, 2]
    meta = put_batch(tq, "fb-zero", uids, scores, resp_lens, [torch.ones(n) for n in resp_lens])
    metrics = {}
    make_trainer(fallback="group_mean")._compute_advantage(meta, metrics)
    assert metrics["shear/fallback_active_rollouts"] == 0.0 and "no opposing side" not in caplog.text


def test_per_rank_metrics_time_n_bar_epsilon_and_capture(tq_session):
    """shear/time_s is the slowest rank's summed group time, time_s_sum all ranks'; n_bar and
    epsilon_raw are means over the mixed groups; capture_mb the largest rank's capture."""
    tq = tq_session
    uids = ["a"] * 2 + ["b"] * 2 + ["c"] * 2 + ["d"] * 2
    scores = [1.0, 0.0] * 3 + [1.0, 1.0]
    resp_lens = [3] * 8
    stats = worker_stats(uids, scores, rank=[0, 0, 0, 0, 1, 1, 1, 1], capture_mb=[5, 5, 5, 5, 7, 7, 7, 7])
    for row, (t, n_bar) in zip((0, 2, 4, 6), ((1.0, 10.0), (2.0, 20.0), (0.5, 30.0), (0.25, 0.0))):
        stats[row, COL["time_s"]] = t
        stats[row, COL["mixed_groups"]] = float(n_bar > 0)
        stats[row, COL["n_bar_sum"]] = n_bar
        stats[row, COL["epsilon_raw_sum"]] = 0.05 * n_bar
    meta = put_batch(tq, "ranks", uids, scores, resp_lens, [torch.ones(3)] * 8, stats=stats)
    metrics = {}
    make_trainer()._compute_advantage(meta, metrics)
    assert metrics["shear/time_s"] == pytest.approx(3.0) and metrics["shear/time_s_sum"] == pytest.approx(3.75)
    assert metrics["shear/n_bar"] == pytest.approx(20.0) and metrics["shear/epsilon_raw"] == pytest.approx(1.0)
    assert metrics["shear/capture_mb"] == 7.0 and metrics["shear/fallback_rollout_frac"] == pytest.approx(0.25)


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


def test_multi_output_agent_sessions_are_refused(tq_session):
    """Keys {uid}_{session}_{index}: index 1 is a session's second output, which verl's GRPO would
    leave out of its groups; SHEAR stops instead of grouping it differently."""
    tq = tq_session
    uids, scores, resp_lens = ["s"] * 4, [1.0, 1.0, 0.0, 0.0], [3, 4, 3, 4]
    keys = ["s_0_0", "s_0_1", "s_1_0", "s_1_1"]
    meta = put_batch(tq, "multi", uids, scores, resp_lens, [torch.ones(n) for n in resp_lens], keys=keys)
    with pytest.raises(RuntimeError, match=r"2 rows that are non-final outputs of multi-output agent sessions.*'s_0_1'"):
        make_trainer()._compute_advantage(meta, {})
