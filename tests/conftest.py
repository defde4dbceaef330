"""Session-wide fixtures shared by several test directories."""

import pytest


@pytest.fixture(scope="session")
def counting_assets(tmp_path_factory):
    """The main job's warm-started counting model, tokenizer and data (built once, ~2 min)."""
    from shear_verl.tiny import TinySpec, build_assets

    return build_assets(tmp_path_factory.mktemp("counting_assets"), TinySpec.counting())


@pytest.fixture(scope="session")
def main_job_runs(counting_assets, tmp_path_factory):
    """The main job through verl's stock CLI, as three e2e test files read it: SHEAR on the counting
    task for 2 steps (a checkpoint at step 2, credit dumps of every group, verl's own rollout dump),
    then resumed to step 3. One pair of trainer launches for all of them (~3.5 min on 2 cores), not
    one per file. Returns (workdir, rollout_dir, first run's metrics, resumed run's metrics)."""
    from shear_verl.tiny import TinyConfig, run_tiny

    workdir = tmp_path_factory.mktemp("main_job")
    rollout_dir = workdir / "verl_rollouts"
    config = TinyConfig.counting(prompts_per_step=4, group_size=4, save_freq=2, dump_groups=0)
    common = dict(adv="shear", config=config, timeout=600, assets_root=counting_assets.model_dir.parent.parent,
                  extra_overrides=[f"trainer.rollout_data_dir={rollout_dir}"])
    first = run_tiny(workdir, steps=2, **common)
    resumed = run_tiny(workdir, steps=3, resume=True, **common)
    return workdir, rollout_dir, first, resumed
