"""The backend of the tiled solver's loops, chosen once by the caller (``weights.group_token_weights``).

"numba": per-problem kernels compiled by numba (``fused``), host memory only; "torch": batched torch
operations, any device (the path for GPUs). Both run the same iterations (checked to rounding by the
tests in tests/core).
"""

from __future__ import annotations

import torch

BACKENDS = ("numba", "torch")


def default_backend(t: torch.Tensor) -> str:
    """The faster backend for tensors like t: numba's kernels in host memory, torch elsewhere."""
    return "numba" if t.device.type == "cpu" else "torch"


def check_backend(backend: str, t: torch.Tensor) -> str:
    """backend, if it can run on tensors like t; a clear error otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numba" and t.device.type != "cpu":
        raise ValueError(f"backend 'numba' runs on host memory only, the tensors are on {t.device}")
    return backend
