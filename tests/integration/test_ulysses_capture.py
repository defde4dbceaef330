"""Ulysses SP (2 and 4 gloo processes, one SP group): the captured rows are gathered across the SP
group; the weights step is split among the SP peers (peer_split), each keeping only its share's
rows, and the rank verl collects outputs from returns every row's weights. See ulysses_capture_worker.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shear_verl.core import ShearConfig, group_token_weights
from shear_verl.integration.settings import ShearSettings
from shear_verl.integration.worker import COL, STATS_KEY, WEIGHTS_KEY

WORKER = Path(__file__).with_name("ulysses_capture_worker.py")
SETTINGS = ShearSettings(engine=ShearConfig(span_len=4, stride=2, epsilon=0.1))  # the worker's (test_fsdp_capture)


def run_ranks(tmp_path, port, world):
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), SP=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, VERL_USE_EXTERNAL_PLUGINS="none", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"rank{rank}.pt")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_gather_and_split_weights(tmp_path, free_port, world):
    results = run_ranks(tmp_path, str(free_port), world)
    for r, res in enumerate(results):
        assert len(res["captured"]) == len(res["reference"])
        for i, (c, ref) in enumerate(zip(res["captured"], res["reference"])):
            assert c.shape == ref.shape, f"rank {r} row {i}"
            torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-6)
    assert [res["collects"] for res in results] == [True] + [False] * (world - 1)
    assert {WEIGHTS_KEY, STATS_KEY} <= set(results[0]["output_fields"])
    for res in results[1:]:
        assert not {WEIGHTS_KEY, STATS_KEY} & set(res["output_fields"])  # returned once per SP group

    # Each peer stashed exactly the rows of its share: whole groups, every group on one peer, no peer idle.
    split = [res["split"] for res in results]
    uids, masks = split[0]["uids"], [m.bool() for m in split[0]["response_mask"]]
    owner: dict[str, int] = {}
    for rank, s in enumerate(split):
        kept = {u for u, n in zip(uids, s["stash_rows"]) if n > 0}
        assert kept, f"SP rank {rank} computed no group"
        for i, (u, n) in enumerate(zip(uids, s["stash_rows"])):
            assert n == (masks[i].shape[0] if u in kept else 0), f"rank {rank} row {i}"
            assert owner.setdefault(u, rank) == rank if u in kept else True
    assert set(owner) == set(uids)
    # After the pass no rank holds captured rows; only the collecting rank returns weights.
    for s in split[1:]:
        assert set(s["output"]) == {"log_probs", "entropy"}
    out = split[0]["output"]
    assert set(out) == {"log_probs", "entropy", WEIGHTS_KEY, STATS_KEY}

    # The gathered weights == group_token_weights on transformers' states (the single-rank path's reference).
    ref = split[0]["reference"]
    correct = [bool(i % 2) for i in range(len(uids))]  # make_batch puts i % 2 on the last token
    for g in sorted(set(uids)):
        members = [i for i, u in enumerate(uids) if u == g]
        expect = group_token_weights([ref[i][masks[i]] for i in members], [correct[i] for i in members],
                                     SETTINGS.engine)
        for i, w in zip(members, expect):
            torch.testing.assert_close(out[WEIGHTS_KEY][i][masks[i]], w, rtol=1e-3, atol=1e-5)
            assert torch.all(out[WEIGHTS_KEY][i][~masks[i]] == 0)
        # the group's stats row names the peer that computed it
        assert out[STATS_KEY][members[0], COL["rank"]].item() == owner[g]
        assert out[STATS_KEY][members[0], COL["sinkhorn_solves"]].item() > 0
