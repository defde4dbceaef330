"""`hidden_align`: an auxiliary loss that aligns the last-layer hidden states of a prompt's correct
rollouts at the anchor token, added to the actor's loss of any estimator.

Wang et al. 2026, "Right Makes Might: Aligning Verified Hidden States Empowers RL Reasoning"
(arXiv 2606.03234). A READING OF THE ABSTRACT, NOT A REPRODUCTION: the search tool returned only
the paper's abstract and introduction, not its loss equation. What the abstract states: at the
anchor token ("the position immediately before the answer marker") correct rollouts of a prompt
converge (cosine ~0.84); an auxiliary loss aligning their last-layer hidden states there during
RL training helps; the paper ablates the loss type, anchor position, layer and loss weight. The
reading implemented here, for the GRPO group g of a prompt, C_g its correct rollouts whose anchor
was found, h_i the LM-head input (last decoder layer, after the final norm) at rollout i's anchor
token, computed with gradient in verl's update pass:

    pairwise (default):  L_g = mean_{i < j in C_g} d(h_i, h_j)
    centroid:            L_g = mean_{i in C_g} d(h_i, mean_{j in C_g} h_j)
    d = 1 - cos (loss=cosine, default)  or  mean_k (x_k - y_k)^2 (loss=mse)
    L_g = 0 when |C_g| < 2;     loss = actor loss + coef * (1 / G) sum_g L_g

over the G groups of the update mini-batch (all of them, so a micro-batch's share does not depend
on how the mini-batch is cut; verl's gradient averaging over data-parallel ranks is undone by the
dp_size factor, as verl's token-mean does). A rollout is correct when its sequence score (the sum
of `rm_scores`, as GRPO reads it) is > correct_threshold. The anchor token is the one before the
last occurrence of answer_marker's token ids in the response; where the marker is absent (or
answer_marker is empty) fallback=last uses the last response token, fallback=skip leaves the
rollout out. Pairs are formed within a micro-batch: with several micro-batches per mini-batch (or
dynamic batch size, or shuffled mini-batches) a group split across them only aligns within each
part (`hidden_align/pairs` counts the pairs used). Keys: `actor_rollout_ref.actor.hidden_align.*`;
the defaults other than coef = 0 (off) are this reading's, not the paper's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

KEY = "hidden_align"
SECTION = f"actor_rollout_ref.actor.{KEY}"
LOSSES = ("cosine", "mse")
TARGETS = ("pairwise", "centroid")
FALLBACKS = ("last", "skip")
SUPPORTED_STRATEGIES = ("fsdp", "fsdp2")


@dataclass(frozen=True)
class HiddenAlignSettings:
    """`actor_rollout_ref.actor.hidden_align.*`."""

    coef: float = 0.0  # weight of the auxiliary loss (0: off)
    loss: str = "cosine"  # d: 1 - cos, or mse
    target: str = "pairwise"  # all pairs of correct rollouts, or each against their centroid
    answer_marker: str = "\\boxed"  # the anchor is the token before its last occurrence ("": always fallback)
    fallback: str = "last"  # no marker in a response: its last token ("last") or leave it out ("skip")
    correct_threshold: float = 0.5  # correct iff sequence score > this

    def __post_init__(self):
        if self.coef < 0:
            raise ValueError(f"{SECTION}.coef must be >= 0, got {self.coef}")
        for key, allowed in (("loss", LOSSES), ("target", TARGETS), ("fallback", FALLBACKS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{SECTION}.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")

    @property
    def active(self) -> bool:
        return self.coef > 0


def parse_settings(section: Any) -> HiddenAlignSettings:
    """The ``actor_rollout_ref.actor.hidden_align`` mapping as settings; ValueError names the key."""
    from shear_verl.integration.settings import _plain

    raw = {} if section is None else {str(k): _plain(v) for k, v in dict(section).items()}
    known = {f.name: f for f in dataclasses.fields(HiddenAlignSettings)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{SECTION}.{k}' for k in unknown)}; {SECTION} takes "
                         f"{', '.join(sorted(known))}")
    out = {}
    for key, value in raw.items():
        default = known[key].default
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError(f"{SECTION}.{key} must be a string, got {value!r}")
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{SECTION}.{key} must be a number, got {value!r}")
        out[key] = float(value) if isinstance(default, float) else value
    return HiddenAlignSettings(**out)


def check_config(config) -> HiddenAlignSettings | None:
    """Start-up checks of a trainer config; the settings when the loss is on, else None."""
    actor = config.actor_rollout_ref.actor
    settings = parse_settings(actor.get(KEY, None))
    if not settings.active:
        return None
    strategy = str(actor.get("strategy", ""))
    if strategy not in SUPPORTED_STRATEGIES:
        raise ValueError(f"{SECTION}.coef={settings.coef:g} needs the actor's hidden states with gradient in the "
                         f"update pass, which shear-verl reads on the FSDP engine only; "
                         f"actor_rollout_ref.actor.strategy={strategy} is not supported (use fsdp or fsdp2)")
    if not config.trainer.get("use_v1", True):
        raise ValueError(f"{SECTION} supports verl's V1 trainer only: set trainer.use_v1=true")
    n = int(config.actor_rollout_ref.rollout.get("n", 1))
    if n < 2:
        raise ValueError(f"{SECTION}.coef > 0 aligns rollouts of the same prompt, but actor_rollout_ref.rollout.n={n}")
    return settings


# ----------------------------------------------------------------------------- the loss's steps
def find_anchors(responses: Sequence[torch.Tensor], response_masks: Sequence[torch.Tensor],
                 marker_ids: Sequence[int], fallback: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per rollout: the anchor's index in its response (-1: the last prompt token), whether it is
    used, and whether the marker was found. responses / masks: one [L_i] tensor per rollout. [b] each"""
    anchors, valid, found = [], [], []
    m = len(marker_ids)
    for ids, mask in zip(responses, response_masks, strict=True):
        start = -1
        if m and ids.numel() >= m:
            hits = (ids.unfold(0, m, 1) == ids.new_tensor(list(marker_ids))).all(-1).nonzero()  # [k, 1]
            start = int(hits[-1, 0]) if len(hits) else -1
        generated = mask.nonzero()
        if start >= 0:
            anchors.append(start - 1), valid.append(True), found.append(True)
        elif fallback == "last" and len(generated):
            anchors.append(int(generated[-1, 0])), valid.append(True), found.append(False)
        else:
            anchors.append(0), valid.append(False), found.append(False)
    as_t = lambda x, dt: torch.tensor(x, dtype=dt)  # noqa: E731
    return as_t(anchors, torch.long), as_t(valid, torch.bool), as_t(found, torch.bool)


