"""The core tests' oracle: a straightforward per-span-pair SHEAR reference built on POT and numpy.

Written from docs/method.md independently of shear_verl.core: loops over every rollout, span,
opposing rollout and opposing span, exactly as Algorithm 1 reads, with POT for the transport
problems. Slow on purpose; only for small groups.

The engine's inputs are on the CPU, or on the device that SHEAR_TEST_DEVICE names (e.g. cuda: the
same checks of the GPU path against POT; ``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import sys

import numpy as np
import ot
import pytest


def spans(num_tokens: int, span_len: int, stride: int) -> list[tuple[int, int]]:
    if num_tokens == 0:
        return []
    if num_tokens <= span_len:
        return [(0, num_tokens)]
    out = [(st, st + span_len) for st in range(0, num_tokens - span_len + 1, stride)]
    if out[-1][1] < num_tokens:
        out.append((num_tokens - span_len, num_tokens))
    return out


def span_distance(x: np.ndarray, y: np.ndarray, metric: str, epsilon: float) -> float:
    cost = ot.dist(x, y, metric="euclidean")
    if metric == "sinkhorn":
        return float(ot.sinkhorn2(ot.unif(len(x)), ot.unif(len(y)), cost, epsilon, method="sinkhorn_log",
                                  stopThr=1e-13, numItermax=200_000))
    if metric == "w1":
        return float(ot.emd2(ot.unif(len(x)), ot.unif(len(y)), cost))
    if metric == "chamfer":
        return 0.5 * (cost.min(axis=1).mean() + cost.min(axis=0).mean())
    if metric == "mmd":
        sigma = max(np.median(cost), 1e-12)
        k = lambda d: np.exp(-d**2 / (2 * sigma**2))  # noqa: E731
        xx, yy = ot.dist(x, x, metric="euclidean"), ot.dist(y, y, metric="euclidean")
        return float(np.sqrt(max(k(xx).mean() + k(yy).mean() - 2 * k(cost).mean(), 0.0)))
    if metric == "cosine":
        mx, my = x.mean(0), y.mean(0)
        return float(1 - mx @ my / (np.linalg.norm(mx) * np.linalg.norm(my)))
    raise AssertionError(metric)


def token_weights(states: list[np.ndarray], correct: list[bool], *, span_len: int, stride: int, metric: str,
                  epsilon: float, epsilon_mode: str, normalization: str, pooling: str) -> list[np.ndarray]:
    total = sum(np.linalg.norm(h, axis=1).sum() for h in states)
    n_bar = total / sum(len(h) for h in states)
    scaled = [h / n_bar for h in states] if epsilon_mode == "relative" else states
    # distances in hidden-state units are divided by n_bar (already done in relative mode);
    # MMD (median bandwidth) and cosine are scale-free and are not
    divide = n_bar if epsilon_mode == "absolute" and metric in ("sinkhorn", "w1", "chamfer") else 1.0
    out = []
    for i, h in enumerate(scaled):
        opposing = [j for j in range(len(states)) if correct[j] != correct[i] and len(states[j]) > 0]
        if not opposing or len(h) == 0:
            out.append(np.ones(len(h)))
            continue
        acc: list[list[float]] = [[] for _ in range(len(h))]
        for a, b in spans(len(h), span_len, stride):
            d = min(span_distance(h[a:b], scaled[j][c:e], metric, epsilon)
                    for j in opposing for c, e in spans(len(states[j]), span_len, stride)) / divide
            for t in range(a, b):
                acc[t].append(d)
        w = np.array([max(v) if pooling == "max" else np.mean(v) for v in acc])
        if normalization == "rollout":
            w = w / w.mean() if w.mean() > 0 else np.ones_like(w)
        out.append(w)
    return out


@pytest.fixture
def reference():
    """This module (tests import nothing by path under --import-mode=importlib)."""
    return sys.modules[__name__]


@pytest.fixture(params=["numba", "torch"])
def solver_path(request):
    """Both backends of the tiled solver's loops (``shear_verl.core.ot.backend``), passed to the public
    functions' ``backend`` argument: numba's per-problem kernels (host memory) and batched torch
    operations (any device). With SHEAR_TEST_DEVICE=cuda both runs take "torch"."""
    import os

    return "torch" if os.environ.get("SHEAR_TEST_DEVICE", "cpu") != "cpu" else request.param
