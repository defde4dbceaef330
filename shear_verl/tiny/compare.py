"""SHEAR vs GRPO over seeds on the tiny counting task: ``python -m shear_verl.tiny.compare``.

    python -m shear_verl.tiny.compare --seeds 3 --out outputs/compare [--steps 16] [--threshold 0.6]

For each seed (verl's data order and vLLM's sampling seed) every estimator trains the same
warm-started model on the same task; then ``<out>/compare.png`` draws each estimator's mean +- std
reward curve over the seeds, and ``<out>/compare.json`` / the printed table give, per estimator:
steps to reach ``--threshold`` (the first step whose ``--window``-step trailing mean reaches it; a
seed that never does counts as not reached), the final reward (mean of the last ``--window``
steps), wall time, and for SHEAR the run's ``divergence_auc``. Finished runs are reused (a rerun
only trains what is missing); ``--fresh`` retrains all.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from .report import credit_summary, reward_curve, trailing_mean
from .run import ADV_ESTIMATORS, TinyConfig, load_metrics, run_tiny


def steps_to_threshold(steps: Sequence[int], reward: Sequence[float], threshold: float, window: int) -> int | None:
    """First step whose trailing ``window``-step mean reward is >= ``threshold`` (None: never)."""
    for step, value in zip(steps, trailing_mean(reward, window)):
        if value >= threshold:
            return step
    return None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: Mapping[str, Mapping[int, dict]], threshold: float, window: int) -> dict:
    """Per estimator, over its seeds: curves and the table's figures. ``runs[adv][seed]`` holds
    ``metrics`` (verl's per-step metrics), ``wall_s`` and optionally ``divergence_auc``."""
    table = {}
    for adv, by_seed in runs.items():
        curves = {seed: reward_curve(r["metrics"]) for seed, r in by_seed.items()}
        reached = {seed: steps_to_threshold(*curves[seed], threshold, window) for seed in curves}
        final = [statistics.fmean(reward[-window:]) for _, reward in curves.values()]
        walls = [r["wall_s"] for r in by_seed.values()]
        hit = [s for s in reached.values() if s is not None]
        row = {
            "seeds": sorted(by_seed),
            "steps_to_threshold": {str(seed): s for seed, s in reached.items()},
            "reached": f"{len(hit)}/{len(reached)}",
            "steps_to_threshold_mean_std": _mean_std(hit) if hit else None,
            "final_reward_mean_std": _mean_std(final),
            "wall_s_mean_std": _mean_std(walls),
            "curves": {str(seed): {"steps": s, "reward": r} for seed, (s, r) in curves.items()},
        }
        aucs = [r["divergence_auc"] for r in by_seed.values() if "divergence_auc" in r]
        if aucs:
            row["divergence_auc_mean_std"] = _mean_std(aucs)
        table[adv] = row
    return {"threshold": threshold, "window": window, "estimators": table}


def format_table(result: Mapping) -> str:
    """Markdown table of :func:`aggregate`'s figures (mean +- std over seeds)."""
    def pm(pair, fmt="{:.3f}"):
        return "-" if pair is None else f"{fmt.format(pair[0])} +- {fmt.format(pair[1])}"

    head = (f"| estimator | seeds | steps to reward >= {result['threshold']} ({result['window']}-step mean) "
            f"| reached | final reward (last {result['window']}) | wall s | divergence_auc |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for adv, row in result["estimators"].items():
        lines.append(
            f"| {adv} | {len(row['seeds'])} | {pm(row['steps_to_threshold_mean_std'], '{:.1f}')} | {row['reached']} "
            f"| {pm(row['final_reward_mean_std'])} | {pm(row['wall_s_mean_std'], '{:.0f}')} "
            f"| {pm(row.get('divergence_auc_mean_std'))} |"
        )
    return "\n".join(lines)


def plot_compare(result: Mapping, path: Path) -> Path:
    """Mean +- std reward per step over seeds, one band per estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for adv, row in result["estimators"].items():
        curves = list(row["curves"].values())
        n = min(len(c["steps"]) for c in curves)  # seeds share the step grid
        steps = np.asarray(curves[0]["steps"][:n])
        rewards = np.asarray([c["reward"][:n] for c in curves])  # [seeds, steps]
        mean, std = rewards.mean(0), rewards.std(0, ddof=1) if len(curves) > 1 else np.zeros(n)
        (line,) = ax.plot(steps, mean, label=f"{adv} (mean of {len(curves)} seeds)")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.axhline(result["threshold"], color="grey", lw=0.8, ls="--", label=f"threshold {result['threshold']}")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean reward (critic/score/mean)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("tiny counting task on CPU: reward per step, mean +- std over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _finished(workdir: Path, steps: int) -> bool:
    if not (workdir / "wall-0.txt").is_file():
        return False
    metrics, _ = load_metrics(workdir)
    return max(m["step"] for m in metrics) >= steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shear_verl.tiny.compare", description=__doc__.split("\n\n")[1])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--adv", nargs="+", choices=ADV_ESTIMATORS, default=["grpo", "shear"])
    parser.add_argument("--steps", type=int, default=TinyConfig.counting().steps)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"))
    parser.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    out = args.out.resolve()
    runs: dict[str, dict[int, dict]] = {adv: {} for adv in args.adv}
    for seed in range(args.seeds):
        config = TinyConfig.counting(seed=seed, steps=args.steps)
        for adv in args.adv:
            workdir = out / f"seed{seed}" / adv
            if args.fresh or not _finished(workdir, args.steps):
                print(f"[compare] seed {seed}: training {adv} ({args.steps} steps) in {workdir}", flush=True)
                run_tiny(workdir, adv=adv, steps=None, config=config, assets_root=out / "assets")
    for seed in range(args.seeds):  # after all runs: a failure above loses no finished run
        for adv in args.adv:
            workdir = out / f"seed{seed}" / adv
            metrics, wall = load_metrics(workdir)
            runs[adv][seed] = {"metrics": metrics, "wall_s": wall}
            dumps = sorted((workdir / "credit").glob("credit_step*.jsonl"))
            if dumps:
                from shear_verl.view import read_dumps

                auc = credit_summary(read_dumps(dumps), TinyConfig.counting().shear_span_len).get("divergence_auc")
                if auc is not None:
                    runs[adv][seed]["divergence_auc"] = auc
    result = aggregate(runs, args.threshold, args.window)
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    plot = plot_compare(result, out / "compare.png")
    table = format_table(result)
    (out / "compare.md").write_text(table + "\n")
    print(f"\n{table}\n\nplot: {plot}\ntable: {out / 'compare.md'}\nall figures: {out / 'compare.json'}")


if __name__ == "__main__":
    main()
