"""vLLM general plugin (entry point ``vllm.general_plugins: shear_cpu``).

vLLM calls :func:`register` in each of its processes, including the engine-core and worker
processes it spawns, which never import verl's plugins; this is how the CPU-mode patches of
vLLM reach them. A no-op unless CPU mode was asked for (``VERL_PLATFORM=cpu``, inherited from
the verl process that started vLLM).
"""

from __future__ import annotations

import logging

from . import cpu_requested

logger = logging.getLogger(__name__)


def register() -> None:
    if not cpu_requested(argv=[]):
        return
    from .patches import apply_vllm_patches

    try:
        apply_vllm_patches()
    except Exception:
        logger.warning("shear_verl: could not apply the CPU-mode patches to vLLM", exc_info=True)
        raise
