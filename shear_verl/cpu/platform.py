"""A CPU platform for verl's platform registry (``VERL_PLATFORM=cpu``).

verl 0.9.1 resolves every device question (device name, ``torch.<device>`` module, collective
backend, Ray resource) through one ``PlatformBase`` singleton chosen by
``verl.plugin.platform.platform_manager``. It ships CUDA, NPU and ROCm only, and falls back to
CUDA on a machine without accelerators. Registering this class under the name ``"cpu"`` lets
``VERL_PLATFORM=cpu`` select it through verl's own override, with no change to verl's code.

Ray scheduling: verl asks Ray for the platform's accelerator resource for every training and
rollout worker. A CPU has none, so this platform names Ray's ``GPU`` resource and the run
declares logical GPUs (``ray_kwargs.ray_init.num_gpus``); Ray then only uses it to count
worker slots (see ``shear_verl.cpu.required_overrides``).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any, Optional

import psutil
import torch

from verl.plugin.platform import PlatformBase, PlatformRegistry

PLATFORM_NAME = "cpu"


class _CPUDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the CUDA-style calls verl makes on ``get_torch_device()``.

    ``torch.cpu`` has streams, events and ``synchronize`` but no allocator, RNG or memory-stat
    functions; verl calls those unconditionally (``empty_cache`` after every phase, memory
    metrics after every update, RNG state in checkpoints). On a CPU there is no device
    allocator: caches are no-ops, device-memory counters are 0, and the RNG is torch's default
    (CPU) generator.
    """

    def __init__(self):
        super().__init__("shear_verl.cpu.device")

    def __getattr__(self, name: str) -> Any:  # Stream, Event, current_stream, stream, ...
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    # RNG: the CPU generator is torch's default generator.
    manual_seed = staticmethod(torch.manual_seed)
    manual_seed_all = staticmethod(torch.manual_seed)
    get_rng_state = staticmethod(torch.get_rng_state)
    set_rng_state = staticmethod(torch.set_rng_state)

    # Memory: no device allocator on a CPU.
    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    max_memory_allocated = memory_allocated
    memory_reserved = memory_allocated
    max_memory_reserved = memory_allocated

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        """(free, total) bytes of host memory: the memory a CPU "device" computes in."""
        vm = psutil.virtual_memory()
        return vm.available, vm.total


_DEVICE_MODULE = _CPUDeviceModule()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform for CPU-only machines: torch's CPU device, gloo collectives."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: CPU mode is only ever chosen explicitly (VERL_PLATFORM=cpu),
        # so a GPU machine keeps verl's own detection.
        return False

    def current_device(self) -> str:
        # verl moves tensors with `.to(get_device_id())`; an int there means an accelerator index.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray exports the ids of the logical "GPU" resource it grants under this name.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        # No CUDA IPC on a CPU: verl then ships rollout weights through shared memory.
        return False

    def rollout_env_vars(self) -> dict[str, str]:
        # The rollout server actor and the processes vLLM spawns must see CPU mode too, also
        # on a Ray cluster that was started outside this process's environment.
        return {"VERL_PLATFORM": PLATFORM_NAME, "VLLM_TARGET_DEVICE": "cpu"}

    def cudart(self) -> Any:
        return None

