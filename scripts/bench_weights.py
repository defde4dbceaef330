"""Benchmark the SHEAR weight engine (shear_verl.core) against the naive per-span-pair POT loop.

    python scripts/bench_weights.py            # G=8 (4/4 and 2/6), T in [300, 1500], d in {256, 1024}
    python scripts/bench_weights.py --quick    # one small case, < 60 s on 2 cores
    python scripts/bench_weights.py --paper-scale  # one group of 8 x 3000 tokens x d=3584 in 1 GB
    python scripts/bench_weights.py --states groups.pt  # the same table on captured hidden states
    python scripts/bench_weights.py --device cuda       # the engine and the POT loop on a GPU's tensors
    python scripts/bench_weights.py --write-docs        # also write the table into docs/benchmarks.md

Columns, per case (one GRPO group, w=100, s=25, eps=0.05 relative unless --epsilon, tol=1e-6, float32;
times are the fastest of --repeat runs, 3 by default):
  engine       group_token_weights with exact pruning (the default)
  no-prune     the same engine solving every span pair (brute force)
  POT loop     the naive way, per span pair: M = ot.dist(x, y, metric="euclidean"), then
               ot.sinkhorn2(a, b, M, eps, method="sinkhorn_log", stopThr=tol, numItermax=max_iter)
               on the float32 torch tensors, on the engine's --device (POT's torch backend: on this
               2-core machine it was faster than numpy float32 / float64 inputs, ~2.6 vs ~8.8 / ~10.8 ms
               per pair). Far too slow to run in full: it is timed on a random sample of span pairs
               and extrapolated to all pairs (counting each unordered pair once, which favours POT:
               Algorithm 1's loop visits each pair from both sides).
  solves       transport problems solved (the POT loop solves every pair)
  stopped      candidates the engine started but stopped at one of its checks (every 8 iterations),
               their W1 dual bound having reached the best value of both their spans (not
               counted in solves)
  rel.diff     engine vs no-prune: max relative difference of the token weights;
               engine solver vs POT: max relative difference of the sampled span distances.
  W1 floor     the least share of pairs ANY exact pruning with a bound <= W1 must solve (the
               mean-distance and nearest-neighbour bounds are such bounds), estimated on random
               span pairs (+- one binomial std): a pair whose exact W1 (ot.emd2) is below the final
               minimum W_eps of its row span or of its column span can change that minimum as far
               as such a bound knows, so it cannot be skipped.

Synthetic hidden states with the structure that matters here (documented, not real model
states): each rollout is a sequence of tokens from a vocabulary of random prototype vectors; the
tokens of a response move through "reasoning phases" (each phase draws from its own small
sub-vocabulary, shared by all rollouts of the prompt), and a hidden state is its token's
prototype plus context noise of comparable size. Incorrect rollouts leave the shared phases half
way through. `--iid` uses i.i.d. Gaussian states instead: no structure, so no bound can prune.

The engine's solves are the tiled solver's (span pairs share the kernels of 25 x 25 token blocks,
Anderson-accelerated), pruning's first "seed" pairs included, except pairs too scattered to share
blocks (under 1/16 of a block's tile positions in use) and spans shorter than w, which go to the
per-problem solver.

Caveat on pruning: the context noise is isotropic and as large as the prototypes, so in d >= 256
all span-to-span distances concentrate (W_eps of a span against its candidates differ by a few
percent). The exact bounds (<= W1) then cannot separate them: on the d=256 4/4 case even the exact
W1 as the bound would leave ~63 % of the pairs to solve (W_eps - W1 ~ 0.05 is the entropic blur at
eps = 0.05), and the current bound with best-first order solves 66 %. Real
hidden states are anisotropic (a few dominant directions, lower intrinsic dimension) and less
concentrated; how much pruning they allow must be measured on captured states.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import ot
import torch

from shear_verl.core import ShearConfig, ShearStats, group_token_weights
from shear_verl.core.ot import sinkhorn_transport_cost
from shear_verl.core.spans import span_starts
from shear_verl.core.span_distances import opposing_span_minima
from shear_verl.core.spans import Side
from shear_verl.core.weights import group_mean_norm


def phased_group(lengths: list[int], correct: list[bool], d: int, seed: int, vocab: int = 4096,
                 phase_len: int = 80, phase_vocab: int = 48, noise: float = 0.8) -> list[torch.Tensor]:
    """LM-like hidden states: token prototypes + context noise, tokens drawn per reasoning phase."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(vocab, d, generator=g)  # [V, d]
    phases = max(lengths) // phase_len + 1
    shared = torch.randint(vocab, (phases, phase_vocab), generator=g)  # the prompt's common path
    out = []
    for length, ok in zip(lengths, correct):
        own = torch.randint(vocab, (phases, phase_vocab), generator=g)  # where a wrong answer wanders
        phase = torch.arange(length) // phase_len  # [T]
        pick = torch.randint(phase_vocab, (length,), generator=g)  # [T]
        strays = torch.full((length,), not ok) & (torch.arange(length) >= length // 2)
        tokens = torch.where(strays, own[phase, pick], shared[phase, pick])  # [T]
        out.append(protos[tokens] + noise * torch.randn(length, d, generator=g))  # [T, d]
    return out


def iid_group(lengths: list[int], d: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, d, generator=g) for t in lengths]


