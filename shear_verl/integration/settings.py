"""`algorithm.shear.*`: the user-facing knobs, split into engine knobs and integration knobs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from shear_verl.core import ShearConfig

ESTIMATOR_NAME = "shear"

# Knobs that are not the weight engine's (shear_verl.core.ShearConfig) but the integration's.
_INTEGRATION_KEYS = ("correct_threshold", "offload_to_cpu", "dump_every", "dump_groups", "dump_dir", "fallback",
                     "max_capture_mb")
FALLBACKS = ("one", "group_mean")


@dataclass(frozen=True)
class ShearSettings:
    """Everything the workers need for one old-log-prob pass (travels as JSON in extra_info)."""

    engine: ShearConfig
    correct_threshold: float = 0.5  # a rollout is correct iff its sequence score > this
    offload_to_cpu: bool = False  # keep captured hidden states in host memory between micro-batches
    # Per-token credit dumps (driver side, shear_verl.integration.dump): every dump_every steps
    # (0: off) dump_groups groups (0: all) as JSON lines under dump_dir.
    dump_every: int = 0
    dump_groups: int = 4
    dump_dir: str | None = None
    # Weight of rollouts whose group has no opposing side: "one" (Algorithm 1: plain GRPO) or
    # "group_mean" (the mean SHEAR weight of the step's mixed groups, so that partial-credit groups
    # do not get updates several times larger than the mixed ones).
    fallback: str = "one"
    # Per rank, the most megabytes the captured hidden states of one pass may hold (0: no limit).
    max_capture_mb: float = 0.0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "engine": asdict(self.engine)})

    @classmethod
    def from_json(cls, text: str) -> "ShearSettings":
        raw = json.loads(text)
        return cls(**{**raw, "engine": ShearConfig(**raw["engine"])})


def settings_from_algorithm(algorithm_cfg: Any) -> ShearSettings:
    """Build settings from `config.algorithm` (DictConfig or dict); unknown keys raise ValueError."""
    shear_cfg: Mapping = {}
    if algorithm_cfg is not None and "shear" in algorithm_cfg and algorithm_cfg["shear"] is not None:
        shear_cfg = algorithm_cfg["shear"]
    plain = {str(k): _plain(v) for k, v in dict(shear_cfg).items()}
    engine = ShearConfig.from_mapping(plain, ignore=_INTEGRATION_KEYS)
    threshold = plain.get("correct_threshold", 0.5)
    offload = plain.get("offload_to_cpu", False)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool):
        raise ValueError(f"algorithm.shear.correct_threshold must be a number, got {threshold!r}")
    if not isinstance(offload, bool):
        raise ValueError(f"algorithm.shear.offload_to_cpu must be true/false, got {offload!r}")
    dump_every, dump_groups = plain.get("dump_every", 0), plain.get("dump_groups", 4)
    for name, value in (("dump_every", dump_every), ("dump_groups", dump_groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"algorithm.shear.{name} must be an integer >= 0, got {value!r}")
    dump_dir = plain.get("dump_dir", None)
    if dump_dir is not None and not isinstance(dump_dir, str):
        raise ValueError(f"algorithm.shear.dump_dir must be a path, got {dump_dir!r}")
    fallback = plain.get("fallback", "one")
    if fallback not in FALLBACKS:
        raise ValueError(f"algorithm.shear.fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    max_capture_mb = plain.get("max_capture_mb", 0.0)
    if not isinstance(max_capture_mb, int | float) or isinstance(max_capture_mb, bool) or max_capture_mb < 0:
        raise ValueError(f"algorithm.shear.max_capture_mb must be a number >= 0 (0: no limit), got {max_capture_mb!r}")
    return ShearSettings(engine=engine, correct_threshold=float(threshold), offload_to_cpu=offload,
                         dump_every=dump_every, dump_groups=dump_groups, dump_dir=dump_dir, fallback=fallback,
                         max_capture_mb=float(max_capture_mb))


def _plain(value: Any) -> Any:
    # OmegaConf scalars are already plain Python values; containers are not expected here.
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return value
