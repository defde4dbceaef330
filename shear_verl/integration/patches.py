"""Every monkeypatch shear-verl applies to verl (token signals, SHEAR). CPU-only patches: shear_verl.cpu.

Installed lazily: the `verl.plugins` entry point runs inside `import verl` in every process, so
instead of importing verl's trainer and engines there (seconds, and half of verl), a post-import
hook (wrapt's) patches each class when verl itself imports its module. Each patch checks the verl version
and the patched symbol first, and refuses with a message naming the supported versions.

| verl symbol | what the wrapper adds | active when |
|---|---|---|
| ``v1.trainer_base.PPOTrainer.__init__`` | start-up checks (driver.validate_config): known ``adv_estimator``, no other method's ``algorithm.<name>.*``, the signal's needs; records the run's token signal | every run (checks); a token-signal estimator (the rest) |
| ``PPOTrainer._balance_batch`` | whole GRPO groups per data-parallel rank | signals the workers compute per group (``shear``) |
| ``PPOTrainer._compute_old_log_prob`` | the signal's worker flag on verl's old-log-prob pass; its fields kept out of later passes | worker-computed signals (``shear``, ``oar_g``) |
| ``PPOTrainer._compute_advantage`` | fetch the signal's fields, hand them to the estimator (signals.pending), log ``<name>/*`` | every token-signal estimator |
| ``utils.config.validate_config`` | ``actor_rollout_ref.actor.hidden_align.*`` checked, and hidden from verl's ``ActorConfig`` (align_hooks.py) | every run (checks); ``hidden_align.coef > 0`` |
| ``engine_workers.ActorRolloutRefWorker.init_model`` | the ``hidden_align`` section out of the actor config; the loss installed on the actor engine | a ``hidden_align`` section |
| ``fsdp.transformer_impl.FSDPEngineWithLMHead.forward_step`` | forward hook on the decoder (LM-head input); in the update pass, kept with grad and the Hidden-Align term added to verl's loss | flagged pass (``shear``); update pass (``hidden_align``) |
| ``FSDPEngineWithLMHead.prepare_model_outputs`` | captured response rows next to ``log_probs`` (``shear``); packed rows with grad (``hidden_align``) | flagged pass; update pass |
| ``FSDPEngineWithLMHead.infer_batch`` (inherited ``BaseEngine.infer_batch``) | SHEAR weights from the captured rows; OAR-G's input-gradient saliency (saliency.py) | flagged pass (``shear`` / ``oar_g``) |
| ``megatron.transformer_impl.MegatronEngineWithLMHead.forward_step`` | ``decoder.final_layernorm`` capture, un-sharded (megatron_capture.py) | flagged pass, last stage |
| ``MegatronEngineWithLMHead.infer_batch`` (inherited) | config refusals + SHEAR weights; refuses ``oar_g`` | flagged pass |
| ``vllm_rollout.utils.monkey_patch_compute_logits`` | skipped for pooling models (verl's server calls it on the reward model too, which has no ``compute_logits``) | a served reward model (``pure``, ``prm_reshape``) |
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import wrapt

from shear_verl._patching import UnsupportedVerlError, UnsupportedVersionError, check_version, is_patched, mark, require  # noqa: F401,E501

logger = logging.getLogger("shear_verl")

SUPPORTED_VERL = ("0.9.",)  # verl 0.9.x; developed and tested against 0.9.1 (every patch below)


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
    """verl.trainer.ppo.v1.trainer_base.PPOTrainer: start-up checks; balance / old-log-prob / advantage."""
    from shear_verl.integration import driver, signals

    check_verl_version()
    cls = module.PPOTrainer

    def make_init(orig):
        def __init__(self, config, *args, **kwargs):
            settings = driver.validate_config(config)  # every run: fail before workers start
            signal = signals.active_signal(config)
            orig(self, config, *args, **kwargs)
            self._signal_run = None if signal is None else driver.SignalRun(signal, settings)
            if signal is not None:
                for name in _steps(signal):
                    if not is_patched(getattr(type(self), name)):
                        raise ValueError(
                            f"algorithm.adv_estimator={signal.name} does not support trainer.v1.trainer_mode="
                            f"{config.trainer.v1.trainer_mode!r} ({type(self).__name__} overrides {name}); "
                            "use trainer.v1.trainer_mode=sync"
                        )

        return __init__

    def make_step(name, step):
        def make(orig):
            def method(self, batch, metrics, *args, **kwargs):
                run = getattr(self, "_signal_run", None)
                if run is None or name not in _steps(run.signal):
                    return orig(self, batch, metrics, *args, **kwargs)
                return step(self, functools.partial(orig, self), batch, metrics, *args, **kwargs)

            return method

        return make

    _wrap(cls, "__init__", ("self", "config"), make_init)
    for name, step in (("_balance_batch", driver.balance_batch), ("_compute_old_log_prob", driver.compute_old_log_prob),
                       ("_compute_advantage", driver.compute_advantage)):
        _wrap(cls, name, ("self", "batch", "metrics"), make_step(name, step))


def _steps(signal) -> tuple[str, ...]:
    """The trainer steps a signal changes (the others stay verl's own)."""
    return (*(("_balance_batch",) if signal.whole_groups else ()),
            *(("_compute_old_log_prob",) if signal.worker_flag else ()), "_compute_advantage")


# ----------------------------------------------------------------------------- Hidden-Align (any estimator)
def patch_config_validation(module) -> None:
    """verl.utils.config.validate_config: Hidden-Align's start-up checks; its section hidden from verl."""
    from shear_verl.integration import align_hooks

    check_verl_version()
    _wrap(module, "validate_config", ("config",),
          lambda orig: lambda *args, **kwargs: align_hooks.validate_config(orig, *args, **kwargs))


def patch_engine_workers(module) -> None:
    """verl.workers.engine_workers.ActorRolloutRefWorker.init_model: Hidden-Align on the actor engine."""
    from shear_verl.integration import align_hooks

    check_verl_version()
    _wrap(module.ActorRolloutRefWorker, "init_model", ("self",), _delegate(align_hooks.init_model))


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
    _wrap(cls, "infer_batch", ("self", "data"), _delegate(engine_hooks.fsdp_infer_batch))


# ----------------------------------------------------------------------------- Megatron actor engine
def patch_megatron_engine(module) -> None:
    """verl.workers.engine.megatron.transformer_impl.MegatronEngineWithLMHead: capture + un-sharding."""
    from shear_verl.integration import megatron_capture

    check_verl_version()
    megatron_capture.check_megatron_core_version()
    cls = module.MegatronEngineWithLMHead
    _wrap(cls, "forward_step",
          ("self", "batch_iter", "model", "logits_processor_func", "postprocess_micro_batch_func"),
          _delegate(megatron_capture.megatron_forward_step))
    # infer_batch is inherited from BaseEngine; wrap it on the LM-head engine only.
    if "infer_batch" not in cls.__dict__:
        cls.infer_batch = module.BaseEngine.infer_batch
    _wrap(cls, "infer_batch", ("self", "data"), _delegate(megatron_capture.megatron_infer_batch))


# ----------------------------------------------------------------------------- vLLM server worker
def patch_vllm_rollout_utils(module) -> None:
    """verl.workers.rollout.vllm_rollout.utils.monkey_patch_compute_logits: skip pooling models.

    verl 0.9.1's vLLM server calls it on every model it serves, the reward model included
    (vllm_async_server.run_server, ``monkey_patch_model``), but a pooling model (vLLM's
    Qwen2ForProcessRewardModel) has no ``compute_logits`` and nothing to sample: the server dies at
    start-up with AttributeError. Without the patch no discriminative reward model can be served.
    """
    check_verl_version()
    orig = require(module, "monkey_patch_compute_logits", "verl", SUPPORTED_VERL, ("model", "vocab_size"))
    if is_patched(orig):
        return

    @functools.wraps(orig)
    def monkey_patch_compute_logits(model, vocab_size, *args, **kwargs):
        if not hasattr(model, "compute_logits"):
            return None  # a pooling model: no logits to mask
        return orig(model, vocab_size, *args, **kwargs)

    module.monkey_patch_compute_logits = mark(monkey_patch_compute_logits)


# ----------------------------------------------------------------------------- post-import hooks
_HOOKS: dict[str, Callable] = {
    "verl.utils.config": patch_config_validation,
    "verl.workers.engine_workers": patch_engine_workers,
    "verl.trainer.ppo.v1.trainer_base": patch_trainer,
    "verl.workers.engine.fsdp.transformer_impl": patch_fsdp_engine,
    "verl.workers.engine.megatron.transformer_impl": patch_megatron_engine,
    "verl.workers.rollout.vllm_rollout.utils": patch_vllm_rollout_utils,
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
