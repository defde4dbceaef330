"""One rank of the peer-split identity check (run by test_peer_split.py, not by pytest).

    python split_worker.py OUT.pt     (env: RANK, WORLD_SIZE, MASTER_*)

For a few seeded random batches (groups of varied sizes and lengths, mixed, all-correct and
all-incorrect groups), every rank draws the same batch, keeps only its share's rows (the others
cut to length 0, as the capture stashes them) and runs `split_batch_weights` over the world
group; rank 0 also runs the single-rank path (`compute_batch_weights` on every row) to compare.
"""

import os
import sys

import torch
import torch.distributed as dist

SEEDS = range(4)


def make_batch(seed: int, hidden: int = 16):
    """uids, hidden rows [L_i, H], response masks [L_i], scores [b]: the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    uids, rows, masks, scores = [], [], [], []
    n_groups = int(torch.randint(3, 8, (1,), generator=g))
    for k in range(n_groups):
        size = int(torch.randint(2, 6, (1,), generator=g))
        kind = int(torch.randint(0, 4, (1,), generator=g))  # 0: all correct, 1: all incorrect, else mixed
        for j in range(size):
            n = int(torch.randint(3, 30, (1,), generator=g))
            m = torch.ones(n, dtype=torch.long)
            if n > 8:
                m[2:4] = 0  # a tool span inside the response
            uids.append(f"g{k}")
            rows.append(torch.randn(n, hidden, generator=g) * 3)
            masks.append(m)
            scores.append(1.0 if kind == 0 else 0.0 if kind == 1 else float(j % 2))
    return uids, rows, masks, torch.tensor(scores)


def main(out_path: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from shear_verl.core import ShearConfig
    from shear_verl.integration.peer_split import Peers, keep_share, share_of, split_batch_weights
    from shear_verl.integration.settings import ShearSettings
    from shear_verl.integration.worker import compute_batch_weights

    settings = ShearSettings(engine=ShearConfig(span_len=4, stride=2, epsilon=0.1))
    peers = Peers(dist.group.WORLD, rank, world, True, rank == 0)
    results = []
    for seed in SEEDS:
        uids, rows, masks, scores = make_batch(seed)
        n_tokens = [int(m.sum()) for m in masks]
        share = share_of(uids, n_tokens, (scores > settings.correct_threshold).tolist(), settings, peers)
        padded = torch.nested.as_nested_tensor(rows, layout=torch.jagged)
        kept = list(keep_share(padded, uids, share).unbind())  # what this peer stashed
        weights, stats = split_batch_weights(kept, masks, scores, uids, settings, share, peers)
        res = {"uids": uids, "share": sorted(share), "stash_rows": [r.shape[0] for r in kept],
               "weights": weights, "stats": stats}
        if rank == 0:
            res["single_weights"], res["single_stats"] = compute_batch_weights(rows, masks, scores, uids, settings)
        results.append(res)
    torch.save(results, out_path)
    dist.barrier()  # no rank tears gloo down while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
