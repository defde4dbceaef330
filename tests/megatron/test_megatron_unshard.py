"""Un-sharding of Megatron's final-norm output: TP (with and without SP) x CP in {1,2}x{1,2}, THD and
BSHD, on 2 and 4 gloo processes (see megatron_capture_worker.py `unshard`).

The ground truth is a known per-sequence tensor; each rank holds it sharded exactly as Megatron
does (verl's own CP zigzag split and padding, megatron's own SP split, sequence-first), and
`per_sequence_rows` must give it back, row for row, through verl's real postprocessing functions.
"""

import pytest
import torch

LENGTHS = [(5, 9), (7, 3), (4, 12), (6, 6), (3, 8)]  # the worker's first five (prompt, response)


def expected_layouts(world: int) -> set:
    keys = set()
    for tp in (1, 2):
        for cp in (1, 2):
            if world % (tp * cp) == 0:
                keys |= {(tp, cp, fmt, sp) for fmt in ("thd", "bshd") for sp in ([False, True] if tp > 1 else [False])}
    return keys


@pytest.mark.parametrize("world", [2, 4])
def test_unshard_equals_ground_truth(request, world):
    results = [r["unshard"] for r in request.getfixturevalue(f"world{world}")]
    for rank, res in enumerate(results):
        assert set(res) == expected_layouts(world), f"rank {rank}"
        for (tp, cp, fmt, sp), r in res.items():
            where = f"rank {rank} tp={tp} cp={cp} {fmt} sp={sp}"
            if sp:
                assert r["local_rows"] * tp == r["full_rows"], where  # each TP rank held 1/TP of the rows
            if cp > 1:  # each CP rank held a zigzag share, not the whole sequence
                assert r["full_rows"] < res[(tp, 1, fmt, sp)]["full_rows"], where
            assert len(r["per_sequence"]) == len(r["truth"]) == len(LENGTHS), where
            for i, (got, truth) in enumerate(zip(r["per_sequence"], r["truth"])):
                assert torch.equal(got, truth), f"{where} sequence {i}"
            for i, (got, (p, n)) in enumerate(zip(r["response"], LENGTHS)):
                # verl's log-prob shift: the state at position P-1+t predicts response token t
                assert torch.equal(got, r["truth"][i][p - 1 : p + n - 1]), f"{where} response {i}"
