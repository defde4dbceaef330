"""Fixtures for the verl-integration tests: a tiny random Qwen2 and a 1-process gloo group."""

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


@pytest.fixture(scope="session")
def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        attn_implementation="sdpa", tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    return model


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
