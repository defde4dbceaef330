"""Hidden-Align through verl's real FSDP LM-head engine training path on CPU
(`forward_backward_batch(forward_only=False)`: packing, remove-padding or not, forward, verl's loss
call, backward), as test_fsdp_capture.py builds the engine: `object.__new__` with a plain HF module
(FSDP sharding needs an accelerator or a full worker here; it does not change forward outputs).
The reference is transformers' `hidden_states[-1]` of each sequence run alone, and the loss of
the module's equation written out below; the gradient is read on the decoder output itself."""

import math
from types import SimpleNamespace

import pytest
import torch
from tensordict import NonTensorStack, TensorDict

from shear_verl.baselines.hidden_align import HiddenAlignSettings
from shear_verl.integration import patches
from shear_verl.integration.align_hooks import ENGINE_ATTR, HiddenAlignRun

# (prompt, response) lengths; groups of 4: g0 has 3 correct (rows 0, 1, 3), g1 one (row 4)
LENGTHS = [(5, 9), (7, 3), (4, 12), (6, 6), (3, 8), (8, 2), (5, 11), (4, 7)]
SCORES = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
MARKER = (11, 12)


@pytest.fixture()
def engine_cls(monkeypatch, gloo_world):
    import verl.utils.seqlen_balancing as seqlen_balancing
    import verl.workers.engine.fsdp.transformer_impl as impl

    patches.install()
    monkeypatch.setattr(impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(impl, "get_device_name", lambda: "cpu")
    monkeypatch.setattr(seqlen_balancing, "get_device_name", lambda: "cpu")
    return impl.FSDPEngineWithLMHead


@pytest.fixture()
def model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      attn_implementation="sdpa", tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).train()


def make_engine(cls, module, settings):
    import verl.utils.torch_functional as verl_F

    engine = object.__new__(cls)
    engine.module = module
    engine.ulysses_sequence_parallel_size = 1
    engine.use_ulysses_sp = False
    engine.ulysses_device_mesh = None
    engine.pad_to_length = False
    engine.pad_to_length_bucket = 1
    engine._autocast_dtype = torch.float32
    engine.scaler = None
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False,
                                           use_no_sync_for_gradient_accumulation=True)
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    setattr(engine, ENGINE_ATTR, HiddenAlignRun(settings, MARKER, rollout_n=4))
    return engine


def make_batch(vocab, rmpad, marker_rows=()):
    g = torch.Generator().manual_seed(1)
    ids, mask = [], []
    for row, (p, r) in enumerate(LENGTHS):
        x = torch.randint(20, vocab, (p + r,), generator=g)  # no accidental marker (ids 11, 12)
        if row in marker_rows:
            x[p + 4:p + 6] = torch.tensor(MARKER)  # the marker at response tokens 4, 5: anchor token 3
        ids.append(x)
        mask.append(torch.ones(r, dtype=torch.int64))
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    td = TensorDict({
        "input_ids": nested(ids), "position_ids": nested([torch.arange(len(x)) for x in ids]),
        "response_mask": nested(mask), "loss_mask": nested(mask),
        "rm_scores": nested([torch.zeros(r).index_fill_(0, torch.tensor([r - 1]), s)
                             for (_, r), s in zip(LENGTHS, SCORES)]),
    }, batch_size=len(LENGTHS))
    from verl.utils import tensordict_utils as tu

    td["uid"] = NonTensorStack.from_list([f"g{i // 4}" for i in range(len(LENGTHS))])
    tu.assign_non_tensor(td, use_remove_padding=rmpad, use_dynamic_bsz=False, use_fused_kernels=False,
                         micro_batch_size_per_gpu=len(LENGTHS), calculate_entropy=False, temperature=1.0,
                         global_batch_size=len(LENGTHS))
    return td, ids


def zero_policy_loss(model_output, data, dp_group=None):
    """Stands in for verl's ppo_loss: 0 but attached, so only the alignment term drives the gradient."""
    return model_output["log_probs"].values().sum() * 0.0, {}


def run_update(engine, model, data):
    """verl's training forward/backward; returns the decoder output (with .grad) and verl's output."""
    from shear_verl.integration.capture import find_decoder

    seen = []

    def keep(_m, _i, out):
        out.last_hidden_state.retain_grad()
        seen.append(out.last_hidden_state)

    handle = find_decoder(model).register_forward_hook(keep)
    try:
        out = engine.forward_backward_batch(data, loss_function=zero_policy_loss, forward_only=False)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0], out


def reference_loss(model, ids, anchors, members, n_groups):
    """(1 / G) * mean_{i<j} (1 - cos(h_i, h_j)) over the one qualifying group, h from transformers."""
    with torch.no_grad():
        h = {i: model(input_ids=ids[i][None], output_hidden_states=True).hidden_states[-1][0, anchors[i]]
             for i in members}
    pairs = [(a, b) for k, a in enumerate(members) for b in members[k + 1:]]
    return sum(1 - float(torch.nn.functional.cosine_similarity(h[a], h[b], dim=0)) for a, b in pairs) \
        / len(pairs) / n_groups


def grad_rows(hidden, rmpad):
    """Sequence positions whose decoder output got a nonzero gradient, per row."""
    per_row = []
    starts = [0]
    for p, r in LENGTHS:
        starts.append(starts[-1] + p + r)
    for i, (p, r) in enumerate(LENGTHS):
        g = hidden.grad[0, starts[i]:starts[i + 1]] if rmpad else hidden.grad[i, :p + r]  # [S_i, H]
        per_row.append(set((g.abs().sum(-1) > 0).nonzero().flatten().tolist()))
    return per_row


@pytest.mark.parametrize("rmpad", [True, False])
def test_gradient_flows_only_through_correct_rollouts_anchor_states(engine_cls, model, rmpad):
    settings = HiddenAlignSettings(coef=1.0, fallback="last")
    engine = make_engine(engine_cls, model, settings)
    data, ids = make_batch(model.config.vocab_size, rmpad, marker_rows=(0,))
    hidden, out = run_update(engine, model, data)
    # anchors: row 0 the token before its marker (response token 3), the others their last token
    anchors = {i: p + (3 if i == 0 else r - 1) for i, (p, r) in enumerate(LENGTHS)}
    rows = grad_rows(hidden, rmpad)
    for i in range(len(LENGTHS)):
        expect = {anchors[i]} if i in (0, 1, 3) else set()  # g1 has a single correct rollout: no pair
        assert rows[i] == expect, f"row {i}"
    assert model.model.norm.weight.grad is not None and model.model.norm.weight.grad.abs().sum() > 0
    metrics = out["metrics"]
    loss = metrics["hidden_align/loss"]
    value = float(loss[0].values[0] if isinstance(loss, list) else loss.values[0])
    assert value == pytest.approx(reference_loss(model, ids, anchors, [0, 1, 3], n_groups=2), rel=1e-4)


def test_no_group_with_two_correct_rollouts_gives_zero_loss_and_no_gradient(engine_cls, model):
    global SCORES
    engine = make_engine(engine_cls, model, HiddenAlignSettings(coef=1.0))
    saved = SCORES
    try:
        SCORES = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # one correct rollout per group
        data, _ = make_batch(model.config.vocab_size, rmpad=True)
        hidden, out = run_update(engine, model, data)
    finally:
        SCORES = saved
    assert all(not r for r in grad_rows(hidden, rmpad=True))
    loss = out["metrics"]["hidden_align/loss"]
    assert float(loss[0].values[0] if isinstance(loss, list) else loss.values[0]) == 0.0
    assert math.isfinite(float(model.model.norm.weight.grad.abs().sum()))
