"""Every CPU-only patch of verl and vLLM, in one place.

Each patch names the verl / vLLM symbol it changes, checks the installed version and that the
symbol is still there before touching it, and otherwise stops with :class:`UnsupportedVersionError`
naming the supported versions. Patches are applied through ``wrapt.when_imported`` post-import
hooks: they cost nothing until the patched module is imported (or run at once if it already is),
and land before any other module can bind the patched name.

| verl / vLLM symbol | why it breaks on CPU | patch |
|---|---|---|
| ``verl.utils.distributed.initialize_global_process_group_ray`` | default backend string ``cpu:gloo,{device}:{backend}`` is ``cpu:gloo,cpu:gloo``, which torch rejects (duplicate device) | plain ``gloo`` when the platform device is ``cpu`` |
| ``verl.workers.engine.fsdp`` engines (``EngineRegistry``) | FSDP engines are registered for ``cuda``/``npu`` only | register the FSDP2 LM-head engine for ``cpu`` (FSDP1 needs device params) |
| ``transformer_impl.CPUOffloadPolicy`` (reference model) | ``pin_memory=True`` needs an accelerator ("Cannot access accelerator device") | offload policy without pinned memory |
| ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`` | vLLM-CPU repacks Linear weights for its GEMM kernels and drops (or stops reading) ``layer.weight``, so verl's in-place weight sync fails (``'Parameter' object has no attribute 'weight_loader'``) or is silently ignored | plain ``F.linear`` on the live weight |
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys

import wrapt

from shear_verl._patching import UnsupportedVersionError  # noqa: F401 - callers catch it from here
from shear_verl._patching import check_version, is_patched, mark, require

SUPPORTED_VERL = ("0.9.1",)
SUPPORTED_VLLM = ("0.31.0",)


# --------------------------------------------------------------------------------------------
# verl
# --------------------------------------------------------------------------------------------
_PG_CONSUMERS = ("verl.workers.engine_workers",)  # modules that bind the name at import


def _patch_process_group(distributed) -> None:
    original = require(distributed, "initialize_global_process_group_ray", "verl", SUPPORTED_VERL)
    if is_patched(original):
        return
    from verl.utils.device import get_device_name

    @mark
    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        if backend is None and get_device_name() == "cpu":
            backend = "gloo"  # "cpu:gloo,cpu:gloo" is rejected by torch: one backend per device
        return original(timeout_second=timeout_second, backend=backend)

    distributed.initialize_global_process_group_ray = initialize_global_process_group_ray
    # verl imports verl.utils.distributed in `import verl`, before plugins run, so this patch lands
    # first and later importers bind the patched name; rebind any that came earlier.
    for name in _PG_CONSUMERS:
        consumer = sys.modules.get(name)
        if getattr(consumer, "initialize_global_process_group_ray", None) is original:
            consumer.initialize_global_process_group_ray = initialize_global_process_group_ray


def _patch_fsdp_engines(fsdp_package) -> None:
    # Hooked on the package, which imports transformer_impl: both are complete when this runs.
    transformer_impl = sys.modules["verl.workers.engine.fsdp.transformer_impl"]
    registry = require(transformer_impl, "EngineRegistry", "verl", SUPPORTED_VERL)
    lm_head_engine = require(fsdp_package, "FSDPEngineWithLMHead", "verl", SUPPORTED_VERL)
    offload_policy = require(transformer_impl, "CPUOffloadPolicy", "verl", SUPPORTED_VERL)
    if is_patched(offload_policy):
        return
    # FSDP1 wants device-resident params; FSDP2 (fully_shard) runs on gloo/CPU.
    registry.register(model_type="language_model", backend="fsdp2", device="cpu")(lm_head_engine)

    class UnpinnedCPUOffloadPolicy(offload_policy):
        """Pinned (page-locked) host memory only exists next to an accelerator."""

        def __init__(self, pin_memory: bool = False):
            super().__init__(pin_memory=False)

    mark(UnpinnedCPUOffloadPolicy)
    transformer_impl.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


_REMEDY = "Install a supported version (scripts/setup_cpu.sh) or unset VERL_PLATFORM=cpu."


def check_verl_version() -> None:
    check_version("verl", importlib.metadata.version("verl"), SUPPORTED_VERL, "shear-verl's CPU mode", _REMEDY)


def apply_verl_patches() -> None:
    """Install the verl patches (idempotent). Only call in CPU mode."""
    check_verl_version()
    wrapt.when_imported("verl.utils.distributed")(_patch_process_group)
    wrapt.when_imported("verl.workers.engine.fsdp")(_patch_fsdp_engines)


# --------------------------------------------------------------------------------------------
# vLLM (runs inside vLLM's own processes, through the vllm.general_plugins entry point)
# --------------------------------------------------------------------------------------------
def _patch_cpu_gemm(layer_utils) -> None:
    original = require(layer_utils, "dispatch_cpu_unquantized_gemm", "vllm", SUPPORTED_VLLM)
    if is_patched(original):
        return
    import torch.nn.functional as F

    @mark
    @functools.wraps(original)
    def dispatch_cpu_unquantized_gemm(layer, remove_weight: bool) -> None:
        # verl reloads rollout weights in place (layer.weight.weight_loader) after every update;
        # a repacked copy would go stale and a removed weight cannot be reloaded. Keep the live
        # 2-D weight and compute with F.linear. Other layouts (3-D MoE / conv) keep vLLM's path.
        if layer.weight.ndim != 2:
            return original(layer, remove_weight)
        layer.cpu_linear = F.linear

    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm


def apply_vllm_patches() -> None:
    """Install the vLLM patches (idempotent). Only call in CPU mode."""
    import vllm

    check_version("vllm", vllm.__version__, SUPPORTED_VLLM, "shear-verl's CPU mode", _REMEDY)
    wrapt.when_imported("vllm.model_executor.layers.utils")(_patch_cpu_gemm)
