"""recipes/run_{shear,grpo}_{math,code}.sh: the dry-run command carries the paper's settings, the
GRPO twin differs in one knob, and the overrides compose (hydra, against verl's own config dir)
into a config that verl's own start-up validation accepts."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from omegaconf import OmegaConf

RECIPES = ["run_shear_math.sh", "run_grpo_math.sh", "run_shear_code.sh", "run_grpo_code.sh"]
# Bash parses the printed command (the dry run must paste back into a shell) and hands back argv.
SPLIT_ARGV = 'eval "argv=( $1 )"; printf "%s\\0" "${argv[@]}"'


def recipe_env(**knobs) -> dict:
    """A clean environment (no stray recipe knobs from the caller) plus `knobs`; the launch stamp
    is fixed so that two dry runs print the same metrics file name."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "RUN_STAMP": "fixed", **knobs}


def dry_run_argv(run_cmd, repo, recipe, *args, **knobs) -> list[str]:
    printed = run_cmd(["bash", str(repo / "recipes" / recipe), "--dry-run", *args], env=recipe_env(**knobs)).stdout
    return run_cmd(["bash", "-c", SPLIT_ARGV, "_", printed]).stdout.split("\0")[:-1]


def overrides_of(argv: list[str]) -> list[str]:
    assert argv[1:3] == ["-m", "verl.trainer.main_ppo"], argv[:3]
    return argv[3:]


def as_dict(overrides: list[str]) -> dict[str, str]:
    """key -> value, the last occurrence winning (as in hydra)."""
    return dict(o.split("=", 1) for o in overrides)


PAPER_SETTINGS = {  # docs/method.md "Paper settings" / the paper's App. J
    "data.train_batch_size": "512",
    "actor_rollout_ref.actor.optim.lr": "1e-6",
    "actor_rollout_ref.actor.clip_ratio_low": "0.2",
    "actor_rollout_ref.actor.clip_ratio_high": "0.28",
    "actor_rollout_ref.rollout.n": "8",
    "data.max_response_length": "3072",
    "actor_rollout_ref.actor.ppo_mini_batch_size": "32",
    "actor_rollout_ref.rollout.temperature": "1.0",
    "actor_rollout_ref.rollout.val_kwargs.temperature": "0.1",
    "actor_rollout_ref.rollout.val_kwargs.top_p": "1.0",
    "actor_rollout_ref.actor.use_kl_loss": "False",
    "algorithm.use_kl_in_reward": "False",
    "algorithm.kl_ctrl.kl_coef": "0",
    "actor_rollout_ref.actor.entropy_coeff": "0",
    "trainer.total_training_steps": "300",
    "trainer.test_freq": "5",
    "actor_rollout_ref.rollout.name": "vllm",
    "+algorithm.shear.span_len": "100",
    "+algorithm.shear.stride": "25",
    "+algorithm.shear.metric": "sinkhorn",
}


def test_shear_math_dry_run_carries_the_paper_settings(run_cmd, repo):
    cmd = as_dict(overrides_of(dry_run_argv(run_cmd, repo, "run_shear_math.sh")))
    assert {k: cmd.get(k) for k in PAPER_SETTINGS} == PAPER_SETTINGS
    assert cmd["algorithm.adv_estimator"] == "shear"
    assert cmd["actor_rollout_ref.model.path"] == "Qwen/Qwen2.5-Math-7B"
    assert cmd["reward.custom_reward_function.path"] == str(repo / "reward_fns" / "math.py")
    # the project's epsilon convention (docs/method.md, "Epsilon units"), not the paper's raw-units 4.5
    assert (cmd["+algorithm.shear.epsilon_mode"], cmd["+algorithm.shear.epsilon"]) == ("relative", "0.05")
    code = as_dict(overrides_of(dry_run_argv(run_cmd, repo, "run_shear_code.sh")))
    assert {k: code.get(k) for k in PAPER_SETTINGS} == PAPER_SETTINGS
    assert code["actor_rollout_ref.model.path"] == "Qwen/Qwen2.5-Coder-7B"
    assert code["reward.custom_reward_function.path"] == str(repo / "reward_fns" / "code.py")


PRM_PREFIXES = ("reward.reward_model.", "+reward.reward_model.", "reward.reward_manager.", "+reward.reward_kwargs.")


