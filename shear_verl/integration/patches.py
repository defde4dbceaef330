"""Every monkeypatch shear-verl applies to verl (SHEAR integration). CPU-only patches: shear_verl.cpu.

Installed lazily: the `verl.plugins` entry point runs inside `import verl` in every process, so
instead of importing verl's trainer and engines there (seconds, and half of verl), a post-import
hook (wrapt's) patches each class when verl itself imports its module. Each patch checks the verl version
and the patched symbol first, and refuses with a message naming the supported versions.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import wrapt

from shear_verl._patching import UnsupportedVersionError, check_version, is_patched, mark, require

logger = logging.getLogger("shear_verl")

SUPPORTED_VERL = ("0.9.",)  # verl 0.9.x; developed and tested against 0.9.1
UnsupportedVerlError = UnsupportedVersionError  # one error for every patch; integration code knows it by this name


def check_verl_version() -> str:
    import verl

    return check_version(
        "verl", getattr(verl, "__version__", "unknown"), SUPPORTED_VERL, "shear-verl",
        "Install verl==0.9.1 (tested) or a shear-verl release that supports your verl.",
    )


def _wrap(cls: type, name: str, params: tuple[str, ...], make: Callable[[Callable], Callable]) -> None:
    orig = require(cls, name, "verl", SUPPORTED_VERL, params)
    if is_patched(orig):
        return
    setattr(cls, name, mark(functools.wraps(orig)(make(orig))))


def _delegate(hook: Callable) -> Callable[[Callable], Callable]:
    """make(orig) -> method calling hook(self, bound_orig, *args, **kwargs)."""

    def make(orig):
        def method(self, *args, **kwargs):
            return hook(self, functools.partial(orig, self), *args, **kwargs)

        return method

    return make


# ----------------------------------------------------------------------------- driver (V1 trainer)
def patch_trainer(module) -> None:
    """verl.trainer.ppo.v1.trainer_base.PPOTrainer: balance / old-log-prob / advantage, shear only."""
    from shear_verl.integration import driver

    check_verl_version()
    cls = module.PPOTrainer

    def make_init(orig):
        def __init__(self, config, *args, **kwargs):
            settings = driver.validate_config(config) if driver.is_shear(config) else None
            orig(self, config, *args, **kwargs)
            self._shear_settings = settings
            if settings is not None:
                for name in ("_balance_batch", "_compute_old_log_prob", "_compute_advantage"):
                    if not is_patched(getattr(type(self), name)):
                        raise ValueError(
                            f"algorithm.adv_estimator=shear does not support trainer.v1.trainer_mode="
                            f"{config.trainer.v1.trainer_mode!r} ({type(self).__name__} overrides {name}); "
                            "use trainer.v1.trainer_mode=sync"
                        )

        return __init__

    def make_step(step):
        def make(orig):
            def method(self, batch, metrics, *args, **kwargs):
                if getattr(self, "_shear_settings", None) is None:
                    return orig(self, batch, metrics, *args, **kwargs)
                return step(self, functools.partial(orig, self), batch, metrics, *args, **kwargs)

            return method

        return make

    _wrap(cls, "__init__", ("self", "config"), make_init)
    _wrap(cls, "_balance_batch", ("self", "batch", "metrics"), make_step(driver.balance_batch))
    _wrap(cls, "_compute_old_log_prob", ("self", "batch", "metrics"), make_step(driver.compute_old_log_prob))
    _wrap(cls, "_compute_advantage", ("self", "batch", "metrics"), make_step(driver.compute_advantage))


# ----------------------------------------------------------------------------- FSDP actor engine
def patch_fsdp_engine(module) -> None:
    """verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead: hidden-state capture."""
    from shear_verl.integration import engine_hooks

    check_verl_version()
    cls = module.FSDPEngineWithLMHead
    _wrap(cls, "forward_step", ("self", "micro_batch", "loss_function", "forward_only"),
          _delegate(engine_hooks.fsdp_forward_step))
    _wrap(cls, "prepare_model_outputs", ("self", "output", "output_args", "micro_batch"),
          _delegate(engine_hooks.fsdp_prepare_model_outputs))
    # infer_batch is inherited from BaseEngine; wrap it on the LM-head engine only.
    if "infer_batch" not in cls.__dict__:
        cls.infer_batch = module.BaseEngine.infer_batch
    _wrap(cls, "infer_batch", ("self", "data"), _delegate(engine_hooks.infer_batch_with_weights))


# ----------------------------------------------------------------------------- Megatron actor engine
def patch_megatron_engine(module) -> None:
    """verl.workers.engine.megatron.transformer_impl.MegatronEngineWithLMHead: capture + un-sharding."""
    from shear_verl.integration.megatron_capture import patch_megatron_engine as patch  # imports this module

    patch(module)


# ----------------------------------------------------------------------------- post-import hooks
_HOOKS: dict[str, Callable] = {
    "verl.trainer.ppo.v1.trainer_base": patch_trainer,
    "verl.workers.engine.fsdp.transformer_impl": patch_fsdp_engine,
    "verl.workers.engine.megatron.transformer_impl": patch_megatron_engine,
}


def install() -> None:
    """Patch each verl module in _HOOKS now if imported, else right after verl imports it.

    wrapt's post-import hooks chain with every other import hook (shear_verl.cpu uses them too),
    which a hand-written meta-path finder would shadow.
    """
    check_verl_version()
    for name, hook in _HOOKS.items():
        if name not in _REGISTERED:
            _REGISTERED.add(name)
            wrapt.register_post_import_hook(hook, name)


_REGISTERED: set[str] = set()