def pot_loop_sample(states: list[torch.Tensor], correct: list[bool], cfg: ShearConfig, samples: int,
                    seed: int, repeat: int) -> tuple[float, float]:
    """Seconds per span pair of the naive POT loop (its fastest of ``repeat`` passes over the sampled
    pairs), and the max relative difference between POT's and this engine's solver on those pairs."""
    scale = group_mean_norm(states)
    xs = [h / scale for h in states]  # relative epsilon: eps in units of the group's mean norm
    spans = [[(i, st) for st in span_starts(h.shape[0], cfg.span_len, cfg.stride)] for i, h in enumerate(xs)]
    good = [s for i, sp in enumerate(spans) if correct[i] for s in sp]
    bad = [s for i, sp in enumerate(spans) if not correct[i] for s in sp]
    rng = random.Random(seed)
    pairs = [(rng.choice(good), rng.choice(bad)) for _ in range(samples)]
    w = cfg.span_len
    a = torch.full((w,), 1.0 / w, device=states[0].device)
    per_pair = math.inf
    for _ in range(repeat):
        pot_values, costs = [], []
        start = time.perf_counter()
        for (i, k), (j, l) in pairs:
            cost = ot.dist(xs[i][k:k + w], xs[j][l:l + w], metric="euclidean")  # [w, w]
            pot_values.append(ot.sinkhorn2(a, a, cost, cfg.epsilon, method="sinkhorn_log", stopThr=cfg.tol,
                                           numItermax=cfg.max_iter))
            costs.append(cost)
        _synchronize(states[0].device)
        per_pair = min(per_pair, (time.perf_counter() - start) / samples)
    ours, _ = sinkhorn_transport_cost(torch.stack(costs), cfg.epsilon, cfg.tol, cfg.max_iter)
    pot = torch.stack([torch.as_tensor(v) for v in pot_values]).to(ours)
    return per_pair, float(((ours - pot).abs() / pot).max())


def w1_floor(states: list[torch.Tensor], correct: list[bool], cfg: ShearConfig, samples: int,
             seed: int) -> tuple[float, float]:
    """Estimated share of span pairs no exact bound <= W1 can prune (see the module docstring), and its std."""
    xs = [h / group_mean_norm(states) for h in states]
    good, bad = (Side.build([i for i, c in enumerate(correct) if c == side], [h for h, c in zip(xs, correct) if c == side],
                             cfg) for side in (True, False))
    best_good, best_bad = opposing_span_minima(good, bad, cfg, cfg.epsilon, ShearStats())  # [S_good], [S_bad]
    rng = random.Random(seed)
    span = lambda side, k: side.states[int(side.owner[k])].narrow(0, int(side.start[k]), int(side.length[k]))  # noqa: E731
    must = 0
    for _ in range(samples):
        k, l = rng.randrange(good.num_spans), rng.randrange(bad.num_spans)
        x, y = span(good, k).double().cpu().numpy(), span(bad, l).double().cpu().numpy()
        w1 = ot.emd2(ot.unif(len(x)), ot.unif(len(y)), ot.dist(x, y, metric="euclidean"))
        must += w1 < float(best_good[k]) or w1 < float(best_bad[l])
    share = must / samples
    return share, (share * (1 - share) / samples) ** 0.5


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall times count it."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def run_engine(states, correct, cfg, repeat: int = 1) -> tuple[list[torch.Tensor], float, ShearStats]:
    """The weights, the fastest of ``repeat`` runs' seconds, and one run's statistics (all runs are the same)."""
    seconds = math.inf
    for _ in range(repeat):
        stats = ShearStats()
        start = time.perf_counter()
        weights = group_token_weights(states, correct, cfg, stats=stats)
        _synchronize(states[0].device)
        seconds = min(seconds, time.perf_counter() - start)
    return weights, seconds, stats


