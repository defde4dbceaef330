"""OAR-G's worker-side saliency: against central finite differences of the paper's objective on a
tiny float64 GPT-2 (written here from the equations, calling the model with `inputs_embeds`);
under FSDP1 and FSDP2 (gloo, CPU, world size 1) equal to the plain model's, no parameter gradient
formed; and through verl's real FSDP LM-head engine `infer_batch` (as test_entropy_signal.py builds it), rows in
the batch's order and response coordinates."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from shear_verl.baselines.oar_g import OarGSettings
from shear_verl.integration import patches
from shear_verl.integration.fields import OAR_FLAG, OAR_REASONING_KEY, OAR_SALIENCY_KEY, OAR_STATS_KEY
from shear_verl.integration.saliency import answer_span, input_gradient_saliency

PROMPT, ANSWER_START, END = 4, 10, 14  # reasoning tokens [4, 10), answer [10, 14)


@pytest.fixture(scope="module")
def model64():
    # GPT-2, not Qwen2: Qwen2's RMSNorm and rotary embedding compute in float32 even in a float64
    # model, GPT-2's LayerNorm / learned positions / eager attention stay in float64.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=53, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg).double().eval()
    for p in model.parameters():  # larger weights than the init: answer distributions far from uniform
        p.data.mul_(4.0)
    return model


def objective(model, ids, embeds, target):
    """The paper's J on input embeddings `embeds` [L, H], against the clean sequence's answer distribution."""
    def answer_logits(e):
        return model(inputs_embeds=e[None], use_cache=False).logits[0]  # [L, V]

    def phi(logits):
        lp = F.log_softmax(logits[ANSWER_START - 1 : END - 1], dim=-1)  # rows predicting the answer tokens
        return lp[torch.arange(END - ANSWER_START), ids[ANSWER_START:END]].mean()

    def dist(logits):
        if target == "last":
            return logits[ANSWER_START - 1]
        return logits[ANSWER_START - 1 : END - 1].mean(0)

    clean = answer_logits(model.get_input_embeddings()(ids))
    if target == "answer_joint":
        return phi(clean) - phi(answer_logits(embeds))
    p0 = F.softmax(dist(clean), -1)
    return (p0 * (torch.log(p0 + 1e-12) - F.log_softmax(dist(answer_logits(embeds)), -1))).sum()


@pytest.mark.parametrize("target, noise_std", [("answer_mean", 0.05), ("last", 0.05), ("answer_joint", 0.0)])
def test_saliency_equals_finite_differences(model64, target, noise_std):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 53, (END,), generator=g)
    noise = torch.randn(ANSWER_START - PROMPT, 32, generator=g, dtype=torch.float64) * noise_std
    got = input_gradient_saliency(model64, ids, PROMPT, ANSWER_START, END, target, noise if noise_std else None)
    clean = model64.get_input_embeddings()(ids).detach()  # [L, H]
    noisy = clean.clone()
    noisy[PROMPT:ANSWER_START] += noise
    h = 1e-5
    with torch.no_grad():
        fd = []
        for t in range(PROMPT, ANSWER_START):  # d/dh J(e + xi + h e_t) at h = 0 = <dJ/de_t, e_t>
            step = torch.zeros_like(clean)
            step[t] = h * clean[t]
            fd.append(float(objective(model64, ids, noisy + step, target) - objective(model64, ids, noisy - step,
                                                                                        target)) / (2 * h))
    ref = torch.tensor(fd, dtype=torch.float64).abs()
    assert ref.max() > 1e-6  # the check is not vacuous
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7 * float(ref.max()))


def fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({GPT2Block}),
                                    device_id=torch.device("cpu"))


def fsdp2(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    for layer in model.transformer.h:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


@pytest.mark.parametrize("wrap", [fsdp1, fsdp2])
def test_under_fsdp_no_parameter_gradient(model64, gloo_world, wrap):
    ids = torch.randint(0, 53, (END,), generator=torch.Generator().manual_seed(3))
    ref = input_gradient_saliency(model64, ids, PROMPT, ANSWER_START, END, "answer_joint")
    sharded = wrap(copy.deepcopy(model64))
    for _ in range(2):  # FSDP's state is back to normal after the input-gradient pass
        got = input_gradient_saliency(sharded, ids, PROMPT, ANSWER_START, END, "answer_joint")
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-12)
    assert all(p.grad is None for p in sharded.parameters())


class CharTokenizer:
    """A tokenizer whose token i decodes to chr(65 + i) (letters 'A'...), for the answer-marker search."""

    all_special_ids = [0]

    def decode(self, ids, **_):
        return "".join(chr(65 + i) for i in ids)


def test_answer_span_finds_the_last_marker():
    tok = CharTokenizer()
    ids = [5, 6, 1, 2, 7, 1, 2, 3, 0, 0]  # "FGBCHBCD" + two specials; marker "BC" last at token 5
    assert answer_span(ids, tok.decode, "BC", tok.all_special_ids, "uniform", 3) == (5, 8, True)
    assert answer_span(ids, tok.decode, "ZZ", tok.all_special_ids, "uniform", 3) == (None, 8, False)
    assert answer_span(ids, tok.decode, "ZZ", tok.all_special_ids, "tail", 3) == (5, 8, False)
    assert answer_span([1, 2, 9], tok.decode, "BC", tok.all_special_ids, "tail", 3) == (None, 3, True)


LENGTHS = [(5, 9), (7, 3), (4, 12), (6, 6)]  # (prompt, response)


def test_infer_batch_writes_the_saliency_of_each_row(monkeypatch, gloo_world, tiny_qwen2):
    """verl's FSDP engine's infer_batch (real packing / dynamic batching) with the oar_g flag."""
    from types import SimpleNamespace

    import verl.utils.seqlen_balancing as seqlen_balancing
    import verl.utils.torch_functional as verl_F
    import verl.workers.engine.fsdp.transformer_impl as impl
    from verl.utils import tensordict_utils as tu

    patches.install()
    monkeypatch.setattr(impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(impl, "get_device_name", lambda: "cpu")
    monkeypatch.setattr(seqlen_balancing, "get_device_name", lambda: "cpu")
    engine = object.__new__(impl.FSDPEngineWithLMHead)
    engine.module = tiny_qwen2
    engine.ulysses_sequence_parallel_size, engine.use_ulysses_sp, engine.ulysses_device_mesh = 1, False, None
    engine.pad_to_length, engine.pad_to_length_bucket = False, 1
    engine._autocast_dtype, engine.scaler = torch.float32, None
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False,
                                           use_no_sync_for_gradient_accumulation=True)
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    engine.model_config = SimpleNamespace(tokenizer=CharTokenizer())

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, tiny_qwen2.config.vocab_size, (p + r,), generator=g) for p, r in LENGTHS]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    masks = [torch.ones(r, dtype=torch.int64) for _, r in LENGTHS]
    masks[2][3:5] = 0  # a tool span inside the reasoning
    td = TensorDict({"input_ids": nested(ids), "position_ids": nested([torch.arange(len(x)) for x in ids]),
                     "response_mask": nested(masks), "loss_mask": nested(masks)}, batch_size=len(ids))
    settings = OarGSettings(target="answer_joint", noise_std=0.0, answer_marker="", no_marker="tail", tail_tokens=4)
    tu.assign_non_tensor(td, use_remove_padding=True, use_dynamic_bsz=True, use_fused_kernels=False,
                         max_token_len_per_gpu=24, micro_batch_size_per_gpu=2, calculate_entropy=False,
                         temperature=1.0, compute_loss=False, **{OAR_FLAG: settings.to_json()})
    out = engine.infer_batch(td)["model_output"]
    assert all(p.grad is None for p in tiny_qwen2.parameters())
    stats = out[OAR_STATS_KEY]
    for row, ((p, r), x, m) in enumerate(zip(LENGTHS, ids, masks)):
        sal, keep = out[OAR_SALIENCY_KEY][row], out[OAR_REASONING_KEY][row]
        assert sal.shape == (r,) and keep.shape == (r,)
        if r - 4 < 1:  # no reasoning token left before the 4-token answer
            assert stats[row, 0] == 0 and not keep.any() and not sal.any()
            continue
        expect = torch.zeros(r)
        expect[: r - 4] = input_gradient_saliency(tiny_qwen2, x, p, p + r - 4, p + r, "answer_joint")
        expect_keep = torch.zeros(r)
        expect_keep[: r - 4] = m[: r - 4].float()
        torch.testing.assert_close(keep, expect_keep)
        torch.testing.assert_close(sal, expect * expect_keep, rtol=1e-5, atol=1e-9)
        assert stats[row, 0] == 1 and sal[: r - 4][m[: r - 4].bool()].gt(0).all()
    assert json.loads(settings.to_json())["tail_tokens"] == 4
