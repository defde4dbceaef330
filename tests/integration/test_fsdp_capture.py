"""Hidden-state capture through verl's real FSDP LM-head engine code on CPU.

The engine is verl's FSDP LM-head engine around a plain HF module (the ``fsdp_engine`` fixture);
input packing, remove-padding, dynamic batching, fused-kernel forward (torch backend), output
layout and micro-batch merging are verl's own code.
The reference is transformers' `hidden_states[-1]` of each sequence run alone.
"""

import pytest
import torch
from tensordict import TensorDict

from shear_verl.core import ShearConfig, group_token_weights
from shear_verl.integration.fields import FLAG_KEY
from shear_verl.integration.settings import ShearSettings
from shear_verl.integration.worker import STATS_COLUMNS, STATS_KEY, WEIGHTS_KEY

SETTINGS = ShearSettings(engine=ShearConfig(span_len=4, stride=2, epsilon=0.1), correct_threshold=0.5)


def make_batch(lengths, vocab, *, rmpad, dynamic, fused, flag=True, seed=0, settings=SETTINGS):
    """A worker-side batch as verl's V1 path delivers it: nested (jagged) per-sample fields."""
    g = torch.Generator().manual_seed(seed)
    ids, pos, resp_mask, prompts = [], [], [], []
    for p, r in lengths:
        ids.append(torch.randint(0, vocab, (p + r,), generator=g))
        pos.append(torch.arange(p + r))
        m = torch.ones(r, dtype=torch.int64)
        if r > 6:
            m[2:4] = 0  # a multi-turn "tool" span inside the response
        resp_mask.append(m)
        prompts.append(p)
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    td = TensorDict(
        {
            "input_ids": nested(ids),
            "position_ids": nested(pos),
            "response_mask": nested(resp_mask),
            "loss_mask": nested(resp_mask),
            "rm_scores": nested([torch.zeros(r).index_fill_(0, torch.tensor([r - 1]), float(i % 2))
                                 for i, (_, r) in enumerate(lengths)]),
        },
        batch_size=len(lengths),
    )
    from tensordict import NonTensorStack
    from verl.utils import tensordict_utils as tu

    td["uid"] = NonTensorStack.from_list([f"g{i // 4}" for i in range(len(lengths))])
    non_tensor = dict(
        use_remove_padding=rmpad, use_dynamic_bsz=dynamic, use_fused_kernels=fused,
        max_token_len_per_gpu=48, micro_batch_size_per_gpu=2, calculate_entropy=True,
        temperature=1.0, compute_loss=False,
    )
    if flag:
        non_tensor[FLAG_KEY] = settings.to_json()
    tu.assign_non_tensor(td, **non_tensor)
    return td, ids, prompts


def reference_rows(model, ids, prompts):
    """transformers' last hidden state, row P-1+t for response token t (verl's log-prob shift)."""
    rows = []
    with torch.no_grad():
        for x, p in zip(ids, prompts):
            hs = model(input_ids=x[None], output_hidden_states=True).hidden_states[-1][0]  # [S, H]
            rows.append(hs[p - 1 : x.shape[0] - 1])
    return rows


LENGTHS = [(5, 9), (7, 3), (4, 12), (6, 6), (3, 8), (8, 2), (5, 11), (4, 7)]


@pytest.mark.parametrize("rmpad", [True, False])
@pytest.mark.parametrize("dynamic", [True, False])
def test_captured_rows_equal_transformers_hidden_states(fsdp_engine, tiny_qwen2, rmpad, dynamic):
    from shear_verl.integration.capture import HIDDEN_KEY

    engine = fsdp_engine(tiny_qwen2)
    data, ids, prompts = make_batch(LENGTHS, tiny_qwen2.config.vocab_size, rmpad=rmpad, dynamic=dynamic, fused=False)
    # Stop before the weights step to see the raw capture: call the unwrapped infer path.
    out = type(engine).__dict__["infer_batch"].__wrapped__(engine, data)
    captured = out["model_output"][HIDDEN_KEY].unbind()
    ref = reference_rows(tiny_qwen2, ids, prompts)
    assert len(captured) == len(ref)
    for i, (c, r) in enumerate(zip(captured, ref)):
        assert c.shape == r.shape, f"row {i}"
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-5)
    # and the log-probs verl computed alongside are untouched by the hook
    assert "log_probs" in out["model_output"]


def test_capture_with_fused_kernels_torch_backend(fsdp_engine, tiny_qwen2):
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    from shear_verl.integration.capture import HIDDEN_KEY

    cls = type(tiny_qwen2)
    original_forward = cls.forward
    try:
        patch_forward_with_backends(tiny_qwen2, use_fused_kernels=True, fused_kernels_backend="torch")
        engine = fsdp_engine(tiny_qwen2)
        data, ids, prompts = make_batch(LENGTHS, tiny_qwen2.config.vocab_size, rmpad=True, dynamic=True, fused=True)
        out = type(engine).__dict__["infer_batch"].__wrapped__(engine, data)
    finally:
        cls.forward = original_forward
    ref = reference_rows(tiny_qwen2, ids, prompts)
    for c, r in zip(out["model_output"][HIDDEN_KEY].unbind(), ref):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-5)


