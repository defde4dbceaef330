"""The entropy the baselines use, end to end on CPU: verl's real FSDP LM-head engine computes it in
the old-log-prob pass (as in test_fsdp_capture.py: the engine built with `object.__new__` around a
plain HF module, verl's own packing / remove-padding / dynamic batching / entropy code), verl's
trainer cut (`response_from_nested`, as `_compute_old_log_prob` does) puts it in the TransferQueue,
and verl's real `_compute_advantage` with shear-verl's wrapper hands it to the `entropy_adv` /
`top_entropy` estimators. The reference is transformers' logits of each sequence run alone, at the
rollout temperature."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import NonTensorStack, TensorDict

from shear_verl.baselines import register_baselines
from shear_verl.baselines.entropy_adv import EntropyAdvSettings
from shear_verl.baselines.top_entropy import TopEntropySettings
from shear_verl.integration import patches
from shear_verl.integration.driver import SignalRun
from shear_verl.integration.signals import SIGNALS

LENGTHS = [(5, 9), (7, 3), (4, 12), (6, 6), (3, 8), (8, 2), (5, 11), (4, 7)]  # (prompt, response)
SCORES = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # two groups of 4, mixed
TEMPERATURE = 0.7


@pytest.fixture()
def engine(fsdp_engine, tiny_qwen2):
    return fsdp_engine(tiny_qwen2)


def old_log_prob_batch(vocab, rmpad, dynamic):
    """The actor's old-log-prob pass input as verl's V1 path delivers it (nested per sample)."""
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (p + r,), generator=g) for p, r in LENGTHS]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    masks = []
    for _, r in LENGTHS:
        m = torch.ones(r, dtype=torch.int64)
        if r > 6:
            m[2:4] = 0  # a tool span
        masks.append(m)
    td = TensorDict({"input_ids": nested(ids), "position_ids": nested([torch.arange(len(x)) for x in ids]),
                     "response_mask": nested(masks), "loss_mask": nested(masks)}, batch_size=len(ids))
    tu.assign_non_tensor(td, use_remove_padding=rmpad, use_dynamic_bsz=dynamic, use_fused_kernels=False,
                         max_token_len_per_gpu=48, micro_batch_size_per_gpu=2, calculate_entropy=True,
                         temperature=TEMPERATURE, compute_loss=False)
    return td, ids, masks


def transformers_entropy(model, ids):
    """H_t = -sum_v p log p of softmax(logits / T) at the position that predicts response token t."""
    out = []
    with torch.no_grad():
        for x, (p, _) in zip(ids, LENGTHS):
            logits = model(input_ids=x[None]).logits[0, p - 1 : x.shape[0] - 1] / TEMPERATURE  # [R, V]
            logp = torch.log_softmax(logits.double(), dim=-1)
            out.append(-(logp.exp() * logp).sum(-1).float())  # [R]
    return out


def stored_entropy(engine, data):
    """The `entropy` field as verl's `_compute_old_log_prob` writes it to the TransferQueue."""
    from verl.workers.utils.padding import response_from_nested

    out = engine.infer_batch(data)["model_output"]
    return response_from_nested(out["entropy"], data["response_mask"])


@pytest.mark.parametrize("rmpad, dynamic", [(True, True), (False, False)])
def test_old_log_prob_entropy_equals_transformers(engine, tiny_qwen2, rmpad, dynamic):
    data, ids, _ = old_log_prob_batch(tiny_qwen2.config.vocab_size, rmpad, dynamic)
    got = stored_entropy(engine, data).unbind()
    for g, ref in zip(got, transformers_entropy(tiny_qwen2, ids)):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)


