"""recipes/run_shear_math_megatron.sh: the FSDP math recipe's settings and SHEAR knobs on the Megatron
engine; TP/PP/CP from the environment; composes (hydra, verl's own config dir) into a config verl's
start-up validation accepts."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPLIT_ARGV = 'eval "argv=( $1 )"; printf "%s\\0" "${argv[@]}"'  # bash parses the printed command


def dry_run(recipe: str, **knobs) -> list[str]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **knobs}
    printed = subprocess.run(["bash", str(REPO / "recipes" / recipe), "--dry-run"], env=env, cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    argv = subprocess.run(["bash", "-c", SPLIT_ARGV, "_", printed], capture_output=True, text=True,
                          check=True).stdout.split("\0")[:-1]
    assert argv[1:3] == ["-m", "verl.trainer.main_ppo"], argv[:3]
    return argv[3:]


def as_dict(overrides):
    return dict(o.split("=", 1) for o in overrides)


def test_same_settings_as_the_fsdp_recipe_on_megatron():
    fixed = {"EXPERIMENT_NAME": "run"}
    mega = as_dict(dry_run("run_shear_math_megatron.sh", TP="4", PP="2", CP="2", **fixed))
    fsdp = as_dict(dry_run("run_shear_math.sh", **fixed))
    engine_specific = {k for k in fsdp if ".fsdp_config." in k or "ulysses" in k or k in (
        "actor_rollout_ref.model.use_remove_padding", "actor_rollout_ref.model.enable_gradient_checkpointing",
        "actor_rollout_ref.rollout.tensor_model_parallel_size")}
    assert {k: mega.get(k) for k in fsdp if k not in engine_specific} == {
        k: v for k, v in fsdp.items() if k not in engine_specific}
    assert mega["model_engine"] == "megatron"
    tp_pp_cp = [mega[f"actor_rollout_ref.actor.megatron.{k}"] for k in
                ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")]
    assert tp_pp_cp == ["4", "2", "2"]
    assert mega["actor_rollout_ref.actor.megatron.dynamic_context_parallel"] == "False"


def test_composed_config_passes_verl_validation():
    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from verl.workers.config import McoreActorConfig

    from shear_verl.integration.settings import settings_from_algorithm

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=dry_run("run_shear_math_megatron.sh", NNODES="2"))
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert isinstance(actor, McoreActorConfig) and actor.strategy == "megatron"
    assert (actor.megatron.tensor_model_parallel_size, actor.megatron.sequence_parallel) == (2, True)
    assert config.algorithm.adv_estimator == "shear"
    settings = settings_from_algorithm(config.algorithm)
    assert (settings.engine.span_len, settings.engine.stride) == (100, 25)
