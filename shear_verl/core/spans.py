"""Spans (Algorithm 1 step 2), the rollouts of one outcome with their spans (``Side``), and span ->
token pooling (line 13).

Spans are windows of ``span_len`` tokens at starts 0, s, 2s, ... while the window fits, plus one
final window ending at the last token when the regular ones stop short (docs/method.md, "Spans and the final span").
Every windowed reduction below is a strided view (``Tensor.unfold``) plus, at most, that one
final window, so no span is ever copied out of the token axis.
"""

from __future__ import annotations

import dataclasses

import torch

from shear_verl.core.config import ShearConfig


def span_length(num_tokens: int, span_len: int) -> int:
    """Tokens per span: a response shorter than span_len is one span of all its tokens."""
    return min(span_len, num_tokens)


def span_starts(num_tokens: int, span_len: int, stride: int) -> list[int]:
    """Start positions of the spans of a response of ``num_tokens`` tokens (empty when 0 tokens)."""
    if num_tokens == 0:
        return []
    n = span_length(num_tokens, span_len)
    starts = list(range(0, num_tokens - n + 1, stride))
    if starts[-1] + n < num_tokens:
        starts.append(num_tokens - n)
    return starts


def window_reduce(x: torch.Tensor, dim: int, starts: list[int], size: int, stride: int, op: str) -> torch.Tensor:
    """Reduce ``x`` over the windows [start, start + size) along ``dim``; the window axis replaces ``dim``.

    ``starts`` must be 0, stride, 2*stride, ... optionally followed by one irregular start (what
    ``span_starts`` returns, possibly shifted to begin at 0). op is "amin", "amax" or "mean".
    """
    dim = dim % x.dim()
    num_regular = sum(1 for k, st in enumerate(starts) if st == k * stride)
    reduce = getattr(torch, op)
    regular = x.narrow(dim, 0, (num_regular - 1) * stride + size).unfold(dim, size, stride)
    parts = [reduce(regular, dim=-1)]
    for st in starts[num_regular:]:
        parts.append(reduce(x.narrow(dim, st, size), dim=dim, keepdim=True))
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


def pool_spans_to_tokens(span_values: torch.Tensor, starts: list[int], size: int, num_tokens: int, pooling: str) -> torch.Tensor:
    """Token weight = max (or mean) of the values of the spans covering the token (Alg. 1 line 13)."""
    offsets = torch.tensor(starts, device=span_values.device)[:, None] + torch.arange(size, device=span_values.device)
    values = span_values[:, None].expand(-1, size)  # [K, n]
    out = span_values.new_zeros(num_tokens)
    reduce = "amax" if pooling == "max" else "mean"
    return out.scatter_reduce(0, offsets.flatten(), values.flatten(), reduce=reduce, include_self=False)


@dataclasses.dataclass
class Side:
    """The non-empty rollouts of one outcome and their spans, numbered globally 0..S-1."""

    members: list[int]  # rollout indices within the group
    states: list[torch.Tensor]  # [T_i, d] in compute dtype
    starts: list[list[int]]
    sizes: list[int]
    first: list[int]  # global index of each rollout's first span
    owner: torch.Tensor  # [S] position in ``members`` of each span's rollout
    start: torch.Tensor  # [S] first token of each span
    length: torch.Tensor  # [S] tokens of each span

    @classmethod
    def build(cls, members: list[int], states: list[torch.Tensor], cfg: ShearConfig) -> Side:
        starts = [span_starts(h.shape[0], cfg.span_len, cfg.stride) for h in states]
        counts = [len(s) for s in starts]
        first = [0]
        for c in counts[:-1]:
            first.append(first[-1] + c)
        device = states[0].device
        owner = torch.repeat_interleave(torch.arange(len(states), device=device), torch.tensor(counts, device=device))
        sizes = [span_length(h.shape[0], cfg.span_len) for h in states]
        start = torch.tensor([st for ss in starts for st in ss], device=device)
        length = torch.tensor(sizes, device=device)[owner]
        return cls(members, states, starts, sizes, first, owner, start, length)

    @property
    def num_spans(self) -> int:
        return self.owner.shape[0]

    def span_means(self, stride: int) -> torch.Tensor:
        """Mean hidden state of every span. [S, d]"""
        return torch.cat([window_reduce(h, 0, st, n, stride, "mean") for h, st, n in zip(self.states, self.starts, self.sizes)])
