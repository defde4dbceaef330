"""The tiny end-to-end run: verl's stock trainer on CPU with a tiny model and a toy task.

Library side of ``recipes/run_shear_tiny.sh`` (``python -m shear_verl.tiny``) and of the CPU /
SHEAR end-to-end tests::

    from shear_verl.tiny import run_tiny
    metrics = run_tiny(workdir, adv="grpo", steps=3)   # one dict of verl metrics per step
"""

from . import counting
from .assets import TinyAssets, TinySpec, build_assets
from .report import plot_reward, summarize
from .run import (
    TinyConfig,
    TinyRunError,
    compose_tiny_config,
    load_metrics,
    read_metrics,
    run_tiny,
    tiny_env,
    tiny_overrides,
)

__all__ = [
    "TinyAssets",
    "TinyConfig",
    "TinyRunError",
    "TinySpec",
    "build_assets",
    "compose_tiny_config",
    "load_metrics",
    "plot_reward",
    "read_metrics",
    "run_tiny",
    "summarize",
    "tiny_env",
    "tiny_overrides",
]
