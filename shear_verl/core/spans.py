"""Spans (Algorithm 1 step 2) and span -> token pooling (line 13).

Spans are windows of ``span_len`` tokens at starts 0, s, 2s, ... while the window fits, plus one
final window ending at the last token when the regular ones stop short (docs/method.md, "Spans and the final span").
Every windowed reduction below is a strided view (``Tensor.unfold``) plus, at most, that one
final window, so no span is ever copied out of the token axis.
"""

from __future__ import annotations

import torch


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
