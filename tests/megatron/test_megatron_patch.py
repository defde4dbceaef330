"""`patch_megatron_engine` on verl 0.9.1's real `MegatronEngineWithLMHead`, its guards, and the
start-up refusals of configurations the capture cannot serve."""

import inspect
from types import ModuleType, SimpleNamespace

import pytest
import torch
from tensordict import TensorDict

from shear_verl.integration import megatron_capture
from shear_verl.integration.fields import FLAG_KEY
from shear_verl._patching import is_patched
from shear_verl.integration import patches
from shear_verl.integration.patches import UnsupportedVerlError


@pytest.fixture(scope="module")
def impl():
    import verl.workers.engine.megatron.transformer_impl as impl

    patches.patch_megatron_engine(impl)
    return impl


def test_patch_wraps_verls_methods(impl):
    cls = impl.MegatronEngineWithLMHead
    forward_step, infer_batch = cls.__dict__["forward_step"], cls.__dict__["infer_batch"]
    assert is_patched(forward_step) and is_patched(infer_batch)
    assert list(inspect.signature(forward_step.__wrapped__).parameters) == [
        "self", "batch_iter", "model", "logits_processor_func", "postprocess_micro_batch_func"]
    assert infer_batch.__wrapped__ is impl.BaseEngine.infer_batch
    patches.patch_megatron_engine(impl)  # idempotent: no second layer
    assert cls.__dict__["forward_step"] is forward_step and cls.__dict__["infer_batch"] is infer_batch
    # the value-head engine keeps its own forward_step
    assert not is_patched(impl.MegatronEngineWithValueHead.__dict__["forward_step"])


def _fake_module(forward_step):
    module = ModuleType("fake_transformer_impl")

    class BaseEngine:
        def infer_batch(self, data, loss_function=None):
            return None

    module.BaseEngine = BaseEngine
    module.MegatronEngineWithLMHead = type("MegatronEngineWithLMHead", (BaseEngine,), {"forward_step": forward_step})
    return module


def test_patch_refuses_changed_signature():
    def forward_step(self, batch, model, logits_processor_func, postprocess_micro_batch_func):
        pass

    with pytest.raises(UnsupportedVerlError, match="forward_step: expected parameters"):
        patches.patch_megatron_engine(_fake_module(forward_step))


@pytest.mark.parametrize("version", ["0.15.2", "0.18.0", "1.0.0"])
def test_megatron_core_version_guard(monkeypatch, version):
    import megatron.core.package_info as info

    monkeypatch.setattr(info, "__version__", version)
    with pytest.raises(UnsupportedVerlError, match=r"megatron-core >=0\.16,<0\.18 .*found megatron-core " + version):
        patches.patch_megatron_engine(_fake_module(lambda self, batch_iter, model, a, b: None))


def test_installed_megatron_core_is_supported():
    assert megatron_capture.check_megatron_core_version().startswith("0.16.")


# ----------------------------------------------------------------------------- start-up refusals
def _engine(impl, chunks=None, vision=False, **engine_cfg):
    from verl.workers.config import McoreEngineConfig

    engine = object.__new__(impl.MegatronEngineWithLMHead)
    engine.engine_config = McoreEngineConfig(**engine_cfg)
    hf_config = SimpleNamespace(architectures=["Qwen2ForCausalLM"])
    if vision:
        hf_config.vision_config = SimpleNamespace()
    engine.model_config = SimpleNamespace(hf_config=hf_config)
    engine.module = chunks or []
    return engine


def _batch(flag: bool):
    from verl.utils import tensordict_utils as tu

    td = TensorDict({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, batch_size=2)
    if flag:
        tu.assign_non_tensor(td, **{FLAG_KEY: "{}"})
    return td


def _last_stage_chunk(final_layernorm):
    """A last-stage model chunk as megatron-core builds it: `decoder.final_layernorm` is None on a
    stage without the final norm (TransformerBlock.has_final_layernorm_in_this_stage)."""
    chunk = torch.nn.Module()
    chunk.post_process = True
    chunk.decoder = torch.nn.Module()
    chunk.decoder.final_layernorm = final_layernorm
    return chunk


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dynamic_context_parallel=True, max_seqlen_per_dp_cp_rank=1024), "dynamic_context_parallel=False"),
        (dict(vision=True, use_remove_padding=False), "use_remove_padding=True"),
        (dict(chunks=[_last_stage_chunk(None)]), "multi-token prediction in its own pipeline stage"),
    ],
    ids=["dynamic_cp", "vlm_bshd", "mtp_own_stage"],
)
def test_unsupported_configs_refused_on_the_flagged_pass(impl, kwargs, message):
    engine = _engine(impl, **kwargs)
    with pytest.raises(ValueError, match=message):
        engine.infer_batch(_batch(flag=True))
    # the ref / update passes never carry the flag and are not SHEAR's business: verl's own
    # infer_batch runs (stood in for here, since no Megatron model exists in this process)
    calls = []
    out = megatron_capture.megatron_infer_batch(engine, lambda data: calls.append(data) or {}, _batch(flag=False))
    assert out == {} and len(calls) == 1


def test_supported_config_passes_the_check(impl):
    engine = _engine(impl, chunks=[_last_stage_chunk(torch.nn.RMSNorm(4))], context_parallel_size=2)
    megatron_capture.check_engine_config(engine)  # no exception
