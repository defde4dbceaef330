"""The weight engine of another commit against this tree's, on the bench groups, in one run.

    python scripts/bench_compare.py --before main          # engine at `main` vs the working tree
    python scripts/bench_compare.py --before HEAD~3 --rounds 5

Why: a refactoring must leave the weights, the number of solves and the speed unchanged, and on a
shared machine only runs interleaved in time are comparable. The commit's ``shear_verl`` is
exported (``git archive``) to a temporary directory; each round runs the same groups (those of
``bench_weights.py``: G=8, 4/4 and 2/6, d in {256, 1024}, phased and i.i.d. states) in one
subprocess per tree, the two trees alternating (before, after, after, before, ...), after one
uncounted round that fills numba's caches. Prints, per
group: the fastest time of each tree, their ratio, the max relative difference of the weights and
both solve counts; and the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def cases(seed: int) -> list[tuple[str, list[torch.Tensor], list[bool]]]:
    """The default groups of ``bench_weights.py`` (phased), and the same lengths with i.i.d. states."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_weights import iid_group, phased_group

    out = []
    rng = random.Random(seed)
    for d in (256, 1024):
        for split in ("4/4", "2/6"):
            n_good = int(split.split("/")[0])
            correct = [True] * n_good + [False] * (8 - n_good)
            lengths = [rng.randint(300, 1500) for _ in correct]
            case_seed = rng.randint(0, 2**31)
            out.append((f"phased {split} d={d}", phased_group(lengths, correct, d, case_seed), correct))
            out.append((f"i.i.d. {split} d={d}", iid_group(lengths, d, case_seed), correct))
    return out


def worker(groups: str, out: str, repeat: int) -> None:
    """Run the engine found first on sys.path on the saved groups; save the fastest times, weights, solves."""
    from shear_verl.core import ShearConfig, ShearStats, group_token_weights

    data = torch.load(groups, weights_only=True)
    cfg = ShearConfig(span_len=100, stride=25, epsilon=0.05)
    group_token_weights([h[:300] for h in data["states"][0][3:5]], [True, False], cfg)  # numba's cache load etc.
    results = []
    for states, correct in zip(data["states"], data["correct"]):
        seconds = float("inf")
        for _ in range(repeat):
            stats = ShearStats()
            start = time.perf_counter()
            weights = group_token_weights(states, correct, cfg, stats=stats)
            seconds = min(seconds, time.perf_counter() - start)
        results.append({"seconds": seconds, "weights": weights, "stats": dataclasses.asdict(stats)})
    torch.save(results, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="main", help="the commit to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree (alternating)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each group per round (the fastest counts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="also print every run's seconds")
    parser.add_argument("--worker", nargs=2, metavar=("GROUPS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.repeat)

    named = cases(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = Path(tmp) / "before"
        before_tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "shear_verl"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before_tree)], input=archive, check=True)
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before], check=True,
                                capture_output=True, text=True).stdout.strip()
        groups = Path(tmp) / "groups.pt"
        torch.save({"states": [s for _, s, _ in named], "correct": [c for _, _, c in named]}, groups)
        trees = {"before": before_tree, "after": ROOT}
        runs: dict[str, list] = {"before": [], "after": []}
        load_start = os.getloadavg()
        for r in range(-1, args.rounds):  # round -1 compiles numba's kernels into each tree's cache: not counted
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                out = Path(tmp) / f"{name}{r}.pt"
                env = dict(os.environ, PYTHONPATH=str(trees[name]))
                subprocess.run([sys.executable, __file__, "--worker", str(groups), str(out), "--repeat",
                                str(args.repeat)], check=True, env=env, cwd=tmp)
                if r >= 0:
                    runs[name].append(torch.load(out, weights_only=False))
        load_end = os.getloadavg()
    print(f"before: {args.before} ({commit}), after: the working tree; {args.rounds} rounds alternating, "
          f"fastest of {args.rounds * args.repeat} runs per tree; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average (1/5/15 min) {load_start[0]:.1f}/{load_start[1]:.1f}/"
          f"{load_start[2]:.1f} at the start, {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at the end")
    header = f"{'group':<20}{'before s':>9}{'after s':>9}{'after/before':>13}{'spread':>8}{'rel.diff':>10}{'solves':>14}"
    print(header)
    print("-" * len(header))
    for k, (name, _, _) in enumerate(named):
        t = {tree: [run[k]["seconds"] for run in runs[tree]] for tree in runs}
        before, after = runs["before"][0][k], runs["after"][0][k]
        diff = max(float(((x - y).abs() / y.abs()).max()) for x, y in zip(after["weights"], before["weights"]) if x.numel())
        spread = max(max(v) / min(v) - 1 for v in t.values())  # run-to-run noise of one tree
        solves = f"{before['stats']['sinkhorn_solves']}/{after['stats']['sinkhorn_solves']}"
        print(f"{name:<20}{min(t['before']):>9.2f}{min(t['after']):>9.2f}{min(t['after']) / min(t['before']):>13.3f}"
              f"{100 * spread:>7.0f}%{diff:>10.1e}{solves:>14}", flush=True)
        if args.verbose:
            print("    " + "; ".join(f"{tree}: " + " ".join(f"{x:.2f}" for x in v) for tree, v in t.items()))


if __name__ == "__main__":
    main()