def run_compute_advantage(tq, partition, name, settings, entropy, masks):
    """verl's `_compute_advantage` (shear-verl's wrapper around it) on a batch in the TransferQueue."""
    from verl.trainer.ppo.v1 import trainer_sync

    patches.install()
    register_baselines()
    uids = [f"g{i // 4}" for i in range(len(LENGTHS))]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    rm = [torch.zeros(len(m)).index_fill_(0, torch.tensor([len(m) - 1]), s) for m, s in zip(masks, SCORES)]
    fields = TensorDict({"response_mask": nested(masks), "rm_scores": nested(rm), "entropy": entropy},
                        batch_size=len(uids))
    fields["uid"] = NonTensorStack.from_list(uids)
    keys = [f"{u}_{i}_0" for i, u in enumerate(uids)]
    meta = tq.kv_batch_put(keys=keys, partition_id=partition, fields=fields,
                           tags=[{"seq_len": len(m)} for m in masks])
    trainer = object.__new__(trainer_sync.PPOTrainerSync)
    trainer.config = OmegaConf.create({"algorithm": {
        "adv_estimator": name, "gamma": 1.0, "lam": 1.0, "norm_adv_by_std_in_grpo": True, "use_kl_in_reward": False,
        name: {k: v for k, v in vars(settings).items()}}, "actor_rollout_ref": {"rollout": {"n": 4}}})
    trainer._signal_run = SignalRun(SIGNALS[name], settings)
    metrics = {}
    out = trainer._compute_advantage(meta, metrics)
    assert "entropy" in out.fields  # verl's own field stays where verl put it
    adv = tq.kv_batch_get(keys=keys, partition_id=partition, select_fields=["advantages"])["advantages"].unbind()
    return adv, metrics, uids


def grpo_of(uids):
    out = []
    for i, u in enumerate(uids):
        s = [SCORES[j] for j, v in enumerate(uids) if v == u]
        mean = sum(s) / len(s)
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (len(s) - 1))
        out.append((SCORES[i] - mean) / (std + 1e-6))
    return out


def test_entropy_adv_uses_the_old_policys_entropy(tq_session, engine, tiny_qwen2):
    data, ids, masks = old_log_prob_batch(tiny_qwen2.config.vocab_size, True, True)
    settings = EntropyAdvSettings(alpha=0.5, kappa=2.0)
    adv, metrics, uids = run_compute_advantage(tq_session, "ent-adv", "entropy_adv", settings,
                                               stored_entropy(engine, data), masks)
    ref_h, grpo = transformers_entropy(tiny_qwen2, ids), grpo_of(uids)
    for i, (a, h, m) in enumerate(zip(adv, ref_h, masks)):
        expect = torch.tensor([grpo[i] + min(0.5 * float(x), abs(grpo[i]) / 2.0) if k else 0.0
                               for x, k in zip(h, m)])
        torch.testing.assert_close(a, expect, rtol=1e-4, atol=1e-5)
    all_h = torch.cat([h[m.bool()] for h, m in zip(ref_h, masks)])
    assert metrics["entropy_adv/entropy_mean"] == pytest.approx(float(all_h.mean()), rel=1e-4)


def test_top_entropy_selects_by_the_old_policys_entropy(tq_session, engine, tiny_qwen2):
    data, ids, masks = old_log_prob_batch(tiny_qwen2.config.vocab_size, True, True)
    ref_h = transformers_entropy(tiny_qwen2, ids)
    pool = sorted(((float(h[t]), i, t) for i, (h, m) in enumerate(zip(ref_h, masks)) for t in range(len(m)) if m[t]),
                  reverse=True)
    # A random tiny model's entropies sit close to log(V): take the share near 0.2 whose threshold
    # has the widest gap, so the engine's float error (~1e-5) cannot swap tokens across it.
    k = max(range(int(0.15 * len(pool)), int(0.3 * len(pool))), key=lambda j: pool[j - 1][0] - pool[j][0])
    assert pool[k - 1][0] - pool[k][0] > 1e-4
    settings = TopEntropySettings(rho=k / len(pool))
    adv, metrics, uids = run_compute_advantage(tq_session, "top-ent", "top_entropy", settings,
                                               stored_entropy(engine, data), masks)
    grpo = grpo_of(uids)
    chosen = {(i, t) for _, i, t in pool[:k]}
    for i, a in enumerate(adv):
        expect = torch.tensor([grpo[i] * len(pool) / k if (i, t) in chosen else 0.0 for t in range(len(masks[i]))])
        torch.testing.assert_close(a, expect, rtol=1e-4, atol=1e-5)
    assert metrics["top_entropy/selected_frac"] == pytest.approx(k / len(pool))