def test_unflagged_pass_is_verls_own(fsdp_engine, tiny_qwen2):
    """Ref / update passes (no flag): no capture, no extra fields, same log-probs."""
    engine = fsdp_engine(tiny_qwen2)
    flagged, _, _ = make_batch(LENGTHS, tiny_qwen2.config.vocab_size, rmpad=True, dynamic=True, fused=False)
    plain, _, _ = make_batch(LENGTHS, tiny_qwen2.config.vocab_size, rmpad=True, dynamic=True, fused=False, flag=False)
    out_plain = engine.infer_batch(plain)
    out_flag = engine.infer_batch(flagged)
    assert set(out_plain["model_output"]) == {"log_probs", "entropy"}
    assert set(out_flag["model_output"]) == {"log_probs", "entropy", WEIGHTS_KEY, STATS_KEY}
    for a, b in zip(out_plain["model_output"]["log_probs"].unbind(), out_flag["model_output"]["log_probs"].unbind()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dynamic", [True, False])
def test_worker_weights_equal_group_token_weights(fsdp_engine, tiny_qwen2, dynamic):
    """Weights from the engine == group_token_weights on transformers' states of the masked tokens."""
    engine = fsdp_engine(tiny_qwen2)
    data, ids, prompts = make_batch(LENGTHS, tiny_qwen2.config.vocab_size, rmpad=True, dynamic=dynamic, fused=False)
    out = engine.infer_batch(data)
    got = out["model_output"][WEIGHTS_KEY].unbind()
    ref = reference_rows(tiny_qwen2, ids, prompts)
    masks = [m.bool() for m in data["response_mask"].unbind()]
    correct = [bool(i % 2) for i in range(len(LENGTHS))]  # rm_scores put i % 2 on the last token
    for g0 in range(0, len(LENGTHS), 4):
        members = range(g0, g0 + 4)
        expect = group_token_weights([ref[i][masks[i]] for i in members], [correct[i] for i in members],
                                     SETTINGS.engine)
        for i, w in zip(members, expect):
            assert got[i].shape == masks[i].shape
            torch.testing.assert_close(got[i][masks[i]], w, rtol=1e-3, atol=1e-5)
            assert torch.all(got[i][~masks[i]] == 0)
    stats = out["model_output"][STATS_KEY]
    assert stats.shape == (len(LENGTHS), len(STATS_COLUMNS)) and stats[:, 0].sum() > 0  # Sinkhorn problems were solved


def test_offload_to_host_memory_gives_the_same_weights(fsdp_engine, tiny_qwen2):
    """algorithm.shear.offload_to_cpu: captured rows wait in host memory; the weights do not change."""
    import dataclasses

    engine = fsdp_engine(tiny_qwen2)
    kept, _, _ = make_batch(LENGTHS, tiny_qwen2.config.vocab_size, rmpad=True, dynamic=True, fused=False)
    offloaded, _, _ = make_batch(LENGTHS, tiny_qwen2.config.vocab_size, rmpad=True, dynamic=True, fused=False,
                                 settings=dataclasses.replace(SETTINGS, offload_to_cpu=True))
    a = engine.infer_batch(kept)["model_output"][WEIGHTS_KEY].unbind()
    b = engine.infer_batch(offloaded)["model_output"][WEIGHTS_KEY].unbind()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_stats_carry_n_bar_of_the_captured_states_and_the_capture_size(fsdp_engine, tiny_qwen2):
    """The stats the driver turns into shear/n_bar, shear/epsilon_raw and shear/capture_mb, against
    transformers' states of the same tokens."""
    from shear_verl.integration.driver import shear_metrics
    from shear_verl.integration.worker import COL, sequence_scores

    engine = fsdp_engine(tiny_qwen2)
    data, ids, prompts = make_batch(LENGTHS, tiny_qwen2.config.vocab_size, rmpad=True, dynamic=True, fused=False)
    out = engine.infer_batch(data)["model_output"]
    stats = out[STATS_KEY]
    ref = reference_rows(tiny_qwen2, ids, prompts)  # [resp_i, H] each
    masks = [m.bool() for m in data["response_mask"].unbind()]
    n_bars = [torch.cat([ref[i][masks[i]] for i in range(g0, g0 + 4)]).norm(dim=1).mean().item()
              for g0 in range(0, len(LENGTHS), 4)]  # every group of LENGTHS holds both outcomes
    captured_mb = sum(r.numel() * r.element_size() for r in ref) / 2**20  # every response row, float32
    assert torch.all(stats[:, COL["capture_mb"]] == stats[0, COL["capture_mb"]])
    assert stats[0, COL["capture_mb"]].item() == pytest.approx(captured_mb, rel=1e-6)
    weights = torch.nn.utils.rnn.pad_sequence(list(out[WEIGHTS_KEY].unbind()), batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence(masks, batch_first=True)
    uids = [str(u) for u in data["uid"]]
    m = shear_metrics(weights, mask, sequence_scores(data["rm_scores"]), uids, stats, SETTINGS.correct_threshold)
    assert m["shear/n_bar"] == pytest.approx(sum(n_bars) / len(n_bars), rel=1e-4)
    assert m["shear/epsilon_raw"] == pytest.approx(SETTINGS.engine.epsilon * m["shear/n_bar"], rel=1e-5)
    assert m["shear/capture_mb"] == pytest.approx(captured_mb, rel=1e-6)


def test_capture_budget_stops_the_pass_naming_the_knobs(fsdp_engine, tiny_qwen2):
    import dataclasses

    engine = fsdp_engine(tiny_qwen2)
    tight = dataclasses.replace(SETTINGS, max_capture_mb=0.001)  # ~1 KB: the first micro-batch passes it
    data, _, _ = make_batch(LENGTHS, tiny_qwen2.config.vocab_size, rmpad=True, dynamic=True, fused=False,
                            settings=tight)
    with pytest.raises(RuntimeError, match=r"max_capture_mb=0\.001.*offload_to_cpu=true.*micro_batch"):
        engine.infer_batch(data)
    roomy, _, _ = make_batch(LENGTHS, tiny_qwen2.config.vocab_size, rmpad=True, dynamic=True, fused=False,
                             settings=dataclasses.replace(SETTINGS, max_capture_mb=64))
    assert WEIGHTS_KEY in engine.infer_batch(roomy)["model_output"]
