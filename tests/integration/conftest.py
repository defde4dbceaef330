"""Fixtures for the verl-integration tests: a tiny random Qwen2, a 1-process gloo group, and verl's
FSDP LM-head engine around a plain module."""

import os

import pytest
import torch


def _free_port() -> int:
    from verl.utils.net_utils import get_free_port  # verl's own helper; imported late, as verl is heavy

    return get_free_port("127.0.0.1")[0]


@pytest.fixture()
def free_port() -> int:
    """A free TCP port on localhost (for a gloo rendezvous)."""
    return _free_port()


@pytest.fixture(scope="session")
def gloo_world():
    """torch.distributed on gloo with world size 1 (verl's engine all-reduces over the DP group)."""
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    yield


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        attn_implementation="sdpa", tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_qwen2():
    """A random 2-layer Qwen2 in eval mode, shared by the session (tests must not train it)."""
    return _tiny_qwen2().eval()


@pytest.fixture()
def trainable_qwen2():
    """The same tiny Qwen2 (same seed), a fresh copy in train mode for tests that take gradients."""
    return _tiny_qwen2().train()


def fsdp_engine_around(module):
    """verl's FSDPEngineWithLMHead around a plain HF module, built with ``object.__new__`` and the
    attributes its forward reads: FSDP sharding does not change forward outputs, and FSDP1/2 need an
    accelerator or a full worker to build here; the packing, remove-padding, dynamic batching and
    output layout are verl's own code. (Also imported by the multi-process workers.)"""
    from types import SimpleNamespace

    import verl.utils.torch_functional as verl_F
    import verl.workers.engine.fsdp.transformer_impl as impl

    engine = object.__new__(impl.FSDPEngineWithLMHead)
    engine.module = module
    engine.ulysses_sequence_parallel_size, engine.use_ulysses_sp, engine.ulysses_device_mesh = 1, False, None
    engine.pad_to_length, engine.pad_to_length_bucket = False, 1
    engine._autocast_dtype, engine.scaler = torch.float32, None
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False,
                                           use_no_sync_for_gradient_accumulation=True)
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    return engine


@pytest.fixture()
def fsdp_engine(monkeypatch, gloo_world):
    """make(module) -> ``fsdp_engine_around(module)``, with verl's device lookup pointed at the CPU
    (stock verl has no CPU platform)."""
    import verl.utils.seqlen_balancing as seqlen_balancing
    import verl.workers.engine.fsdp.transformer_impl as impl

    from shear_verl.integration import patches

    patches.install()  # idempotent; the plugin normally does this on `import verl`
    monkeypatch.setattr(impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(impl, "get_device_name", lambda: "cpu")
    monkeypatch.setattr(seqlen_balancing, "get_device_name", lambda: "cpu")
    return fsdp_engine_around


@pytest.fixture(scope="module")
def tq_session():
    """A local Ray and verl's transfer queue (what the V1 trainer's _compute_advantage reads), per module."""
    import ray
    import transfer_queue as tq
    from omegaconf import OmegaConf

    ray.init(address="local", num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()
