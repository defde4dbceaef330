"""Ulysses SP (2 gloo processes): the captured rows are gathered across the SP group and the
weights are computed once, on the rank verl collects outputs from. See ulysses_capture_worker.py."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from shear_verl.integration.worker import STATS_KEY, WEIGHTS_KEY

WORKER = Path(__file__).with_name("ulysses_capture_worker.py")


def test_ulysses_gather_two_processes(tmp_path, free_port):
    port = str(free_port)
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   VERL_USE_EXTERNAL_PLUGINS="none")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"rank{rank}.pt")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, res in enumerate(results):
        assert len(res["captured"]) == len(res["reference"])
        for i, (c, ref) in enumerate(zip(res["captured"], res["reference"])):
            assert c.shape == ref.shape, f"rank {r} row {i}"
            torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-6)
    assert [res["collects"] for res in results] == [True, False]
    assert {WEIGHTS_KEY, STATS_KEY} <= set(results[0]["output_fields"])
    assert not {WEIGHTS_KEY, STATS_KEY} & set(results[1]["output_fields"])  # computed once per SP group
