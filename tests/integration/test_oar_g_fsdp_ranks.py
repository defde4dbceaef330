"""OAR-G's saliency pass on 2 FSDP2 ranks (gloo, CPU, parameters sharded): ranks with different
numbers of rollouts to score do not hang (the lighter rank pads its calls), and every rank's
saliency equals the unsharded model's. See oar_g_fsdp_worker.py."""

import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("oar_g_fsdp_worker.py")


def test_two_ranks_with_uneven_rows(tmp_path, free_port):
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port),
                   VERL_USE_EXTERNAL_PLUGINS="none", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"rank{rank}.pt")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:  # a hang must not outlive the test
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res["no_grad"]
        for got, ref in zip(res["saliency"], res["reference"]):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-12)
        assert res["stats"][:, 0].tolist() == ([1.0, 1.0, 1.0] if rank == 0 else [1.0, 0.0])
