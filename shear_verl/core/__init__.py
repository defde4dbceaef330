"""SHEAR weight engine: span-level Wasserstein token weights of a GRPO group (torch, no verl).

Runs wherever its inputs live (CPU or CUDA); on the CPU the tiled Sinkhorn solver's loops are
numba-compiled (``fused``). See docs/method.md for Algorithm 1 and the decisions
this project takes where the paper is silent.
"""

from shear_verl.core.config import ShearConfig, ShearStats
from shear_verl.core.weights import group_token_weights, shear_advantages

__all__ = ["ShearConfig", "ShearStats", "group_token_weights", "shear_advantages"]
