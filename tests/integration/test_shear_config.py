"""`algorithm.shear.*` from the package yaml (python -m shear_verl.main) and from the stock CLI."""

import dataclasses

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from shear_verl.core import ShearConfig
from shear_verl.integration.driver import validate_config
from shear_verl.integration.settings import ShearSettings, settings_from_algorithm


def compose_shear(overrides=()):
    with initialize_config_module(config_module="shear_verl.config", version_base=None):
        return compose(config_name="shear_trainer", overrides=list(overrides))


def compose_stock(overrides=()):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def test_package_yaml_defaults_are_the_engine_defaults():
    cfg = compose_shear(["actor_rollout_ref.rollout.n=8"])
    assert cfg.algorithm.adv_estimator == "shear"
    settings = validate_config(cfg)
    assert settings == ShearSettings(engine=ShearConfig())
    # every engine knob is spelled out in the yaml, so users override it without `+`
    assert {f.name for f in dataclasses.fields(ShearConfig)} <= set(cfg.algorithm.shear)
    # and the rest of the config is verl's own ppo_trainer
    stock = compose_stock()
    assert OmegaConf.to_container(cfg.actor_rollout_ref.actor) == OmegaConf.to_container(stock.actor_rollout_ref.actor)


def test_overrides_without_plus_on_package_config():
    cfg = compose_shear(["actor_rollout_ref.rollout.n=4", "algorithm.shear.span_len=8", "algorithm.shear.stride=4",
                         "algorithm.shear.metric=chamfer", "algorithm.shear.correct_threshold=0.9"])
    s = validate_config(cfg)
    assert (s.engine.span_len, s.engine.stride, s.engine.metric, s.correct_threshold) == (8, 4, "chamfer", 0.9)


def test_stock_cli_with_plus_keys():
    cfg = compose_stock(["algorithm.adv_estimator=shear", "actor_rollout_ref.rollout.n=4",
                         "+algorithm.shear.span_len=160", "+algorithm.shear.epsilon=1"])
    s = validate_config(cfg)
    assert s.engine.span_len == 160 and s.engine.epsilon == 1.0 and s.engine.stride == ShearConfig().stride


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.rollout_correction.bypass_mode=true"], "bypass_mode"),
        (["actor_rollout_ref.rollout.n=1"], "rollout.n=1"),
        (["+algorithm.shear.spanlen=8"], "spanlen"),
        (["algorithm.shear.metric=euclid"], "metric"),
        (["algorithm.shear.correct_threshold=yes"], "correct_threshold"),
        (["algorithm.shear.fallback=median"], "algorithm.shear.fallback must be one of one, group_mean"),
        (["algorithm.shear.max_capture_mb=-1"], "algorithm.shear.max_capture_mb must be a number >= 0"),
    ],
)
def test_misconfiguration_fails_with_a_clear_message(overrides, message):
    cfg = compose_shear(["actor_rollout_ref.rollout.n=4", *overrides])
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)


def test_settings_roundtrip_json():
    s = settings_from_algorithm({"shear": {"span_len": 8, "stride": 4, "offload_to_cpu": True,
                                           "fallback": "group_mean", "max_capture_mb": 512}})
    assert (s.fallback, s.max_capture_mb) == ("group_mean", 512.0)
    assert ShearSettings.from_json(s.to_json()) == s
