"""Summary and reward plot of tiny runs, from the per-step metrics verl's ``file`` logger wrote."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

REWARD_KEY = "critic/score/mean"  # verl's mean sequence score (the rule reward) of a step's rollouts
SHEAR_TIME_KEY, STEP_TIME_KEY = "shear/time_s", "timing_s/step"
SUMMARY_KEYS = {
    "actor/grad_norm": "grad_norm",
    "training/rollout_probs_diff_max": "rollout_probs_diff_max",
    "response_length/mean": "response_length",
    "timing_s/step": "step_time_s",
}


def reward_curve(metrics: Sequence[Mapping]) -> tuple[list[int], list[float]]:
    """(steps, mean reward) of the steps that logged a reward, in step order."""
    rows = sorted((m for m in metrics if REWARD_KEY in m), key=lambda m: m["step"])
    if not rows:
        raise ValueError(f"no step logged {REWARD_KEY!r}: is this a metrics list from verl's file logger?")
    return [int(m["step"]) for m in rows], [float(m[REWARD_KEY]) for m in rows]


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the up to ``window - 1`` values before it."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def summarize(metrics: Sequence[Mapping], wall_s: float | None = None, window: int = 5) -> dict:
    """Reward at the first / last step and averaged over the first / last ``window`` steps, plus
    the last step's grad norm, rollout-vs-actor probability gap, response length and step time."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    steps, reward = reward_curve(metrics)
    w = min(window, len(reward))
    last = max(metrics, key=lambda m: m["step"])
    summary = {
        "steps": len(steps),
        "first_step": steps[0],
        "last_step": steps[-1],
        "reward_first": reward[0],
        "reward_last": reward[-1],
        f"reward_first{w}_mean": sum(reward[:w]) / w,
        f"reward_last{w}_mean": sum(reward[-w:]) / w,
    }
    summary.update({name: float(last[key]) for key, name in SUMMARY_KEYS.items() if key in last})
    grad = [float(m["actor/grad_norm"]) for m in metrics if "actor/grad_norm" in m]
    if grad:
        summary["grad_norm_mean"] = sum(grad) / len(grad)
    shares = [float(m[SHEAR_TIME_KEY]) / float(m[STEP_TIME_KEY]) for m in metrics
              if SHEAR_TIME_KEY in m and float(m.get(STEP_TIME_KEY, 0)) > 0]
    if shares:  # SHEAR's weight computation over the whole step's time, mean over steps
        summary["shear_time_share"] = sum(shares) / len(shares)
    if wall_s is not None:
        summary["wall_s"] = round(wall_s, 1)
    return summary


def credit_summary(records: Sequence[Mapping], span_len: int) -> dict:
    """``divergence_auc`` of a run's credit dumps: per step and its mean over the run, with every
    token before the error (``divergence_auc``) and without those sharing a span with it
    (``divergence_auc_excl_span``); see :mod:`shear_verl.analysis`."""
    from shear_verl.analysis import dump_divergence

    out: dict = {}
    for name, span in (("divergence_auc", None), ("divergence_auc_excl_span", span_len)):
        per_step = dump_divergence(records, span_len=span)
        if per_step:
            out[name] = sum(v["divergence_auc"] for v in per_step.values()) / len(per_step)
            out[f"{name}_per_step"] = {str(k): round(v["divergence_auc"], 4) for k, v in per_step.items()}
    return out


def format_summary(summaries: Mapping[str, Mapping]) -> str:
    """A plain-text table: one column per run."""
    runs = list(summaries)
    keys = list(dict.fromkeys(k for s in summaries.values() for k in s if not isinstance(s[k], Mapping)))
    width = max(len(k) for k in keys) + 2

    def cell(value) -> str:
        if isinstance(value, float) and not value.is_integer() and math.isfinite(value):
            return f"{value:.4g}"
        return str(value)

    lines = ["".ljust(width) + "".join(r.rjust(14) for r in runs)]
    for k in keys:
        lines.append(k.ljust(width) + "".join(cell(summaries[r].get(k, "-")).rjust(14) for r in runs))
    return "\n".join(lines)


def plot_reward(runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike, window: int = 5,
                divergence: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """PNG of mean reward per step, one line per run (with its ``window``-step moving average);
    with ``divergence`` (run -> {step: divergence_auc}, from :func:`credit_summary`) a second panel
    draws each run's ``divergence_auc`` per step."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers / CI
    import matplotlib.pyplot as plt

    divergence = {k: v for k, v in (divergence or {}).items() if v}
    fig, axes = plt.subplots(2 if divergence else 1, 1, figsize=(7, 6.5 if divergence else 4), squeeze=False,
                             sharex=True, height_ratios=[3, 2] if divergence else None)
    ax = axes[0, 0]
    colors = {}
    for name, metrics in runs.items():
        steps, reward = reward_curve(metrics)
        (line,) = ax.plot(steps, reward, marker=".", alpha=0.4, label=f"{name} (per step)")
        colors[name] = line.get_color()
        w = min(window, len(reward))
        ax.plot(steps, trailing_mean(reward, w), color=line.get_color(), label=f"{name} ({w}-step mean)")
    ax.set_ylabel(f"mean reward ({REWARD_KEY})")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("tiny task on CPU: reward per step")
    if divergence:
        dax = axes[1, 0]
        for name, per_step in divergence.items():
            steps = sorted(per_step, key=int)
            dax.plot([int(s) for s in steps], [per_step[s] for s in steps], marker="o", color=colors.get(name),
                     label=f"{name}: divergence_auc")
        dax.axhline(0.5, color="gray", lw=0.8, ls="--", label="0.5: no separation")
        dax.set_ylim(0.3, 1.02)
        dax.set_ylabel("divergence_auc")
        dax.grid(alpha=0.3)
        dax.legend(loc="lower right")
    axes[-1, 0].set_xlabel("training step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_summary(summaries: Mapping[str, Mapping], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_text(json.dumps(summaries, indent=1) + "\n")
    return path
