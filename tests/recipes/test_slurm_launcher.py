"""scripts/slurm/shear.sbatch with fake Slurm / Ray programs (no cluster here): the dry run prints
the head / worker / driver commands for 1 and 3 nodes; a real run through the fakes starts one Ray
process per node, logs per node, runs the recipe with the node count, and leaves no process behind
whether the recipe succeeds or fails."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

FAKE_SCONTROL = """#!/usr/bin/env bash
# `scontrol show hostnames LIST`: one host per line, as Slurm prints them
[ "$1 $2" = "show hostnames" ] && [ "$3" = "$EXPECT_NODELIST" ] || { echo "unexpected: $*" >&2; exit 3; }
printf '%s\\n' $FAKE_HOSTS
"""
FAKE_SRUN = """#!/usr/bin/env bash
# runs the step's command locally, "on" the node given with -w (exported as FAKE_NODE)
node=""
while [ $# -gt 0 ]; do
  case "$1" in -w) node="$2"; shift 2 ;; --*) shift ;; *) break ;; esac
done
echo "$node $*" >> "$FAKE_STATE/srun.calls"
if [ "$1 $2" = "hostname --ip-address" ]; then echo "10.9.8.7 fe80::1"; exit 0; fi
FAKE_NODE="$node" exec "$@"
"""
FAKE_RAY = """#!/usr/bin/env bash
case "$1" in
  start) echo "ray $* on $FAKE_NODE"; echo $$ > "$FAKE_STATE/ray-$FAKE_NODE.pid"; exec sleep 300 ;;
  stop) kill "$(cat "$FAKE_STATE/ray-$FAKE_NODE.pid")" 2>/dev/null; echo "$FAKE_NODE" >> "$FAKE_STATE/stops" ;;
  *) exit 3 ;;
