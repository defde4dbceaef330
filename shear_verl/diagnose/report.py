"""Figures (PNG) and report.html (figures embedded as base64 data URIs) of the diagnostic."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figures(result: dict, out: Path) -> dict[str, Path]:
    paths = {}
    # Fig. 1a: success and distance against prefix position, the rollouts with the widest success range.
    curves = [(g["index"], i, r) for g in result["groups"] for i, r in enumerate(g["rollouts"]) if len(r.get("success", [])) > 1]
    curves.sort(key=lambda c: -np.ptp(c[2]["success"]))
    fig, axes = plt.subplots(1, max(1, min(4, len(curves))), figsize=(4 * max(1, min(4, len(curves))), 3.2), squeeze=False)
    for ax, (p, i, r) in zip(axes[0], curves[:4]):
        ax.plot(r["positions"], r["success"], "o-", color="tab:green", label="continuation success")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("prefix length (tokens)")
        ax.set_title(f"problem {p}, rollout {i} ({'correct' if r['correct'] else 'incorrect'})", fontsize=9)
        ax2 = ax.twinx()
        ax2.plot(r["positions"], r["distance"], "s--", color="tab:red", label="distance to opposing group")
        ax2.set_ylabel("distance / n_bar", color="tab:red")
    axes[0][0].set_ylabel("continuation success", color="tab:green")
    paths["fig1a_prefix_curves"] = _save(fig, out / "fig1a_prefix_curves.png")
    # Fig. 1b: Delta distance against Delta success of local shift events.
    ev = result["shift_events"]
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    for flag, color in ((True, "tab:blue"), (False, "tab:orange")):
        pts = [(e["delta_success"], e["delta_distance"]) for e in ev if e["correct"] == flag]
        if pts:
            x, y = zip(*pts)
            ax.scatter(x, y, s=14, alpha=0.7, color=color, label=f"{'correct' if flag else 'incorrect'} rollouts")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    rho = result["spearman_delta"]
    ax.set_title(f"shift events: Spearman = {rho:.3f} (n={len(ev)})" if rho is not None else f"shift events (n={len(ev)})", fontsize=9)
    ax.set_xlabel("Delta continuation success")
    ax.set_ylabel("Delta distance")
    if ev:
        ax.legend(fontsize=7)
    paths["fig1b_shift_events"] = _save(fig, out / "fig1b_shift_events.png")
    # Fig. 3: per-bin AUC and accuracy against distance.
    bins = result["auc_bins"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.3))
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    a1.plot([c for c, b in zip(centers, bins) if b["auc"] is not None], [b["auc"] for b in bins if b["auc"] is not None], "o-")
    a1.axhline(0.5, color="grey", lw=0.5)
    a1.set_ylim(0, 1.05)
    a1.set_xlabel("distance bin (center)")
    a1.set_ylabel("AUC correct vs incorrect spans")
    for key, label in (("success_correct", "correct rollouts"), ("success_incorrect", "incorrect rollouts"), ("success_all", "all")):
        pts = [(c, b[key]) for c, b in zip(centers, bins) if b[key] is not None]
        if pts:
            a2.plot(*zip(*pts), "o-", label=label)
    a2.set_ylim(-0.05, 1.05)
    a2.set_xlabel("distance bin (center)")
    a2.set_ylabel("continuation success")
    a2.legend(fontsize=7)
    paths["fig3_auc_bins"] = _save(fig, out / "fig3_auc_bins.png")
    # Fig. 11: pairwise span distances of one group.
    group = next((g for g in result["groups"] if g.get("matrix")), None)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    if group:
        m = np.asarray(group["matrix"]["distance"])
        im = ax.imshow(m, cmap="viridis")
        fig.colorbar(im, ax=ax, label="distance / n_bar")
        n_correct = sum(sp["correct"] for sp in group["matrix"]["spans"])
        ax.axhline(n_correct - 0.5, color="white", lw=1)
        ax.axvline(n_correct - 0.5, color="white", lw=1)
        ax.set_title(f"problem {group['index']}: spans of correct | incorrect rollouts", fontsize=9)
    paths["fig11_span_matrix"] = _save(fig, out / "fig11_span_matrix.png")
    return paths


def reading(result: dict) -> list[str]:
    """A short reading of the numbers, in plain sentences."""
    lines = [f"{result['problems']} problems, {result['mixed_groups']} mixed groups (both outcomes), "
             f"rollout accuracy {result['rollout_accuracy']:.2f}, {result['spans']} prefix spans, "
             f"{len(result['shift_events'])} shift events."]
    rho = result["spearman_delta"]
    if rho is None:
        lines.append("Spearman of Delta distance vs Delta success: undefined (too few shift events).")
    else:
        lines.append(f"Spearman of Delta distance vs Delta success: {rho:.3f} "
                     + ("(negative: where continuation success drops, the span moves away from the opposing group -- the paper's signal)."
                        if rho < 0 else "(not negative: the paper's signal is not seen here).")
                     + " By side: " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a"
                                                for k, v in result["spearman_delta_by_side"].items()) + ".")
    aucs = [f"{b['auc']:.2f}" for b in result["auc_bins"] if b["auc"] is not None]
    if aucs:
        lines.append(f"AUC by distance bin (low to high): {', '.join(aucs)} -- "
                     + ("rising: far spans separate correct from incorrect rollouts better." if result["auc_rising"]
                        else "not rising with distance."))
    return lines


def write_report(result: dict, out: Path) -> Path:
    paths = figures(result, out)
    imgs = "\n".join(
        f'<figure><img id="{name}" alt="{name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, p in paths.items())
    items = "".join(f"<li>{html.escape(x)}</li>" for x in reading(result))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>SHEAR diagnostic</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}img{max-width:100%}</style></head><body>"
            f"<h1>SHEAR diagnostic: {html.escape(str(result['settings']['model']))}</h1><ul id='reading'>{items}</ul>"
            f"{imgs}<script>addEventListener('load', () => {{document.body.dataset.figures ="
            " [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;});</script></body></html>")
    path = out / "report.html"
    path.write_text(page)
    return path
