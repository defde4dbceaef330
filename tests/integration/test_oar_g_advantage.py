"""OAR-G's driver side: the workers' saliency fields in verl's TransferQueue, verl's real
`_compute_advantage` with shear-verl's wrapper, the advantages it stores against GRPO times the
Bi-Level weights written here from the paper's steps (numpy)."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import NonTensorStack, TensorDict

from shear_verl.baselines import register_baselines
from shear_verl.baselines.oar_g import OarGSettings
from shear_verl.integration import patches
from shear_verl.integration.driver import SignalRun
from shear_verl.integration.fields import OAR_REASONING_KEY, OAR_SALIENCY_KEY, OAR_STATS_KEY
from shear_verl.integration.signals import SIGNALS

RESPONSES = [9, 3, 12, 6, 8, 2, 11, 7]
REASONING = [5, 0, 8, 6, 4, 0, 7, 3]  # reasoning = the first n response tokens (0: no answer span)
SCORES = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # two groups of 4, mixed


def weights_ref(importance, tau, beta, floor):
    s = np.log1p(np.asarray(importance, dtype=np.float64))
    n = (s - s.min()) / ((s.max() - s.min()) or 1.0)
    q = np.quantile(n, tau)
    w = np.where(n < q, np.maximum(n / (q + 1e-8), floor), 1.0 + beta * (n - q) / (1.0 - q + 1e-8))
    return w * len(w) / (w.sum() + 1e-8)


def test_compute_advantage_reshapes_grpo_by_the_workers_saliency(tq_session):
    from verl.trainer.ppo.v1 import trainer_sync

    patches.install()
    register_baselines()
    g = torch.Generator().manual_seed(0)
    uids = [f"g{i // 4}" for i in range(len(RESPONSES))]
    masks = [torch.ones(r, dtype=torch.int64) for r in RESPONSES]
    masks[2][1:3] = 0  # a tool span inside the reasoning
    sal = [torch.rand(r, generator=g) * 10 for r in RESPONSES]
    keep = [(torch.arange(r) < n).float() * m.float() for r, n, m in zip(RESPONSES, REASONING, masks)]
    sal = [s * k for s, k in zip(sal, keep)]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    rm = [torch.zeros(len(m)).index_fill_(0, torch.tensor([len(m) - 1]), s) for m, s in zip(masks, SCORES)]
    stats = torch.tensor([[float(n > 0), 0.0, 0.01] for n in REASONING])
    fields = TensorDict({"response_mask": nested(masks), "rm_scores": nested(rm), OAR_SALIENCY_KEY: nested(sal),
                         OAR_REASONING_KEY: nested(keep), OAR_STATS_KEY: stats}, batch_size=len(uids))
    fields["uid"] = NonTensorStack.from_list(uids)
    keys = [f"{u}_{i}_0" for i, u in enumerate(uids)]
    meta = tq_session.kv_batch_put(keys=keys, partition_id="oar-g", fields=fields,
                                   tags=[{"seq_len": len(m)} for m in masks])
    settings = OarGSettings(tau=0.4, beta=1.5)
    trainer = object.__new__(trainer_sync.PPOTrainerSync)
    trainer.config = OmegaConf.create({"algorithm": {
        "adv_estimator": "oar_g", "gamma": 1.0, "lam": 1.0, "norm_adv_by_std_in_grpo": True,
        "use_kl_in_reward": False, "oar_g": {"tau": 0.4, "beta": 1.5}}, "actor_rollout_ref": {"rollout": {"n": 4}}})
    trainer._signal_run = SignalRun(SIGNALS["oar_g"], settings)
    metrics = {}
    out = trainer._compute_advantage(meta, metrics)
    assert OAR_SALIENCY_KEY not in out.fields  # the workers' fields stay out of later passes
    adv = tq_session.kv_batch_get(keys=keys, partition_id="oar-g", select_fields=["advantages"])["advantages"].unbind()
    for i, (a, m, k, s) in enumerate(zip(adv, masks, keep, sal)):
        group = [SCORES[j] for j in range(len(uids)) if uids[j] == uids[i]]
        mean = sum(group) / len(group)
        grpo = (SCORES[i] - mean) / (math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1)) + 1e-6)
        w = np.ones(len(m))
        r = k.bool().numpy()
        if r.any():
            w[r] = weights_ref(s.numpy()[r], 0.4, 1.5, 0.1)
        np.testing.assert_allclose(a.numpy(), grpo * w * m.numpy(), rtol=1e-5, atol=1e-6)
    assert metrics["oar_g/reshaped_frac"] == pytest.approx(6 / 8)
    assert metrics["oar_g/mass_ratio"] == pytest.approx(1.0, rel=1e-5)