esac
"""
FAKE_PYTHON = f"""#!/usr/bin/env bash
# `python -c ...` (the per-job token) runs for real; the wait for GPUs is recorded
[ "$1" = -c ] && exec {sys.executable} "$@"
echo "$*" >> "$FAKE_STATE/wait.calls"
exit "${{FAKE_WAIT_RC:-0}}"
"""
FAKE_RECIPE = """#!/usr/bin/env bash
echo "recipe on $FAKE_NODE NNODES=$NNODES N_GPUS_PER_NODE=$N_GPUS_PER_NODE RAY_ADDRESS=$RAY_ADDRESS args=$*"
exit "${FAKE_RECIPE_RC:-0}"
"""


def executable(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def slurm(tmp_path, repo):
    """Environment for shear.sbatch with every external program replaced by a fake."""
    state = tmp_path / "state"
    state.mkdir()
    env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path),
        "SRUN": executable(tmp_path / "srun", FAKE_SRUN),
        "SCONTROL": executable(tmp_path / "scontrol", FAKE_SCONTROL),
        "RAY": executable(tmp_path / "ray", FAKE_RAY),
        "PYTHON": executable(tmp_path / "python", FAKE_PYTHON),
        "REPO_DIR": str(repo), "SLURM_JOB_ID": "4242", "LOG_DIR": str(tmp_path / "logs"), "FAKE_STATE": str(state),
    }
    return env, state


def nodes(hosts: list[str], nodelist: str) -> dict:
    return {"SLURM_JOB_NODELIST": nodelist, "EXPECT_NODELIST": nodelist, "FAKE_HOSTS": " ".join(hosts)}


def sbatch(run_cmd, repo, env, *args, check=True):
    return run_cmd(["bash", str(repo / "scripts" / "slurm" / "shear.sbatch"), *args], env=env, check=check)


@pytest.mark.parametrize("hosts", [["gpu07"], ["gpu01", "gpu02", "gpu03"]])
def test_dry_run_prints_head_worker_and_driver_commands(run_cmd, repo, slurm, hosts):
    env, state = slurm
    env = {**env, **nodes(hosts, "gpu[01-03]" if len(hosts) > 1 else "gpu07"), "SLURM_GPUS_PER_NODE": "h100:4"}
    out = sbatch(run_cmd, repo, env, "--dry-run", "trainer.total_training_steps=3").stdout
    srun, ray, py, logs = env["SRUN"], env["RAY"], env["PYTHON"], env["LOG_DIR"]
    head, workers = hosts[0], hosts[1:]
    recipe = f"{repo}/recipes/run_shear_math.sh"
    expected = [
        f"+ {srun} --nodes=1 --ntasks=1 -w {head} {ray} start --head --node-ip-address=10.9.8.7 --port=6379 "
        f"--num-gpus=4 --block > {logs}/ray-head-{head}.log 2>&1",
        f"+ {py} {repo}/scripts/slurm/wait_for_gpus.py --address=10.9.8.7:6379 --gpus=4 --timeout=900",
        *(f"+ {srun} --nodes=1 --ntasks=1 -w {w} {ray} start --address=10.9.8.7:6379 --num-gpus=4 --block "
          f"> {logs}/ray-worker-{w}.log 2>&1" for w in workers),
        *([f"+ {py} {repo}/scripts/slurm/wait_for_gpus.py --address=10.9.8.7:6379 --gpus={4 * len(hosts)} "
           "--timeout=900"] if workers else []),
        f"+ {srun} --overlap --nodes=1 --ntasks=1 -w {head} env NNODES={len(hosts)} N_GPUS_PER_NODE=4 "
        f"RAY_ADDRESS=10.9.8.7:6379 bash {recipe} trainer.total_training_steps=3 2>&1 | tee {logs}/driver.log",
        *(f"+ {srun} --overlap --nodes=1 --ntasks=1 -w {h} {ray} stop --force" for h in hosts),
    ]
    commands = [line for line in out.splitlines() if line.startswith("+ ") and "RAY_AUTH" not in line]
    assert commands == expected
    # the recipe's own dry run follows, with the cluster's size
    assert f"trainer.nnodes={len(hosts)} " in out and "trainer.n_gpus_per_node=4 " in out
    assert "trainer.total_training_steps=3" in out.splitlines()[-len(hosts) - 2]  # passed through, last
    # nothing was started: the only step run was the head's address lookup
    assert (state / "srun.calls").read_text() == f"{head} hostname --ip-address\n"
    assert not Path(logs).exists()


def test_real_run_through_fakes_logs_per_node_and_shuts_down(run_cmd, repo, slurm, tmp_path):
    env, state = slurm
    hosts = ["n1", "n2", "n3"]
    env = {**env, **nodes(hosts, "n[1-3]"), "SLURM_GPUS_ON_NODE": "8",
           "RECIPE": executable(tmp_path / "recipe.sh", FAKE_RECIPE)}
    out = sbatch(run_cmd, repo, env, "data.seed=5").stdout
    logs = Path(env["LOG_DIR"])
    assert "recipe on n1 NNODES=3 N_GPUS_PER_NODE=8 RAY_ADDRESS=10.9.8.7:6379 args=data.seed=5" in out
    assert (logs / "driver.log").read_text().startswith("recipe on n1 NNODES=3 ")
    assert "start --head --node-ip-address=10.9.8.7" in (logs / "ray-head-n1.log").read_text()
    for worker in ("n2", "n3"):
        assert f"start --address=10.9.8.7:6379 --num-gpus=8 --block on {worker}" in (
            logs / f"ray-worker-{worker}.log").read_text()
    assert (state / "wait.calls").read_text().split("\n")[:2] == [
        f"{repo}/scripts/slurm/wait_for_gpus.py --address=10.9.8.7:6379 --gpus=8 --timeout=900",
        f"{repo}/scripts/slurm/wait_for_gpus.py --address=10.9.8.7:6379 --gpus=24 --timeout=900",
    ]
    assert_shut_down(state, hosts, started=hosts)


@pytest.mark.parametrize("failure", [{"FAKE_RECIPE_RC": "7"}, {"FAKE_WAIT_RC": "1"}])
def test_failures_propagate_and_still_shut_down(run_cmd, repo, slurm, tmp_path, failure):
    env, state = slurm
    hosts = ["a", "b"]
    env = {**env, **nodes(hosts, "a,b"), **failure, "RECIPE": executable(tmp_path / "recipe.sh", FAKE_RECIPE)}
    proc = sbatch(run_cmd, repo, env, check=False)
    assert proc.returncode == int(failure.get("FAKE_RECIPE_RC", 1))
    assert ("recipe on a" in proc.stdout) == ("FAKE_RECIPE_RC" in failure)  # no driver before the GPUs joined
    # a failed wait for the head's GPUs stops before any worker is started
    assert_shut_down(state, hosts, started=hosts if "FAKE_RECIPE_RC" in failure else hosts[:1])


def assert_shut_down(state: Path, hosts: list[str], started: list[str]) -> None:
    """Ray was started on `started`; `ray stop` ran on every node and no fake Ray process is left."""
    assert sorted((state / "stops").read_text().split()) == sorted(hosts)
    assert sorted(p.name for p in state.glob("ray-*.pid")) == sorted(f"ray-{h}.pid" for h in started)
    for pid_file in state.glob("ray-*.pid"):
        pid = int(pid_file.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_misconfiguration_fails_clearly(run_cmd, repo, slurm):
    env, _ = slurm
    proc = sbatch(run_cmd, repo, env, "--dry-run", check=False)
    assert proc.returncode != 0 and "set SLURM_JOB_NODELIST" in proc.stderr
    proc = sbatch(run_cmd, repo, {**env, **nodes(["x"], "x"), "RECIPE": "recipes/nope.sh"}, "--dry-run", check=False)
    assert proc.returncode != 0 and "recipe" in proc.stderr and "nope.sh" in proc.stderr
    proc = sbatch(run_cmd, repo, {**env, **nodes(["x"], "x"), "N_GPUS_PER_NODE": "many"}, "--dry-run", check=False)
    assert proc.returncode != 0 and "set N_GPUS_PER_NODE" in proc.stderr
