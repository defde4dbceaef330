"""``python -m shear_verl.tiny [--adv shear|grpo] [--steps N] [--out DIR] [--resume] [hydra overrides]``

Trains the tiny model on CPU with verl's stock trainer (output streamed), then writes
``<out>/reward.png`` (reward per step of every run under ``<out>``, so SHEAR and GRPO runs show
side by side) and ``<out>/summary.json``, and prints the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .report import format_summary, plot_reward, summarize, write_summary
from .run import ADV_ESTIMATORS, TinyConfig, load_metrics, run_tiny


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shear_verl.tiny", description=__doc__.split("\n\n")[1])
    parser.add_argument("--adv", choices=ADV_ESTIMATORS, default="shear", help="advantage estimator")
    parser.add_argument("--steps", type=int, default=TinyConfig.steps, help="training steps")
    parser.add_argument("--out", type=Path, default=Path("outputs/tiny"), help="output directory")
    parser.add_argument("--save-freq", type=int, default=10, help="checkpoint every N steps (-1: never)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for verl.trainer.main_ppo")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    config = dataclasses.replace(TinyConfig(), steps=args.steps, save_freq=args.save_freq)
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
    plot = plot_reward(runs, out / "reward.png")
    summary = write_summary(summaries, out / "summary.json")
    print(f"\n{format_summary(summaries)}\n\nreward plot: {plot}\nsummary:     {summary}")


if __name__ == "__main__":
    main()
