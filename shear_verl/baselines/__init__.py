"""Intrinsic-signal credit baselines on shear-verl's token-signal mechanism (integration/signals.py).

Each module holds a paper's formula as a pure function, its registered estimator and its
:class:`~shear_verl.integration.signals.TokenSignal`; :func:`register_baselines` (run by the plugin
in every verl process) registers them all. Methods table: README, "Baselines".
"""

from __future__ import annotations

BASELINES = ("entropy_adv", "top_entropy", "hapo", "oar_g", "pure", "prm_reshape")
PRM_BASELINES = ("pure", "prm_reshape")  # need a served process reward model (reward.reward_model.*)


def register_baselines() -> None:
    """Register every baseline's estimator and token signal with verl (idempotent)."""
    import importlib

    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

    from shear_verl.integration import signals

    for name in BASELINES:
        module = importlib.import_module(f"shear_verl.baselines.{name}")
        signals.register_signal(module.SIGNAL)
        if ADV_ESTIMATOR_REGISTRY.get(name) is not module.ESTIMATOR:
            register_adv_est(name)(module.ESTIMATOR)