def paper_scale(seed: int, budget_mb: float, device: torch.device) -> None:
    """The issue's memory case: G=8 (4/4) x 3000 tokens x d=3584, memory_budget_mb=budget_mb. Prints
    the time, the solves and the peak memory above what was held before the call, after a small
    warm-up group: on the CPU the process's peak RSS (an upper bound on the engine's working memory:
    the peak may also come from building the inputs), on a GPU torch's peak allocation there."""
    import psutil

    correct = [True] * 4 + [False] * 4
    states = [h.to(device) for h in phased_group([3000] * 8, correct, 3584, seed)]
    cfg = ShearConfig(span_len=100, stride=25, epsilon=0.05, memory_budget_mb=budget_mb)
    group_token_weights([h[:300] for h in states[3:5]], correct[3:5], cfg)  # torch's one-time thread pools etc.
    gc.collect()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if on_gpu else psutil.Process().memory_info().rss
    _, seconds, st = run_engine(states, correct, cfg)
    peak = (torch.cuda.max_memory_allocated(device) if on_gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    inputs = sum(h.numel() * h.element_size() for h in states)
    print(f"G=8 4/4 T=3000 d=3584: {seconds:.1f} s, {st.sinkhorn_solves} solves of {st.candidate_pairs} pairs "
          f"({100 * st.sinkhorn_solves / st.candidate_pairs:.1f}%), {st.capped_solves} capped; inputs "
          f"{inputs / 2**20:.0f} MiB on {device}; peak {'allocation' if on_gpu else 'RSS'} above the pre-call one: "
          f"{(peak - before) / 2**20:.0f} MiB "
          f"(memory_budget_mb={budget_mb:g})")


def max_rel_diff(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    return max(float(((x - y).abs() / y.abs()).max()) for x, y in zip(xs, ys) if x.numel())


DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN = "<!-- generated by scripts/bench_weights.py --write-docs: begin -->"
END = "<!-- generated by scripts/bench_weights.py --write-docs: end -->"


def _machine(device: torch.device) -> str:
    """The CPU's model name and core count, or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def write_docs(table: list[str], device: torch.device) -> None:
    """Replace the generated section of docs/benchmarks.md (between BEGIN and END; appended if absent)
    with this run's table, its command, machine, date and commit."""
    root = DOCS.parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    dirty = git("status", "--porcelain", "--", ".", ":!docs")  # changes to the pages are not the code measured
    commit = git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else "")
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    section = "\n".join([
        BEGIN,
        f"`python scripts/bench_weights.py {' '.join(sys.argv[1:])}` on {_machine(device)} "
        f"(load average {load} at the end), {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"commit {commit}:",
        "",
        "```",
        *table,
        "```",
        END,
    ])
    text = DOCS.read_text() if DOCS.exists() else "# Weight-engine benchmarks\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Latest bench run\n\n" + section + "\n"
    DOCS.write_text(text)
    print(f"wrote the table into {DOCS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small case (< 60 s on 2 cores)")
    parser.add_argument("--iid", action="store_true", help="i.i.d. Gaussian states instead of phased ones")
    parser.add_argument("--states", help="captured groups instead of synthetic ones: a torch.save'd dict "
                        "{'hidden_states': [G tensors [T_i, d]], 'correct': [G bools]} or a list of them")
    parser.add_argument("--samples", type=int, default=None, help="span pairs timed in the POT loop")
    parser.add_argument("--floor-samples", type=int, default=400, help="span pairs sampled for the W1 floor")
    parser.add_argument("--paper-scale", action="store_true", help="only the 8 x 3000 x 3584 memory case")
    parser.add_argument("--budget-mb", type=float, default=1024.0, help="memory_budget_mb for --paper-scale")
    parser.add_argument("--epsilon", type=float, default=0.05, help="Sinkhorn eps in units of the group's mean norm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true", help="write the table, with the machine, date and "
                        "commit, into docs/benchmarks.md (its generated section)")
    parser.add_argument("--device", default="cpu", help="where the hidden states live (the engine runs there; "
                        "so does the POT loop, on POT's torch backend)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the engine, no-prune and the POT loop's "
                        "sample; the fastest counts (the same for all three: on a shared 2-core machine single "
                        "runs varied by 10-20 %%)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.paper_scale:
        return paper_scale(args.seed, args.budget_mb, device)

    cfg = ShearConfig(span_len=100, stride=25, epsilon=args.epsilon)
    rng = random.Random(args.seed)
    cases = []  # (name, states, correct, seed)
    if args.states:
        groups = torch.load(args.states, weights_only=True)
        for k, group in enumerate([groups] if isinstance(groups, dict) else groups):
            states, correct = [h.float() for h in group["hidden_states"]], [bool(c) for c in group["correct"]]
            lengths = [h.shape[0] for h in states]
            name = f"#{k} {sum(correct)}/{len(correct) - sum(correct)} d={states[0].shape[1]} T={min(lengths)}-{max(lengths)}"
            cases.append((name, states, correct, rng.randint(0, 2**31)))
    for split, d, lengths in [] if args.states else (
            [("4/4", 256, [300, 420, 360, 480, 330, 450, 390, 300])] if args.quick else
            [(split, d, None) for d in (256, 1024) for split in ("4/4", "2/6")]):
        n_good = int(split.split("/")[0])
        correct = [True] * n_good + [False] * (8 - n_good)
        lengths = lengths or [rng.randint(300, 1500) for _ in correct]
        seed = rng.randint(0, 2**31)
        states = iid_group(lengths, d, seed) if args.iid else phased_group(lengths, correct, d, seed)
        cases.append((f"G=8 {split} d={d} T={min(lengths)}-{max(lengths)}", states, correct, seed))
    samples = args.samples or (30 if args.quick else 100)
    kind = args.states or ("i.i.d." if args.iid else "phased")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    table = []

    def emit(line: str) -> None:
        print(line, flush=True)
        table.append(line)

    emit(f"torch {torch.__version__}, POT {ot.__version__}, {where}, "
          f"{kind} states, w={cfg.span_len} s={cfg.stride} eps={cfg.epsilon} "
          f"({cfg.epsilon_mode}) tol={cfg.tol} max_iter={cfg.max_iter}; POT loop: {samples} random span pairs timed, "
          f"extrapolated to all pairs; times: fastest of {args.repeat} runs")
    header = (f"{'case':<22}{'pairs':>7} | {'engine s':>9}{'solves':>7}{'%':>8}{'stopped':>8}{'capped':>7} | "
              f"{'no-prune s':>10}{'x':>6}{'rel.diff':>9} | {'POT loop s':>10}{'x':>7}{'rel.diff':>9} | "
              f"{'W1 floor':>12}")
    emit(header)
    emit("-" * len(header))
    for name, states, correct, seed in cases:
        states = [h.to(device) for h in states]
        weights, t_engine, st = run_engine(states, correct, cfg, args.repeat)
        brute, t_brute, st_brute = run_engine(states, correct, dataclasses.replace(cfg, prune=False), args.repeat)
        per_pair, pot_diff = pot_loop_sample(states, correct, cfg, samples, seed, args.repeat)
        t_pot = per_pair * st.candidate_pairs
        floor, floor_std = w1_floor(states, correct, cfg, args.floor_samples, seed)
        emit(f"{name:<22}{st.candidate_pairs:>7} | {t_engine:>9.2f}{st.sinkhorn_solves:>7}"
              f"{100 * st.sinkhorn_solves / st.candidate_pairs:>6.1f}%{st.dual_pruned_pairs:>8}{st.capped_solves:>7} | "
              f"{t_brute:>10.2f}{t_brute / t_engine:>6.1f}{max_rel_diff(weights, brute):>9.1e} | "
              f"{t_pot:>10.1f}{t_pot / t_engine:>7.0f}{pot_diff:>9.1e} | "
              f"{100 * floor:>5.1f}+-{100 * floor_std:.1f}%")
        assert st_brute.sinkhorn_solves == st.candidate_pairs
    if args.write_docs:
        write_docs(table, device)


if __name__ == "__main__":
    main()
