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
])
def test_bad_configuration_stops_naming_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(stock(overrides))
