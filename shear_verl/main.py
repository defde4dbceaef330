"""`python -m shear_verl.main`: verl's stock PPO entry point with SHEAR's defaults.

Same as `python -m verl.trainer.main_ppo`, but composed from `shear_verl/config/shear_trainer.yaml`
(verl's `ppo_trainer` + `algorithm.adv_estimator=shear` + every `algorithm.shear.*` knob), so
users override SHEAR knobs without the `+` prefix the stock CLI needs for new keys.
"""

from __future__ import annotations

import hydra


@hydra.main(config_path="config", config_name="shear_trainer", version_base=None)
def main(config) -> None:
    import verl.trainer.main_ppo as verl_main

    from shear_verl.integration.driver import is_shear, validate_config

    if is_shear(config):
        validate_config(config)  # fail in seconds, before Ray starts
    # hydra.main keeps the undecorated function as __wrapped__ (functools.wraps): verl's own
    # device setup, config validation and run_ppo, with our composed config.
    verl_main.main.__wrapped__(config)


if __name__ == "__main__":
    main()