def method_free(overrides: list[str]) -> list[str]:
    """The command without its method: the estimator line, the method's own section and the PRM
    the PRM baselines are served (recipes/common.sh: prm_args)."""
    return [o for o in overrides
            if not o.startswith(("algorithm.adv_estimator=", "+algorithm.shear.", *PRM_PREFIXES))]


@pytest.mark.parametrize("task", ["math", "code"])
def test_grpo_twin_differs_in_the_method_alone(run_cmd, repo, task):
    fixed = {"EXPERIMENT_NAME": "run"}  # else the derived run name / output dir differ too
    shear = overrides_of(dry_run_argv(run_cmd, repo, f"run_shear_{task}.sh", **fixed))
    grpo = overrides_of(dry_run_argv(run_cmd, repo, f"run_grpo_{task}.sh", **fixed))
    assert "algorithm.adv_estimator=shear" in shear and "algorithm.adv_estimator=grpo" in grpo
    assert any(o.startswith("+algorithm.shear.") for o in shear)
    assert not any(o.startswith("+algorithm.shear.") for o in grpo)  # only the active method's keys
    assert method_free(shear) == method_free(grpo)
    derived = as_dict(overrides_of(dry_run_argv(run_cmd, repo, f"run_grpo_{task}.sh")))
    assert derived["trainer.experiment_name"].endswith(f"-{task}-grpo-seed42")


@pytest.mark.parametrize("task", ["math", "code"])
def test_adv_knob_runs_every_baseline_through_the_same_recipe(run_cmd, repo, task):
    from shear_verl.baselines import BASELINES, PRM_BASELINES, register_baselines
    from shear_verl.baselines.hidden_align import check_config as check_hidden_align
    from shear_verl.integration.driver import validate_config

    register_baselines()  # what the plugin does in every verl process

    fixed = {"EXPERIMENT_NAME": "run", "SHEAR_EPSILON_MODE": "absolute"}  # a SHEAR knob left in the environment
    reference = method_free(overrides_of(dry_run_argv(run_cmd, repo, f"run_shear_{task}.sh", **fixed)))
    for name in BASELINES:
        cmd = overrides_of(dry_run_argv(run_cmd, repo, f"run_shear_{task}.sh", ADV=name, **fixed))
        assert as_dict(cmd)["algorithm.adv_estimator"] == name
        assert method_free(cmd) == reference, name
        prm = [o for o in cmd if o.startswith(PRM_PREFIXES)]
        assert bool(prm) == (name in PRM_BASELINES), name  # a served PRM for the PRM baselines only
        config = compose_verl_config(cmd)
        validate_config(config)  # our start-up checks (registered name, no other method's keys, the PRM) pass
    named = as_dict(overrides_of(dry_run_argv(run_cmd, repo, f"run_shear_{task}.sh", ADV=BASELINES[0])))
    assert named["trainer.experiment_name"].endswith(f"-{task}-{BASELINES[0]}-seed42")
    # Hidden-Align is a loss on top of any method: one environment knob, accepted by verl's validation
    aligned = overrides_of(dry_run_argv(run_cmd, repo, f"run_shear_{task}.sh", ADV="grpo", HIDDEN_ALIGN_COEF="0.1",
                                        **fixed))
    assert as_dict(aligned)["+actor_rollout_ref.actor.hidden_align.coef"] == "0.1"
    config = compose_verl_config(aligned)
    validate_config(config)
    assert check_hidden_align(config).coef == 0.1  # what the plugin runs before verl's own validate_config


