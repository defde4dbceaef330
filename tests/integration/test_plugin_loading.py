"""The `verl.plugins` entry point: loads on `import verl` in a fresh process, registers `shear`,
and leaves verl's own estimator tests (verl 0.9.1 sdist) passing."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

PROBE = r"""
import importlib.metadata as md, sys
import verl
eps = [e for e in md.entry_points(group="verl.plugins") if e.name == "shear"]
assert eps and eps[0].value == "shear_verl.plugin", eps
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
fn = get_adv_estimator_fn("shear")
import shear_verl.plugin as p
print(fn.__module__, fn.__name__, p.status()["shear"])
# the patched modules are NOT imported by the plugin itself (kept light)
print("trainer_base" in " ".join(sys.modules))
"""


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_plugin_registers_shear_in_a_fresh_process():
    res = _run(PROBE)
    assert res.returncode == 0, res.stderr[-3000:]
    first, second = res.stdout.strip().splitlines()[-2:]
    assert first == "shear_verl.integration.estimator compute_shear_outcome_advantage registered"
    assert second == "False"


def test_patches_apply_when_verl_imports_the_trainer_and_engine():
    code = (
        "import verl\n"
        "from verl.trainer.ppo.v1.trainer_base import PPOTrainer\n"
        "from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead as E\n"
        "flag = '__shear_verl_patched__'\n"
        "print(all(getattr(getattr(PPOTrainer, n), flag, False) for n in "
        "('__init__', '_balance_batch', '_compute_old_log_prob', '_compute_advantage')),"
        " all(getattr(getattr(E, n), flag, False) for n in ('forward_step', 'prepare_model_outputs', 'infer_batch')))\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "True True"


def test_disabling_plugins_leaves_verl_untouched():
    res = _run(PROBE, VERL_USE_EXTERNAL_PLUGINS="none")
    assert res.returncode != 0 and "shear" in res.stderr  # verl itself does not know `shear`


def _verl_sdist(tmp_root: Path) -> Path:
    """verl 0.9.1's sdist (its tests are not in the wheel), downloaded once from PyPI."""
    root = tmp_root / "verl-0.9.1"
    if not root.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "verl==0.9.1", "-d", str(tmp_root), "-q"], check=True, timeout=600)
        with tarfile.open(tmp_root / "verl-0.9.1.tar.gz") as tar:
            tar.extractall(tmp_root, filter="data")
    return root


def test_verls_own_estimator_tests_pass_with_plugin(tmp_path_factory):
    cache = Path(os.environ.get("SHEAR_CACHE", Path(__file__).resolve().parents[2] / ".cache"))
    cache.mkdir(parents=True, exist_ok=True)
    root = _verl_sdist(cache)
    files = ["tests/trainer/ppo/test_core_algos_on_cpu.py", "tests/trainer/test_multi_trajectories_advantage_on_cpu.py"]
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root), *files],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout
    # the plugin really was loaded in that run
    probe = _run("import verl, shear_verl.plugin as p; print(p.status()['shear'])")
    assert probe.stdout.strip().splitlines()[-1] == "registered"
