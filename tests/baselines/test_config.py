"""Start-up refusals (driver.validate_config, run by the trainer's __init__ wrapper and by
`python -m shear_verl.main`): each message names the setting."""

import pytest
from hydra import compose, initialize_config_module

from shear_verl.baselines import register_baselines
from shear_verl.baselines.entropy_adv import EntropyAdvSettings
from shear_verl.baselines.top_entropy import TopEntropySettings
from shear_verl.integration.driver import validate_config


def stock(overrides):
    register_baselines()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=["actor_rollout_ref.rollout.n=4", *overrides])


def test_defaults_and_overrides_parse():
    assert validate_config(stock(["algorithm.adv_estimator=entropy_adv"])) == EntropyAdvSettings(0.4, 2.0)
    s = validate_config(stock(["algorithm.adv_estimator=top_entropy", "+algorithm.top_entropy.rho=0.5"]))
    assert s == TopEntropySettings(rho=0.5)
    assert validate_config(stock(["algorithm.adv_estimator=grpo"])) is None


def test_oar_g_defaults_and_megatron_refused():
    from shear_verl.baselines.oar_g import OarGSettings

    assert validate_config(stock(["algorithm.adv_estimator=oar_g"])) == OarGSettings()
    s = validate_config(stock(["algorithm.adv_estimator=oar_g", "+algorithm.oar_g.no_marker=tail",
                               "+algorithm.oar_g.tail_tokens=4"]))
    assert s == OarGSettings(no_marker="tail", tail_tokens=4)
    with pytest.raises(ValueError, match="oar_g supports the FSDP actor only.*strategy=megatron"):
        register_baselines()
        with initialize_config_module(config_module="verl.trainer.config", version_base=None):
            cfg = compose(config_name="ppo_megatron_trainer",
                          overrides=["actor_rollout_ref.rollout.n=4", "algorithm.adv_estimator=oar_g"])
        validate_config(cfg)


def test_package_yaml_with_another_method_keeps_shears_defaults_quiet():
    register_baselines()
    with initialize_config_module(config_module="shear_verl.config", version_base=None):
        cfg = compose(config_name="shear_trainer", overrides=["actor_rollout_ref.rollout.n=4",
                                                              "algorithm.adv_estimator=entropy_adv"])
    assert validate_config(cfg) == EntropyAdvSettings()


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.adv_estimator=entropy_adfv"], "algorithm.adv_estimator=entropy_adfv is not a registered"),
    (["algorithm.adv_estimator=grpo", "+algorithm.entropy_adv.alpha=1"],
     r"algorithm.entropy_adv.alpha configure algorithm.adv_estimator=entropy_adv, but this run has "
     "algorithm.adv_estimator=grpo"),
    (["algorithm.adv_estimator=top_entropy", "+algorithm.shear.span_len=8"], "algorithm.shear.span_len configure"),
    (["algorithm.adv_estimator=entropy_adv", "+algorithm.entropy_adv.kapa=3"], "algorithm.entropy_adv.kapa"),
    (["algorithm.adv_estimator=top_entropy", "algorithm.rollout_correction.bypass_mode=true"],
     "algorithm.adv_estimator=top_entropy needs verl's old-log-prob pass .*entropy.*bypass_mode=false"),
    (["algorithm.adv_estimator=entropy_adv", "actor_rollout_ref.rollout.n=1"], "rollout.n=1"),
    (["algorithm.adv_estimator=oar_g", "+algorithm.oar_g.tau=1.5"], "algorithm.oar_g.tau must be in"),
    (["algorithm.adv_estimator=oar_g", "+algorithm.oar_g.target=first"], "algorithm.oar_g.target must be one of"),
    (["algorithm.adv_estimator=oar_g", "+algorithm.oar_g.noise_std=0"], "algorithm.oar_g.noise_std must be > 0"),
    (["algorithm.adv_estimator=oar_g", "+algorithm.oar_g.taus=0.3"], "unknown key.*algorithm.oar_g.taus"),
    (["algorithm.adv_estimator=grpo", "+algorithm.oar_g.beta=2"], "algorithm.oar_g.beta configure"),
    (["algorithm.adv_estimator=oar_g", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"],
     "oar_g does not support Ulysses.*ulysses_sequence_parallel_size=2"),
    (["algorithm.adv_estimator=oar_g", "actor_rollout_ref.model.use_fused_kernels=true"],
     "actor_rollout_ref.model.use_fused_kernels=true"),
])
def test_bad_configuration_stops_naming_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(stock(overrides))
