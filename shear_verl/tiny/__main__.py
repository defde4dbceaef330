"""``python -m shear_verl.tiny [--task counting|parity] [--adv shear|grpo] [--steps N] [--out DIR] [--resume] [hydra overrides]``

Trains the tiny model on CPU with verl's stock trainer (output streamed), then writes
``<out>/reward.png`` (reward per step of every run under ``<out>``, so SHEAR and GRPO runs show
side by side), ``<out>/summary.json`` and, for SHEAR runs with credit dumps, the credit page of
the last dump, and prints the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .report import credit_summary, format_summary, plot_reward, summarize, write_summary
from .run import ADV_ESTIMATORS, TinyConfig, load_metrics, run_tiny


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shear_verl.tiny", description=__doc__.split("\n\n")[1])
    parser.add_argument("--task", choices=("counting", "parity"), default="counting",
                        help="counting: warm-started model, known first errors (main job); parity: quick")
    parser.add_argument("--adv", choices=ADV_ESTIMATORS, default="shear", help="advantage estimator")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the task's)")
    parser.add_argument("--seed", type=int, default=0, help="data order and rollout seed")
    parser.add_argument("--out", type=Path, default=Path("outputs/tiny"), help="output directory")
    parser.add_argument("--save-freq", type=int, default=-1, help="checkpoint every N steps (-1: never)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for verl.trainer.main_ppo")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    base = TinyConfig.counting() if args.task == "counting" else TinyConfig()
    config = dataclasses.replace(base, steps=args.steps or base.steps, save_freq=args.save_freq, seed=args.seed)
    run_tiny(
        out / args.adv,
        adv=args.adv,
        steps=None,
        extra_overrides=args.overrides,
        config=config,
        resume=args.resume,
        assets_root=out / "assets",
        echo=True,
    )
    runs, summaries = {}, {}
    for adv in ADV_ESTIMATORS:  # every finished run under `out`, for side-by-side curves
        if any((out / adv).glob("metrics-*.jsonl")):
            runs[adv], wall = load_metrics(out / adv)
            summaries[adv] = summarize(runs[adv], wall_s=wall)
            summaries[adv].update(credit_report(out / adv / "credit", out / f"credit-{adv}.html", config.shear_span_len))
    plot = plot_reward(runs, out / "reward.png",
                       divergence={a: s.get("divergence_auc_per_step", {}) for a, s in summaries.items()})
    summary = write_summary(summaries, out / "summary.json")
    print(f"\n{format_summary(summaries)}\n\nreward plot: {plot}\nsummary:     {summary}")
    this = summaries[args.adv]
    line = f"{args.adv}: reward {this['reward_first']:.3f} -> {this['reward_last']:.3f}"
    if "divergence_auc" in this:
        line += (f", divergence_auc {this['divergence_auc']:.3f} "
                 f"({this.get('divergence_auc_excl_span', float('nan')):.3f} without the error's own span)")
    print(line)
    if "credit_page" in this:
        print(f"credit page: {this['credit_page']}")


def credit_report(credit_dir: Path, page: Path, span_len: int) -> dict:
    """divergence_auc of a run's dumps and the credit page of its last one ({} without dumps)."""
    dumps = sorted(credit_dir.glob("credit_step*.jsonl"), key=lambda p: int(p.stem.removeprefix("credit_step")))
    if not dumps:
        return {}
    from shear_verl.view import read_dumps, write_credit_page

    report = credit_summary(read_dumps(dumps), span_len)
    report["credit_page"] = str(write_credit_page([dumps[-1]], page))
    return report


if __name__ == "__main__":
    main()
