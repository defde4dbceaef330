"""Test helpers for the Megatron capture: multi-process gloo launcher and megatron-core's CPU redirects.

megatron-core 0.16.1 assumes CUDA in a few places that have nothing to do with what is tested
here; `install_cpu_redirects` points them at the CPU. It lives only in the tests, never in the
product, and is installed inside the worker processes (megatron_capture_worker.py), never in the
pytest process.
"""

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("megatron_capture_worker.py")


def install_cpu_redirects() -> None:
    """Let megatron-core 0.16.1 run a forward on CPU with gloo (test processes only)."""
    from torch.overrides import TorchFunctionMode

    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    # Buffers in megatron's SP gather and pipeline schedule are allocated on
    # `torch.cuda.current_device()` or device="cuda": send them to the CPU.
    torch.cuda.current_device = lambda: "cpu"

    class _CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            device = kwargs.get("device")
            if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    _CudaToCpu().__enter__()  # for the life of the worker process

    # The CUDA RNG tracker only seeds dropout; the models here run in eval mode without dropout.
    class _NoRngTracker:
        def fork(self, *args, **kwargs):
            return contextlib.nullcontext()

    tensor_parallel.get_cuda_rng_tracker = lambda *args, **kwargs: _NoRngTracker()

    # verl passes BSHD padding masks as [b, s] booleans (True = token) for TransformerEngine's
    # padding-causal attention; megatron's local (CPU) attention takes a [b, 1, s, s] "masked out"
    # mask and has no causal default off-GPU. Translate, so the local attention is padding-causal too.
    orig_forward = DotProductAttention.forward

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        sq, sk = query.shape[0], key.shape[0]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).triu(1)[None, None]  # [1, 1, sq, sk]
        if attention_mask is not None:
            mask = mask | ~attention_mask.bool()[:, None, None, :]  # [b, 1, sq, sk]
        return orig_forward(self, query, key, value, mask, *args, **kwargs)

    DotProductAttention.forward = forward

    # Without Apex / TransformerEngine the norms are plain torch norms, which refuse sequence
    # parallelism only because they cannot sync their weight gradients across TP ranks; a norm is
    # per-token, so the forward (all that runs here) is the same: build them as without SP.
    orig_new = WrappedTorchNorm.__new__

    def new(cls, config, *args, **kwargs):
        config = copy.copy(config)
        config.sequence_parallel = False
        return orig_new(cls, config, *args, **kwargs)

    WrappedTorchNorm.__new__ = new


def run_ranks(tmp_path: Path, scenario: str, world_size: int) -> list[dict]:
    """Per-rank results of `megatron_capture_worker.py scenario` on world_size gloo processes."""
    from verl.utils.net_utils import get_free_port  # verl's own helper

    port = str(get_free_port("127.0.0.1")[0])
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, VERL_PLATFORM="cpu", OMP_NUM_THREADS="1")
        out = tmp_path / f"{scenario}-{world_size}-rank{rank}.pt"
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"{scenario} rank {rank}/{world_size} failed:\n{log[-6000:]}"
    return [torch.load(tmp_path / f"{scenario}-{world_size}-rank{r}.pt", weights_only=False)
            for r in range(world_size)]


# One launch per world size, shared by the test files (process start-up dominates the run time).
@pytest.fixture(scope="session")
def world2(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("megatron_world2"), "unshard,engine", 2)


@pytest.fixture(scope="session")
def world4(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("megatron_world4"), "unshard", 4)