def test_environment_knobs_and_passed_through_overrides(run_cmd, repo):
    argv = dry_run_argv(
        run_cmd, repo, "run_shear_math.sh", "trainer.total_training_steps=10", "+trainer.extra=1",
        NNODES="4", LR="2e-6", ROLLOUT_N="16", MODEL_PATH="/models/qwen", SHEAR_EPSILON_MODE="absolute",
        SHEAR_EPSILON="4.5", SHEAR_MAX_ITER="500", TRAIN_FILES="/d/a.parquet", PYTHON="/venv/bin/python",
    )
    assert argv[0] == "/venv/bin/python"
    cmd = overrides_of(argv)
    assert cmd[-2:] == ["trainer.total_training_steps=10", "+trainer.extra=1"]  # last, so they win
    d = as_dict(cmd)
    assert d["trainer.nnodes"] == "4" and d["actor_rollout_ref.actor.optim.lr"] == "2e-6"
    assert d["actor_rollout_ref.rollout.n"] == "16" and d["actor_rollout_ref.model.path"] == "/models/qwen"
    assert d["+algorithm.shear.epsilon_mode"] == "absolute" and d["+algorithm.shear.epsilon"] == "4.5"
    assert d["+algorithm.shear.max_iter"] == "500" and "+algorithm.shear.tol" not in d  # unset: engine default
    assert d["data.train_files"] == "/d/a.parquet" and d["trainer.total_training_steps"] == "10"
    # every launch gets its own metrics file (verl's file logger truncates its file on start)
    default = as_dict(overrides_of(dry_run_argv(run_cmd, repo, "run_shear_math.sh", RUN_STAMP="")))
    metrics = default["+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH"]
    assert re.fullmatch(r".*/qwen2.5-math-7b-math-shear-seed42/metrics-\d{8}-\d{6}\.jsonl", metrics), metrics
    # DRY_RUN=1 is the same switch as --dry-run
    printed = run_cmd(["bash", str(repo / "recipes" / "run_grpo_code.sh")], env=recipe_env(DRY_RUN="1")).stdout
    assert printed == run_cmd(["bash", str(repo / "recipes" / "run_grpo_code.sh"), "--dry-run"],
                              env=recipe_env()).stdout


def test_without_dry_run_the_printed_command_is_what_runs(run_cmd, repo, tmp_path):
    fake_python = tmp_path / "python3"  # stands in for the trainer: records its argv
    fake_python.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$0" "$@" > "$ARGV_OUT"\n')
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    knobs = {"PYTHON": str(fake_python), "ARGV_OUT": str(tmp_path / "argv"), "SEED": "3",
             "OUTPUT_ROOT": str(tmp_path / "runs")}
    run_cmd(["bash", str(repo / "recipes" / "run_shear_code.sh"), "data.seed=7"], env=recipe_env(**knobs))
    ran = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert ran == dry_run_argv(run_cmd, repo, "run_shear_code.sh", "data.seed=7", **knobs)
    # verl's file logger does not create the directory of its file: the recipe does
    metrics = as_dict(overrides_of(ran))["+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH"]
    assert metrics == str(tmp_path / "runs" / "shear-verl" / "qwen2.5-coder-7b-code-shear-seed3" / "metrics-fixed.jsonl")
    assert Path(metrics).parent.is_dir()


def compose_verl_config(overrides: list[str]):
    """The config `python -m verl.trainer.main_ppo <overrides>` would get (hydra's compose API)."""
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def composed(run_cmd, repo, recipe, **knobs):
    return compose_verl_config(overrides_of(dry_run_argv(run_cmd, repo, recipe, **knobs)))


@pytest.mark.parametrize("recipe", RECIPES)
def test_composed_config_passes_verl_validation(run_cmd, repo, recipe):
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from verl.workers.config import RolloutConfig

    from shear_verl.integration.settings import settings_from_algorithm

    config = composed(run_cmd, repo, recipe, NNODES="2")

    # exactly what main_ppo.main runs before starting Ray
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    assert not need_reference_policy(config) and not need_critic(config)  # KL 0: no reference model; GRPO: no critic
    assert config.trainer.nnodes * config.trainer.n_gpus_per_node == 16

    # the typed configs verl builds from these nodes (from their _target_, as the trainer does)
    algorithm = OmegaConf.to_container(config.algorithm)
    shear_node = algorithm.pop("shear", None)
    algo = omega_conf_to_dataclass(OmegaConf.create(algorithm))
    assert isinstance(algo, AlgoConfig) and algo.adv_estimator == ("grpo" if "grpo" in recipe else "shear")
    assert algo.kl_ctrl.kl_coef == 0
    if "grpo" in recipe:
        assert shear_node is None  # only the active method's keys
    else:
        # algorithm.shear.* is read by the SHEAR integration (verl itself never converts `algorithm`)
        settings = settings_from_algorithm(config.algorithm)
        assert (settings.engine.span_len, settings.engine.stride) == (100, 25) == (shear_node["span_len"], shear_node["stride"])
    rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    assert isinstance(rollout, RolloutConfig)
    assert (rollout.n, rollout.temperature, rollout.val_kwargs.temperature, rollout.response_length) == (8, 1.0, 0.1, 3072)


