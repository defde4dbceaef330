"""Per-token credit dumps: what SHEAR gave every token of a few groups, as JSON lines.

Driver side, at the end of `_compute_advantage`, every `algorithm.shear.dump_every` steps: the
`dump_groups` first groups of the step that hold both outcomes (then others, if there are fewer
mixed ones), one line per rollout, written to `<dump_dir>/credit_step<N>.jsonl` (default
`dump_dir`: `<trainer.default_local_dir>/shear_credit`). Only data the driver already has: the
response tokens, the workers' weights, the GRPO advantages the estimator scaled, the advantages
verl stores for the update, and the grader's extra info. Size: about 60 bytes per token, so
K groups x G rollouts x L tokens (4 x 8 x 3000 tokens: ~6 MB per dump).
Schema: README, "Credit dumps"; `shear_verl.view` reads (and checks) and renders them:
`python -m shear_verl.view FILE --out credit.html`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

logger = logging.getLogger("shear_verl")

DUMP_SUBDIR = "shear_credit"


def dump_path(dump_dir: str | os.PathLike, step: int) -> Path:
    return Path(dump_dir) / f"credit_step{step}.jsonl"


def select_groups(uids: Sequence[str], correct: Sequence[bool], k: int) -> list[str]:
    """The first ``k`` groups (0: all) in batch order, groups holding both outcomes first."""
    order: dict[str, list[bool]] = {}
    for uid, ok in zip(uids, correct):
        order.setdefault(uid, []).append(bool(ok))
    mixed = [u for u, oks in order.items() if any(oks) and not all(oks)]
    rest = [u for u in order if u not in set(mixed)]
    chosen = mixed + rest
    return chosen if k == 0 else chosen[:k]


def _plain(value):
    """JSON-able copy of a grader's extra-info value (numpy scalars and arrays included)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def credit_records(
    *,
    step: int,
    estimator: str,
    uids: Sequence[str],
    rows: Sequence[int],
    response_ids: Sequence[torch.Tensor],
    response_mask: Sequence[torch.Tensor],
    scores: torch.Tensor,
    correct: torch.Tensor,
    weights: torch.Tensor,
    grpo_advantages: torch.Tensor,
    advantages: Sequence[torch.Tensor],
    extra_info: Sequence[Mapping],
    decode,
) -> list[dict]:
    """One record per row in ``rows``; tensors are per row ([L_i]) or padded ([B, T] >= L_i)."""
    out = []
    for r in rows:
        ids = response_ids[r].tolist()
        n = len(ids)
        out.append({
            "step": int(step),
            "uid": str(uids[r]),
            "estimator": estimator,
            "score": float(scores[r]),
            "correct": bool(correct[r]),
            "response_ids": ids,
            "tokens": [decode([i]) for i in ids],
            "response_mask": [int(m) for m in response_mask[r].tolist()],
            "weights": [round(float(w), 6) for w in weights[r, :n].tolist()],
            "grpo_advantage": [round(float(a), 6) for a in grpo_advantages[r, :n].tolist()],
            "advantage": [round(float(a), 6) for a in advantages[r].tolist()],
            "reward_extra_info": _plain(dict(extra_info[r] or {})),
        })
    return out


def write_records(records: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Write JSON lines atomically (a reader never sees half a dump)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def reward_extra_infos(data, rows: int) -> list[dict]:
    """Per row the grader's extra info, from the `extra_fields` column of a TransferQueue read
    (`data`); empty dicts for all ``rows`` when verl wrote no such column."""
    if "extra_fields" not in data.keys():
        return [{} for _ in range(rows)]
    extra_fields = data["extra_fields"]
    fields = extra_fields.tolist() if hasattr(extra_fields, "tolist") else list(extra_fields)
    return [dict(f.get("reward_extra_info", {}) or {}) if isinstance(f, Mapping) else {} for f in fields]
