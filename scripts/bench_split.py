"""Benchmark the peer split: the collecting rank's SHEAR wall time, weights split among N gloo
peers (shear_verl.integration.peer_split) vs the single-rank path (compute_batch_weights on every
row), on the same group-heavy batch, in the same run.

    python scripts/bench_split.py                      # 2 peers, 8 groups of 8 x 200-400 tokens, d=256
    python scripts/bench_split.py --peers 4 --groups 16 --d 1024 --repeat 3

Each peer is one process with one CPU thread (torch and numba), standing for one GPU of a TP / SP
group: on a GPU every peer has its own device. Per repeat, rank 0 first runs the single-rank path
while the others wait at a barrier, then every peer runs share_of + split_batch_weights on its own
share (the rows it would have stashed) and the exchange. Times: the fastest of --repeat runs;
"split" is rank 0's wall time from its share's first group to the end of the all-reduce, i.e.
what the pass waits for. The split cannot beat the largest share's cost (printed as "ideal", the
LPT makespan over the total span pairs). States: bench_weights.phased_group (synthetic, LM-like).
On a shared machine N processes on fewer free cores than N will not show 1/N: the load average
before and after is printed.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_batch(groups: int, size: int, t_min: int, t_max: int, d: int, seed: int):
    """uids, rows [T_i, d], masks [T_i], scores [b]: mixed groups (half correct), the same on every rank."""
    from bench_weights import phased_group

    rng = random.Random(seed)
    uids, rows, masks, scores = [], [], [], []
    for k in range(groups):
        correct = [j < size // 2 for j in range(size)]
        lengths = [rng.randint(t_min, t_max) for _ in range(size)]
        for j, h in enumerate(phased_group(lengths, correct, d, rng.randint(0, 2**31))):
            uids.append(f"g{k}")
            rows.append(h)
            masks.append(torch.ones(h.shape[0], dtype=torch.long))
            scores.append(float(correct[j]))
    return uids, rows, masks, torch.tensor(scores)


def peer(args) -> None:
    """One rank: alternate the single-rank path (rank 0 only) and the split; rank 0 prints the table row."""
    import torch.distributed as dist

    from shear_verl.core import ShearConfig
    from shear_verl.integration.peer_split import (Peers, balanced_partition, group_costs, keep_share, share_of,
                                                   split_batch_weights)
    from shear_verl.integration.settings import ShearSettings
    from shear_verl.integration.worker import COL, compute_batch_weights

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    settings = ShearSettings(engine=ShearConfig(span_len=args.w, stride=args.s, epsilon=args.eps))
    uids, rows, masks, scores = make_batch(args.groups, args.size, args.t_min, args.t_max, args.d, args.seed)
    # Warm-up on the first group (numba's compile, torch's pools), untimed, on every rank.
    compute_batch_weights(rows[: args.size], masks[: args.size], scores[: args.size], uids[: args.size], settings)
    peers = Peers(dist.group.WORLD, rank, world, True, rank == 0)
    n_tokens = [int(m.sum()) for m in masks]
    correct = (scores > settings.correct_threshold).tolist()
    share = share_of(uids, n_tokens, correct, settings, peers)
    kept = list(keep_share(torch.nested.as_nested_tensor(rows, layout=torch.jagged), uids, share).unbind())
    single_s = split_s = own_s = float("inf")
    for _ in range(args.repeat):
        dist.barrier()
        if rank == 0:
            t0 = time.perf_counter()
            single, _ = compute_batch_weights(rows, masks, scores, uids, settings)
            single_s = min(single_s, time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        split, stats = split_batch_weights(kept, masks, scores, uids, settings, share, peers)
        split_s = min(split_s, time.perf_counter() - t0)
        rows_of_share = [uids.index(u) for u in share]  # each group's time sits on its first row
        own_s = min(own_s, stats[rows_of_share, COL["time_s"]].sum().item() if share else 0.0)
    own = torch.tensor([own_s])  # this peer's own groups' seconds (fastest repeat)
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, own)
    if rank == 0:
        costs = group_costs(uids, n_tokens, correct, args.w, args.s)
        shares = balanced_partition(costs, world)
        ideal = max(sum(costs[u] for u in s) for s in shares) / sum(costs.values())
        identical = all(torch.equal(a, b) for a, b in zip(split, single))
        print(f"{world:>5} {args.groups:>3}x{args.size:<3} {args.t_min}-{args.t_max:<5} {args.d:>5} | "
              f"{single_s:>9.2f} {split_s:>8.2f} {split_s / single_s:>6.2f} {ideal:>6.2f} | "
              f"{' '.join(f'{g.item():.1f}' for g in gathered):>14} | {'yes' if identical else 'NO'}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--size", type=int, default=8, help="rollouts per group (G)")
    parser.add_argument("--t-min", type=int, default=200)
    parser.add_argument("--t-max", type=int, default=400)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--w", type=int, default=100)
    parser.add_argument("--s", type=int, default=25)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        return peer(args)

    from verl.utils.net_utils import get_free_port

    port = str(get_free_port("127.0.0.1")[0])
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average before {os.getloadavg()[0]:.2f}; "
          f"{args.peers} gloo peers x 1 thread; w={args.w} s={args.s} eps={args.eps} relative; "
          f"phased states; fastest of {args.repeat}")
    print(f"{'peers':>5} {'groups':<7} {'T':<9} {'d':>5} | {'single s':>9} {'split s':>8} {'ratio':>6} "
          f"{'ideal':>6} | {'per-peer s':>14} | identical")
    procs = []
    for rank in range(args.peers):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.peers), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--peer", *sys.argv[1:]], env=env))
    codes = [p.wait() for p in procs]
    print(f"load average after {os.getloadavg()[0]:.2f}")
    if any(codes):
        raise SystemExit(f"a peer failed: exit codes {codes}")


if __name__ == "__main__":
    main()