@pytest.mark.parametrize("task", ["math", "code"])
def test_model_and_reward_function_load_as_verl_loads_them(run_cmd, repo, task, qwen25_dir, monkeypatch):
    """(The GRPO twins share these settings, see test_grpo_twin_differs_in_the_estimator_alone.)"""
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the model path is local
    config = composed(run_cmd, repo, f"run_shear_{task}.sh", MODEL_PATH=str(qwen25_dir))
    if task == "math":  # the model settings are shared by both tasks (recipes/common.sh); loading is slow
        model = omega_conf_to_dataclass(config.actor_rollout_ref.model)
        assert isinstance(model, HFModelConfig) and model.hf_config.model_type == "qwen2"
        assert model.tokenizer.eos_token == "<|im_end|>"
    score = get_custom_reward_fn(config)  # the reward loop's loader
    if task == "math":
        result = score(data_source="math500", solution_str="so \\boxed{\\frac{1}{2}}", ground_truth="0.5")
    else:
        result = score(data_source="x", solution_str="```python\nprint(int(input()) + 1)\n```",
                       ground_truth='{"inputs": ["1\\n"], "outputs": ["2\\n"]}')
    assert result["score"] == 1.0


@pytest.mark.parametrize("method", ["pure", "prm_reshape"])
def test_prm_recipes_serve_the_prm_and_pass_verl_validation(run_cmd, repo, method):
    """recipes/run_<method>_math.sh: run_shear_math.sh with ADV=<method> and the PRM on a pool of its
    own; the composed config passes verl's validation, its reward-model dataclass and our start-up checks."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from verl.workers.config import RewardModelConfig

    from shear_verl.baselines import register_baselines
    from shear_verl.integration.driver import validate_config as shear_validate_config

    register_baselines()
    fixed = {"EXPERIMENT_NAME": "run"}
    cmd = overrides_of(dry_run_argv(run_cmd, repo, f"run_{method}_math.sh", **fixed))
    assert cmd == overrides_of(dry_run_argv(run_cmd, repo, "run_shear_math.sh", ADV=method, **fixed))
    d = as_dict(cmd)
    assert d["algorithm.adv_estimator"] == method
    assert d["reward.reward_model.model_path"] == "Qwen/Qwen2.5-Math-PRM-7B"  # the paper's PRM
    assert d["reward.reward_manager.name"] == "PRMRewardManager"
    assert Path(d["reward.reward_manager.module.path"]) == repo / "shear_verl" / "baselines" / "prm_reward.py"
    assert {k: PAPER_SETTINGS[k] for k in PAPER_SETTINGS if not k.startswith("+algorithm.shear.")} == {
        k: d.get(k) for k in PAPER_SETTINGS if not k.startswith("+algorithm.shear.")}

    # the GPU layout knobs reach verl's reward-model config
    knobs = {"PRM_PATH": "/models/prm", "PRM_NNODES": "2", "PRM_N_GPUS_PER_NODE": "4", "PRM_TP": "2",
             "PRM_GPU_MEMORY_UTILIZATION": "0.7", "PRM_MAX_MODEL_LEN": "8192", "PRM_TIMEOUT_S": "120",
             "PRM_STEP_TAG_ID": "151651"}
    config = composed(run_cmd, repo, f"run_{method}_math.sh", **knobs)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    shear_validate_config(config)
    rm = omega_conf_to_dataclass(config.reward.reward_model)
    assert isinstance(rm, RewardModelConfig) and rm.enable and rm.enable_resource_pool
    assert (rm.model_path, rm.nnodes, rm.n_gpus_per_node) == ("/models/prm", 2, 4)
    assert (rm.rollout.name, rm.rollout.tensor_model_parallel_size, rm.rollout.gpu_memory_utilization,
            rm.rollout.max_model_len) == ("vllm", 2, 0.7, 8192)
    assert rm.rollout.engine_kwargs["vllm"]["pooler_config"] == {"step_tag_id": 151651}
    assert config.reward.reward_kwargs.prm_timeout_s == 120
    # the trainer's pool is unchanged: the PRM's GPUs come on top
    assert (config.trainer.nnodes, config.trainer.n_gpus_per_node) == (1, 8)
