"""The step overhead SHEAR should add to a GRPO run: the engine measured per group on this device,
scaled to a cluster layout; or the overhead measured from two tiny runs' logs.

    python scripts/bench_overhead.py                   # the paper's layout, engine timed at T=600-1000
    python scripts/bench_overhead.py --group-size 8 --t-min 2500 --t-max 3500 --d 3584 --device cuda \\
        --gpus 64 --tp 4 --prompts-per-step 512 --grpo-step-s 300
    python scripts/bench_overhead.py --states groups.pt --gpus 16 --prompts-per-step 128 --grpo-step-s 120
    python scripts/bench_overhead.py --epsilon-sweep   # absolute eps=4.5 at n_bar 45..360 vs relative 0.05
    python scripts/bench_overhead.py --from-logs SHEAR_WORKDIR GRPO_WORKDIR

Engine: shear_verl.core.group_token_weights on --groups synthetic groups of --group-size rollouts
(half correct, lengths uniform in [--t-min, --t-max], bench_weights.phased_group states) or on the
captured groups of --states (bench_weights' format), after an untimed warm-up; fastest of --repeat.
--target-t T extrapolates the measured time to responses of T tokens by span pairs: a group's cost
is sum_{i correct, j incorrect} K_i K_j with K ~ T / s spans per response (peer_split.group_costs),
i.e. ~ (T / s)^2, at the measured seconds per span pair (same d, w, s, eps; assumes the pruned
share and the iterations per solve stay as measured).

Layout: a data-parallel rank holds --prompts-per-step / (--gpus / (tp * sp)) groups; its tp * sp
peers split them (shear_verl.integration.peer_split, LPT by span pairs), so the step waits
groups_per_rank * per_group_s / (tp * sp) (the ideal split; the slowest rank). Overhead = that /
--grpo-step-s, your measured GRPO step time (several values give several rows). "paper" is the
SHEAR paper's reported training-time overhead over GRPO (Chen et al. 2026, arXiv 2604.23318):
+15.5 % Qwen2.5-Math-7B, +10.4 % Llama3.1-8B-Instruct, +7.4 % Qwen2.5-14B, as reported (the paper
does not tie them to a GPU layout or step time). "break-even step s" is the GRPO step time at which
this estimate equals the paper's 7B figure.

--from-logs reads the metrics-*.jsonl of two tiny-run workdirs (shear_verl.tiny.run.load_metrics)
and prints mean timing_s/step of each (the first step skipped as warm-up when a run has >= 3),
SHEAR's overhead over GRPO, and the mean share of shear/time_s in the SHEAR run's step.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PAPER = (("Qwen2.5-Math-7B", 15.5), ("Llama3.1-8B-Instruct", 10.4), ("Qwen2.5-14B", 7.4))
STEP_KEY, SHEAR_KEY = "timing_s/step", "shear/time_s"


def synthetic_groups(groups: int, size: int, t_min: int, t_max: int, d: int, seed: int):
    """[(states [T_i, d] per rollout, correct)]: half correct, lengths uniform in [t_min, t_max]."""
    from bench_weights import phased_group

    rng = random.Random(seed)
    out = []
    for _ in range(groups):
        correct = [j < size // 2 for j in range(size)]
        lengths = [rng.randint(t_min, t_max) for _ in range(size)]
        out.append((phased_group(lengths, correct, d, rng.randint(0, 2**31)), correct))
    return out


def captured_groups(path: str):
    groups = torch.load(path, weights_only=True)
    return [([h.float() for h in g["hidden_states"]], [bool(c) for c in g["correct"]])
            for g in ([groups] if isinstance(groups, dict) else groups)]


def span_pairs(lengths, correct, w: int, s: int) -> int:
    from shear_verl.integration.peer_split import group_costs

    return group_costs(["g"] * len(lengths), lengths, correct, w, s)["g"]


def time_groups(groups, cfg, device, repeat: int) -> dict:
    """Engine seconds (fastest of ``repeat``, summed over groups), span pairs, solves, capped solves."""
    from bench_weights import run_engine

    from shear_verl.core import group_token_weights

    h, c = groups[0]
    group_token_weights([x[:200].to(device) for x in h], c, cfg)  # warm-up: numba compile, thread pools
    total = {"seconds": 0.0, "pairs": 0, "solves": 0, "capped": 0, "groups": len(groups)}
    for states, correct in groups:
        _, seconds, st = run_engine([x.to(device) for x in states], correct, cfg, repeat)
        total["seconds"] += seconds
        total["pairs"] += st.candidate_pairs
        total["solves"] += st.sinkhorn_solves
        total["capped"] += st.capped_solves
    return total


def layout_table(args, per_group_s: float) -> None:
    peers = args.tp * args.sp
    if args.gpus % peers:
        raise SystemExit(f"--gpus {args.gpus} is not a multiple of tp * sp = {peers}")
    dp = args.gpus // peers
    per_rank = math.ceil(args.prompts_per_step / dp)
    shear_s = per_rank * per_group_s / peers
    paper = " / ".join(f"+{p:.1f} %" for _, p in PAPER)
    print(f"\nlayout: {args.gpus} GPUs, tp={args.tp} sp={args.sp} -> {dp} data-parallel ranks, "
          f"{args.prompts_per_step} prompts/step -> {per_rank} groups per rank, split among {peers} peer(s)")
    print(f"paper (as reported, {' / '.join(m for m, _ in PAPER)}): {paper}; "
          f"break-even step s (SHEAR s / 0.155): {shear_s / 0.155:.1f}")
    header = f"{'groups/rank':>11} {'per-group s':>11} {'SHEAR s/step':>12} | {'GRPO step s':>11} {'overhead':>9} | paper"
    print(header)
    print("-" * len(header))
    for step_s in args.grpo_step_s:
        print(f"{per_rank:>11} {per_group_s:>11.2f} {shear_s:>12.1f} | {step_s:>11.1f} "
              f"{100 * shear_s / step_s:>+8.1f}% | {paper}")


def epsilon_sweep(groups, cfg, device, repeat: int) -> None:
    """Absolute eps=4.5 on the groups scaled to mean norm n_bar vs relative 0.05 (scale-free)."""
    import dataclasses

    from shear_verl.core.weights import group_mean_norm

    rel = time_groups(groups, dataclasses.replace(cfg, epsilon=0.05, epsilon_mode="relative"), device, repeat)
    print("\nepsilon sweep: absolute 4.5 equals relative 0.05 at n_bar = 90")
    header = f"{'mode':<22} {'n_bar':>6} {'eps/n_bar':>9} | {'weights s':>9} {'x rel':>6} {'solves':>7} {'capped':>7}"
    print(header)
    print("-" * len(header))
    print(f"{'relative 0.05':<22} {'any':>6} {0.05:>9.4f} | {rel['seconds']:>9.2f} {1.0:>6.2f} "
          f"{rel['solves']:>7} {rel['capped']:>7}", flush=True)
    for n_bar in (45.0, 90.0, 180.0, 360.0):
        scaled = [([x * (n_bar / group_mean_norm(h)) for x in h], c) for h, c in groups]
        try:
            r = time_groups(scaled, dataclasses.replace(cfg, epsilon=4.5, epsilon_mode="absolute"), device, repeat)
        except Exception as err:  # a bench reports the engine's failure as a row, the sweep goes on
            cause = err.__cause__ or err
            print(f"{'absolute 4.5':<22} {n_bar:>6.0f} {4.5 / n_bar:>9.4f} | engine failed: {type(cause).__name__} "
                  f"({type(err).__name__})", flush=True)
            continue
        print(f"{'absolute 4.5':<22} {n_bar:>6.0f} {4.5 / n_bar:>9.4f} | {r['seconds']:>9.2f} "
              f"{r['seconds'] / rel['seconds']:>6.2f} {r['solves']:>7} {r['capped']:>7}", flush=True)


def _step_times(rows: list[dict], workdir: str) -> tuple[list[dict], bool]:
    rows = [r for r in rows if STEP_KEY in r]
    if not rows:
        raise SystemExit(f"{workdir}: no step logged {STEP_KEY!r}")
    skip = len(rows) >= 3
    return (rows[1:] if skip else rows), skip


def from_logs(shear_dir: str, grpo_dir: str) -> dict:
    """Mean step time of each run, SHEAR's overhead over GRPO, mean shear/time_s share of a step."""
    from shear_verl.tiny.run import load_metrics

    runs = {}
    for name, workdir in (("shear", shear_dir), ("grpo", grpo_dir)):
        try:
            metrics, _ = load_metrics(workdir)
        except FileNotFoundError as err:
            raise SystemExit(f"--from-logs: {err}") from None
        runs[name] = _step_times(metrics, workdir)
    shear_rows, shear_skip = runs["shear"]
    grpo_rows, grpo_skip = runs["grpo"]
    if not all(SHEAR_KEY in r for r in shear_rows):
        raise SystemExit(f"{shear_dir}: a step lacks {SHEAR_KEY!r} (is it a SHEAR run?)")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    shear_step = mean([float(r[STEP_KEY]) for r in shear_rows])
    grpo_step = mean([float(r[STEP_KEY]) for r in grpo_rows])
    return {"shear_step_s": shear_step, "grpo_step_s": grpo_step, "overhead": shear_step / grpo_step - 1,
            "shear_share": mean([float(r[SHEAR_KEY]) / float(r[STEP_KEY]) for r in shear_rows]),
            "shear_steps": len(shear_rows), "grpo_steps": len(grpo_rows), "skipped": (shear_skip, grpo_skip)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-logs", nargs=2, metavar=("SHEAR_DIR", "GRPO_DIR"),
                        help="two tiny-run workdirs: print the measured overhead and stop")
    parser.add_argument("--states", help="captured groups (bench_weights --states format) instead of synthetic ones")
    parser.add_argument("--groups", type=int, default=2, help="synthetic groups timed (their mean is per-group s)")
    parser.add_argument("--group-size", type=int, default=8, help="rollouts per group (G)")
    parser.add_argument("--t-min", type=int, default=600, help="shortest response (tokens)")
    parser.add_argument("--t-max", type=int, default=1000, help="longest response (tokens)")
    parser.add_argument("--target-t", type=int, default=3000,
                        help="extrapolate per-group time by span pairs to responses of this length (0: no)")
    parser.add_argument("--d", type=int, default=3584, help="hidden size (Qwen2.5-7B: 3584)")
    parser.add_argument("--span-len", type=int, default=100, help="w")
    parser.add_argument("--stride", type=int, default=25, help="s")
    parser.add_argument("--epsilon", type=float, default=0.05, help="Sinkhorn eps (relative to n_bar)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="engine runs per group; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--tp", type=int, default=1, help="Megatron TP (x CP on the last pipeline stage)")
    parser.add_argument("--sp", type=int, default=1, help="FSDP Ulysses SP size")
    parser.add_argument("--prompts-per-step", type=int, default=512)
    parser.add_argument("--grpo-step-s", type=float, nargs="+", default=[300.0, 600.0, 1200.0],
                        help="your measured GRPO step time(s), seconds")
    parser.add_argument("--epsilon-sweep", action="store_true",
                        help="also time absolute eps=4.5 at n_bar 45/90/180/360 vs relative 0.05")
    args = parser.parse_args()

    if args.from_logs:
        r = from_logs(*args.from_logs)
        skipped = [n for n, s in zip(("SHEAR", "GRPO"), r["skipped"]) if s]
        print(f"steps averaged: SHEAR {r['shear_steps']}, GRPO {r['grpo_steps']}"
              + (f" (first step skipped as warm-up in {' and '.join(skipped)})" if skipped else ""))
        print(f"mean {STEP_KEY}: SHEAR {r['shear_step_s']:.2f} s, GRPO {r['grpo_step_s']:.2f} s -> "
              f"overhead {100 * r['overhead']:+.1f} %; {SHEAR_KEY} share of the SHEAR step {100 * r['shear_share']:.1f} %")
        return

    from shear_verl.core import ShearConfig

    for name in ("groups", "group_size", "t_min", "gpus", "tp", "sp", "prompts_per_step"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.t_max < args.t_min:
        raise SystemExit("--t-max must be >= --t-min")
    if args.states and not Path(args.states).is_file():
        raise SystemExit(f"--states {args.states}: no such file")
    device = torch.device(args.device)
    cfg = ShearConfig(span_len=args.span_len, stride=args.stride, epsilon=args.epsilon)
    groups = (captured_groups(args.states) if args.states else
              synthetic_groups(args.groups, args.group_size, args.t_min, args.t_max, args.d, args.seed))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    shapes = (args.states or f"{args.groups} phased group(s) of G={args.group_size}, T={args.t_min}-{args.t_max}, "
              f"d={args.d}")
    print(f"torch {torch.__version__}, {where}; {shapes}; w={cfg.span_len} s={cfg.stride} eps={cfg.epsilon} "
          f"({cfg.epsilon_mode}); fastest of {args.repeat}")
    t = time_groups(groups, cfg, device, args.repeat)
    per_group_s = t["seconds"] / t["groups"]
    print(f"measured: {per_group_s:.2f} s/group, {t['pairs'] / t['groups']:.0f} span pairs/group, "
          f"{100 * t['solves'] / t['pairs']:.1f} % solved, {t['capped']} capped, "
          f"{1e3 * t['seconds'] / t['pairs']:.3f} ms/span pair")
    if args.target_t and not args.states:
        correct = groups[0][1]
        target = span_pairs([args.target_t] * len(correct), correct, cfg.span_len, cfg.stride)
        per_group_s = t["seconds"] / t["pairs"] * target
        print(f"extrapolated to T={args.target_t}: {target} span pairs/group -> {per_group_s:.2f} s/group "
              f"(x{target * t['groups'] / t['pairs']:.1f} the measured pairs)")
    layout_table(args, per_group_s)
    if args.epsilon_sweep:
        epsilon_sweep(groups, cfg, device, args.repeat)


if __name__ == "__main__":
    main()
