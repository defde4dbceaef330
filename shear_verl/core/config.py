"""Configuration and counters of the SHEAR weight engine (docs/method.md)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

METRICS = ("sinkhorn", "w1", "chamfer", "mmd", "cosine")
EPSILON_MODES = ("relative", "absolute")
NORMALIZATIONS = ("group", "rollout")
POOLINGS = ("max", "mean")
COMPUTE_DTYPES = ("float32", "float64")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"ShearConfig.{name}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ShearConfig.{name}={value!r} must be an integer >= {minimum}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"ShearConfig.{name}={value!r} must be a finite number > 0")


@dataclasses.dataclass(frozen=True)
class ShearConfig:
    """Knobs of Algorithm 1. Defaults are the paper's (w=100, s=25) and this project's (spec section 4).

    epsilon is the Sinkhorn regularisation: in units of the group's mean hidden-state norm when
    epsilon_mode="relative" (weights then do not depend on the model's hidden-state scale), in raw
    hidden-state units when "absolute" (the paper's eps ~= 4.5 for Qwen2.5-Math-7B).
    tol is the Sinkhorn stopping threshold on the L2 errors of both marginals (POT's stopThr tests
    the columns, its rows being exact; over-relaxed or accelerated rows are not); max_iter caps the
    iterations, and capped problems are counted in ShearStats.
    memory_budget_mb bounds the engine's working memory (distance blocks + solver batches), not
    the caller's input tensors, nor their copy in compute_dtype when they come in another dtype
    (e.g. bf16 states on a GPU).
    """

    span_len: int = 100
    stride: int = 25
    metric: str = "sinkhorn"
    epsilon: float = 0.05
    epsilon_mode: str = "relative"
    normalization: str = "group"
    pooling: str = "max"
    tol: float = 1e-6
    max_iter: int = 2000
    prune: bool = True
    memory_budget_mb: float = 1024.0
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_int("span_len", self.span_len, 1)
        _check_int("stride", self.stride, 1)
        if self.stride > self.span_len:
            raise ValueError(
                f"ShearConfig.stride={self.stride} must be <= span_len={self.span_len}, "
                "otherwise tokens between spans belong to no span"
            )
        _check_choice("metric", self.metric, METRICS)
        _check_positive("epsilon", self.epsilon)
        _check_choice("epsilon_mode", self.epsilon_mode, EPSILON_MODES)
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_positive("tol", self.tol)
        _check_int("max_iter", self.max_iter, 1)
        if not isinstance(self.prune, bool):
            raise ValueError(f"ShearConfig.prune={self.prune!r} must be True or False")
        _check_positive("memory_budget_mb", self.memory_budget_mb)
        _check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], ignore: Iterable[str] = ()) -> ShearConfig:
        """Build from a dict / OmegaConf mapping (e.g. verl's ``algorithm.shear``).

        Keys in ``ignore`` belong to the caller (e.g. ``correct_threshold``) and are skipped; any
        other key that is not a field is a typo and is rejected rather than silently dropped.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        ignored = set(ignore)
        keys = [str(k) for k in mapping.keys()]
        unknown = sorted(k for k in keys if k not in fields and k not in ignored)
        if unknown:
            raise ValueError(
                f"unknown SHEAR engine option(s) {unknown}; the engine accepts {sorted(fields)}"
                + (f" (the caller also handles {sorted(ignored)})" if ignored else "")
            )
        kwargs = {k: mapping[k] for k in keys if k in fields}
        for name in ("epsilon", "tol", "memory_budget_mb"):  # YAML writes 1 for 1.0
            if isinstance(kwargs.get(name), int) and not isinstance(kwargs[name], bool):
                kwargs[name] = float(kwargs[name])
        return cls(**kwargs)


@dataclasses.dataclass
class ShearStats:
    """Counters accumulated by ``group_token_weights`` (pass the same object for many groups).

    sinkhorn_solves counts transport problems actually solved (Sinkhorn, or exact OT for
    metric="w1"); candidate_pairs counts the (span, opposing span) pairs the minimum ranges over;
    pruned_pairs those skipped by an exact lower bound, of which dual_pruned_pairs were stopped
    after a few Sinkhorn iterations, once the W1 dual bound from their iterates reached the best
    value of both their spans; capped_solves the Sinkhorn problems that reached max_iter before the
    marginal error fell below tol. n_bar_sum and epsilon_raw_sum add up, over the mixed groups,
    the group's mean hidden-state norm n_bar (Algorithm 1 lines 8-9) and the Sinkhorn epsilon in
    raw hidden-state units (epsilon * n_bar when epsilon_mode is relative): divided by
    mixed_groups they say what a relative epsilon was in the paper's units.
    """

    groups: int = 0
    mixed_groups: int = 0
    rollouts: int = 0
    fallback_rollouts: int = 0
    sinkhorn_solves: int = 0
    candidate_pairs: int = 0
    pruned_pairs: int = 0
    dual_pruned_pairs: int = 0
    capped_solves: int = 0
    n_bar_sum: float = 0.0
    epsilon_raw_sum: float = 0.0

    def merge(self, other: ShearStats) -> ShearStats:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)