def anchor_states(packed: torch.Tensor, cu_seqlens: torch.Tensor, response_lens: torch.Tensor,
                  anchors: torch.Tensor) -> torch.Tensor:
    """Hidden state AT each rollout's anchor token, from the packed prompt+response rows
    ([nnz, H]; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1], its response the last
    response_lens[i] of them). Keeps the graph: gradient flows into those rows only. [b, H]"""
    rows = cu_seqlens[1:].to(packed.device) - response_lens.to(packed.device) + anchors.to(packed.device)  # [b]
    return packed.index_select(0, rows)


def _distance(x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "cosine":
        return 1 - F.cosine_similarity(x, y, dim=-1)
    return (x - y).pow(2).mean(-1)


def alignment_loss(states: torch.Tensor, uids: Sequence[str], correct: torch.Tensor, valid: torch.Tensor,
                   loss: str = "cosine", target: str = "pairwise") -> tuple[torch.Tensor, int, int]:
    """sum_g L_g over the groups present (L_g of the module docstring; 0 for |C_g| < 2), the number
    of groups with >= 2 aligned rollouts and of pairs (pairwise) or members (centroid) used.

    states [b, H] (with grad), uids [b], correct / valid [b] bool. The sum is 0 (still attached to
    the graph) when no group qualifies."""
    h = states.float()
    total = h.sum() * 0.0  # keeps the graph even with no group (every rank runs the same backward)
    groups, terms = 0, 0
    by_uid: dict[str, list[int]] = {}
    for row, u in enumerate(uids):
        if bool(correct[row]) and bool(valid[row]):
            by_uid.setdefault(str(u), []).append(row)
    for rows in by_uid.values():
        if len(rows) < 2:
            continue
        g = h[rows]  # [k, H]
        if target == "pairwise":
            i, j = torch.triu_indices(len(rows), len(rows), offset=1, device=h.device)
            d = _distance(g[i], g[j], loss)  # [k (k-1) / 2]
        else:
            d = _distance(g, g.mean(0, keepdim=True).expand_as(g), loss)  # [k]
        total = total + d.mean()
        groups += 1
        terms += d.numel()
    return total, groups, terms
