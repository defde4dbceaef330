"""The span distances d_k of both sides of a group (Chen et al. 2026, arXiv 2604.23318, Algorithm 1
line 4): the min over all spans of all opposing rollouts, for every metric.

Speed by design, not by approximation (docs/method.md, "Exact pruning and the tiled solver"):
- Every metric is symmetric, so one [S_correct, S_incorrect] matrix of span distances gives the
  minima of both sides (row minima for correct rollouts, column minima for incorrect ones).
- The token-to-token distance matrix of each (correct, incorrect) rollout pair is computed once;
  span cost matrices are windows of it. With g = gcd(w, s), the window of two full spans is a tiling
  of g x g blocks, and spans on the same g-grid share blocks; the tiled Sinkhorn solver builds each
  block's kernel once for all the span pairs that use it (up to (w/g)^2 = 16 at w=100, s=25). The
  windows of rollouts shorter than w are copied out for the per-problem solver.
- Exact pruning for "sinkhorn" and "w1" with lower bounds <= W1 <= W_eps (``ot.bounds``): a span
  pair whose bound is >= the best value already found for both its spans cannot change either
  minimum and is never solved, so the minima equal brute force. Each span's few lowest-bound pairs
  are solved first (the seeds); then all pairs still below their row's or column's best, in one
  batch, dense enough for the tiled solver to share blocks, which tightens the bound on the way
  with the Kantorovich dual bound of its iterates (``ot.bounds.RunningMinima``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator

import torch

from shear_verl.core import metrics
from shear_verl.core.config import ShearConfig, ShearStats
from shear_verl.core.ot import (RunningMinima, check_backend, default_backend, sinkhorn_transport_cost,
                                tiled_sinkhorn_transport_cost)
from shear_verl.core.ot.anderson import ANDERSON_MEMORY
from shear_verl.core.ot.bounds import mean_bound, nearest_neighbour_bound
from shear_verl.core.ot.sinkhorn import DEFAULT_BLOCK
from shear_verl.core.spans import Side

_PRUNABLE_METRICS = ("sinkhorn", "w1")
# The per-problem path holds the gathered costs [B, n, m]; the Sinkhorn solver adds, for the
# DEFAULT_BLOCK problems it iterates at once, -C/eps, the kernel, its transpose and the
# temporaries of its first step and of the final <P, C>: 5 more n*m per problem of the block.
_SOLVER_BLOCK_COPIES = 5
# cdist's temporaries besides its [T_x, T_y] output (the x @ y^T product; the norms are small).
_CDIST_COPIES = 1
# Smallest block edge g = gcd(span_len, stride) for which the tiled solver is used: smaller blocks
# make its block products too small to pay for their gathers (w=100, s=25 gives g=25).
_MIN_TILE = 16
# Lowest-bound pairs of every span solved first: their values are the thresholds the batch of all
# other candidates starts from (chosen on a trained LM's states: docs/benchmarks.md, "Tuning history").
_SEEDS_PER_SPAN = 4
# Least mean fraction of a block's (w/g)^2 tile positions in use for the tiled solver: below it, most
# block products have a single row and the per-problem solver is faster; at 1/16 the tiled solver takes
# pruning's seeds too (chosen on a trained LM's groups: docs/benchmarks.md, "Tuning history").
_MIN_SHARING = 1 / 16


class _TokenDistances:
    """Token-to-token Euclidean distances of each (correct, incorrect) rollout pair, computed once.

    Blocks are kept while they fit in ``limit_bytes`` (least recently used evicted first), so a
    group whose blocks do not all fit still runs, recomputing some of them. Room for a new block and
    cdist's temporaries is made before it is computed.
    """

    def __init__(self, a: Side, b: Side, limit_bytes: int):
        self.a, self.b, self.limit = a, b, limit_bytes
        self._cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._bytes = 0

    def __call__(self, i: int, j: int) -> torch.Tensor:
        key = (i, j)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        x, y = self.a.states[i], self.b.states[j]
        size = x.shape[0] * y.shape[0] * x.element_size()
        while self._cache and self._bytes + (1 + _CDIST_COPIES) * size > self.limit:
            self._bytes -= self._cache.popitem(last=False)[1].numel() * x.element_size()
        block = torch.cdist(x, y)  # [T_i, T_j]
        if size <= self.limit:
            self._cache[key] = block
            self._bytes += size
        return block


def _pairs(a: Side, b: Side) -> list[tuple[int, int, slice, slice]]:
    """Every (correct rollout, incorrect rollout) pair with its rows and columns in the span matrix."""
    return [
        (i, j, slice(a.first[i], a.first[i] + len(a.starts[i])), slice(b.first[j], b.first[j] + len(b.starts[j])))
        for i in range(len(a.states)) for j in range(len(b.states))
    ]


def _pair_key(a: Side, b: Side, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The (correct rollout, incorrect rollout) pair of each span pair (rows[p], cols[p]), as one index. [P]"""
    return a.owner[rows] * len(b.states) + b.owner[cols]


def _by_rollout_pair(a: Side, b: Side, picked: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``picked`` (indices into rows/cols) reordered so that span pairs of one rollout pair are adjacent:
    then a chunk of them is windows of few token-distance blocks. [k]"""
    return picked[_pair_key(a, b, rows[picked], cols[picked]).argsort(stable=True)]


def _rollout_pair_groups(a: Side, b: Side, rows: torch.Tensor, cols: torch.Tensor,
                         dist: _TokenDistances) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Span pairs (rows, cols), already grouped by rollout pair, one group at a time with the rollout
    pair's token distances: yields (rows_k, cols_k, block [T_i, T_j] contiguous)."""
    keys, counts = _pair_key(a, b, rows, cols).unique_consecutive(return_counts=True)
    for key, r, c in zip(keys.tolist(), rows.split(counts.tolist()), cols.split(counts.tolist())):
        yield r, c, dist(*divmod(key, len(b.states))).contiguous()


def _span_costs(a: Side, b: Side, rows: torch.Tensor, cols: torch.Tensor, dist: _TokenDistances) -> torch.Tensor:
    """Cost matrices of the span pairs (rows[p], cols[p]), all of one shape, gathered from the
    token-distance blocks of their rollout pairs. [P, n, m]"""
    pair_key = _pair_key(a, b, rows, cols)  # [P]
    in_order = bool((pair_key[1:] >= pair_key[:-1]).all())  # callers pass pairs grouped by rollout pair
    key_order = None if in_order else pair_key.argsort()
    if key_order is not None:
        rows, cols = rows[key_order], cols[key_order]
    n, m = int(a.length[rows[0]]), int(b.length[cols[0]])
    costs = a.states[0].new_empty(rows.shape[0], n, m)  # [P, n, m]
    lo = 0
    for r, c, block in _rollout_pair_groups(a, b, rows, cols, dist):
        t_j = block.shape[1]
        # The n x m window starting at token pair (s, t) begins at flat offset s * T_j + t: a strided
        # view [offsets, n, m] of the block (no copy), from which index_select copies the windows.
        windows = block.as_strided((block.numel() - (n - 1) * t_j - (m - 1), n, m), (1, t_j, 1))
        torch.index_select(windows, 0, a.start[r] * t_j + b.start[c], out=costs[lo:lo + r.shape[0]])
        lo += r.shape[0]
    return costs if key_order is None else costs[key_order.argsort()]  # back to the order of (rows, cols)


def _tiles(a: Side, b: Side, rows: torch.Tensor, cols: torch.Tensor, g: int, span_len: int,
           dist: _TokenDistances) -> tuple[torch.Tensor, torch.Tensor]:
    """Span pairs (rows[p], cols[p]) of full spans, grouped by rollout pair, as tilings of g x g blocks
    of their rollout pairs' token-distance matrices: (blocks [NB, g, g], tiles [P, L, L] block ids).
    A block is named by its first token pair, so span pairs on the same grid (a final span has its
    own) share it, and it is copied once however many span pairs use it."""
    offsets = torch.arange(0, span_len, g, device=rows.device)  # [L] first token of each block in a span
    blocks, tiles, num_blocks = [], [], 0
    for r, c, block in _rollout_pair_groups(a, b, rows, cols, dist):
        t_i, t_j = block.shape
        windows = block.as_strided((t_i - g + 1, t_j - g + 1, g, g), (t_j, 1, t_j, 1))  # g x g window at each token pair
        ids = (a.start[r][:, None, None] + offsets[None, :, None]) * t_j \
            + b.start[c][:, None, None] + offsets[None, None, :]  # [Pk, L, L] first token pair of each tile
        used, local = ids.unique(return_inverse=True)
        blocks.append(windows[used // t_j, used % t_j])  # [nb_k, g, g]
        tiles.append(local + num_blocks)
        num_blocks += used.shape[0]
    return torch.cat(blocks), torch.cat(tiles)


def _tiled_values(a: Side, b: Side, rows: torch.Tensor, cols: torch.Tensor, dist: _TokenDistances,
                  cfg: ShearConfig, epsilon: float, batch_bytes: int, stats: ShearStats,
                  values: torch.Tensor, bests: tuple[torch.Tensor, torch.Tensor] | None, backend: str) -> torch.Tensor:
    """Solve the pairs of full spans with the tiled solver, into ``values``; with ``bests`` (the best
    values of the rows and columns so far, lowered in place), pairs its dual bound proves >= both
    their row's and column's best are +inf. Returns the mask of pairs done (the others: spans shorter
    than w, too sparse to share blocks, or kernels outside the tiled solver's range). [P] bool"""
    done = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    g = math.gcd(cfg.span_len, cfg.stride)
    if cfg.metric != "sinkhorn" or g < _MIN_TILE:
        return done
    L = cfg.span_len // g
    picked = ((a.length[rows] == cfg.span_len) & (b.length[cols] == cfg.span_len)).nonzero().squeeze(1)
    if picked.numel() == 0:  # e.g. every rollout of one side is shorter than w
        return done
    picked = _by_rollout_pair(a, b, picked, rows, cols)
    # Peak elements per problem, given the sharing required below (blocks <= P / _MIN_SHARING): six
    # block-sized tensors (costs, kernel, its active copy, and the exponent, K * C, or the dual bound's
    # costs, their transpose and one slot's differences), two [slots, g] products (slots < 2 P L^2,
    # ``ot.tiling.Tiling``'s packing) and the [P, L, L, g] gather. The float64 retry of kernels outside
    # float32's range takes a third of the problems at a time (2 x 6 / 3 units beside the float32
    # costs): within the same peak. Beside them, per problem: Anderson's 2 m differences and a dozen
    # [L g] vectors (scalings, products, residuals, and the solved problems' kept scalings).
    per_problem = int(6 * g * g / _MIN_SHARING) + 2 * (2 * L * L * g) + L * L * g + (2 * ANDERSON_MEMORY + 14) * L * g
    for chunk in picked.split(max(1, batch_bytes // (per_problem * values.element_size()))):
        blocks, tiles = _tiles(a, b, rows[chunk], cols[chunk], g, cfg.span_len, dist)
        if tiles.shape[0] < _MIN_SHARING * blocks.shape[0]:
            continue
        minima = None if bests is None else RunningMinima(rows[chunk], cols[chunk], *bests)
        v, capped, solved, cut = tiled_sinkhorn_transport_cost(blocks, tiles, epsilon, cfg.tol, cfg.max_iter,
                                                               minima=minima, backend=backend)
        values[chunk[solved]] = v[solved]
        values[chunk[cut]] = math.inf
        done[chunk[solved | cut]] = True
        stats.dual_pruned_pairs += int(cut.sum())
        stats.capped_solves += int(capped.sum())
        stats.sinkhorn_solves += int(solved.sum())
    return done


def _transport_values(a: Side, b: Side, rows: torch.Tensor, cols: torch.Tensor, dist: _TokenDistances,
                      cfg: ShearConfig, epsilon: float, batch_bytes: int, stats: ShearStats,
                      backend: str, bests: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """W_eps (or exact W1) of the span pairs (rows[p], cols[p]): the tiled solver where it applies, the
    rest batched across rollout pairs by span shape. With ``bests`` ([S_a], [S_b]: the row and column
    minima so far), a pair the tiled solver proves >= both its minima is +inf instead. [P]"""
    values = torch.empty(rows.shape[0], dtype=a.states[0].dtype, device=rows.device)
    rest = ~_tiled_values(a, b, rows, cols, dist, cfg, epsilon, batch_bytes, stats, values, bests, backend)
    rest = rest.nonzero().squeeze(1)
    shape_key = a.length[rows[rest]] * (cfg.span_len + 1) + b.length[cols[rest]]  # [R] (n, m) of each pair
    for key in shape_key.unique().tolist():
        n, m = divmod(key, cfg.span_len + 1)
        picked = _by_rollout_pair(a, b, rest[shape_key == key], rows, cols)  # [Pk]
        per_batch = max(1, batch_bytes // (n * m * values.element_size()) - _SOLVER_BLOCK_COPIES * DEFAULT_BLOCK)
        for chunk in picked.split(per_batch):
            costs = _span_costs(a, b, rows[chunk], cols[chunk], dist)  # [B, n, m]
            if cfg.metric == "sinkhorn":
                v, capped = sinkhorn_transport_cost(costs, epsilon, cfg.tol, cfg.max_iter)
                stats.capped_solves += int(capped.sum())
            else:
                v = metrics.exact_w1(costs)
            values[chunk] = v
            stats.sinkhorn_solves += chunk.shape[0]
    return values


def _transport_span_distances(a: Side, b: Side, dist: _TokenDistances, cfg: ShearConfig, epsilon: float,
                              batch_bytes: int, stats: ShearStats, backend: str) -> torch.Tensor:
    """Span distance matrix [S_a, S_b] for "sinkhorn"/"w1"; with pruning, entries that cannot be a row
    or column minimum are left at +inf (the minima are exactly brute force's)."""
    s_a, s_b = a.num_spans, b.num_spans
    dtype, device = a.states[0].dtype, a.states[0].device
    values = torch.full((s_a, s_b), math.inf, dtype=dtype, device=device)
    if not cfg.prune:
        rows, cols = torch.ones(s_a, s_b, dtype=torch.bool, device=device).nonzero(as_tuple=True)
        values[rows, cols] = _transport_values(a, b, rows, cols, dist, cfg, epsilon, batch_bytes, stats, backend)
        return values

    bound = mean_bound(a.span_means(cfg.stride), b.span_means(cfg.stride))  # [S_a, S_b]
    for i, j, rs, cs in _pairs(a, b):
        nearest = nearest_neighbour_bound(dist(i, j), a.starts[i], a.sizes[i], b.starts[j], b.sizes[j], cfg.stride)
        bound[rs, cs] = torch.maximum(bound[rs, cs], nearest)
    # Seed every row and column with its most promising pairs, then solve in one batch every pair
    # whose bound is below the best of its row or column (one batch keeps the candidates dense enough
    # for the tiled solver), which stops those whose dual bound from their first iterates reaches the
    # bests (each solved chunk lowers them); the bests only fall, so a pair skipped once stays skippable.
    todo = torch.zeros(s_a, s_b, dtype=torch.bool, device=device)
    seeds_a, seeds_b = min(_SEEDS_PER_SPAN, s_b), min(_SEEDS_PER_SPAN, s_a)
    todo[torch.arange(s_a, device=device)[:, None], bound.topk(seeds_a, dim=1, largest=False).indices] = True
    todo[bound.topk(seeds_b, dim=0, largest=False).indices, torch.arange(s_b, device=device)[None, :]] = True
    done = torch.zeros_like(todo)
    bests = None
    while True:
        rows, cols = todo.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return values
        values[rows, cols] = _transport_values(a, b, rows, cols, dist, cfg, epsilon, batch_bytes, stats, backend,
                                               bests)
        done[rows, cols] = True
        bests = values.amin(1), values.amin(0)  # [S_a], [S_b]
        todo = ~done & ((bound < bests[0][:, None]) | (bound < bests[1][None, :]))


def opposing_span_minima(a: Side, b: Side, cfg: ShearConfig, epsilon: float,
                         stats: ShearStats, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """d_k (Algorithm 1 line 4) of every span of both sides: the min over all spans of all opposing rollouts.

    Returns ([S_a], [S_b]). Work is chunked to stay inside cfg.memory_budget_mb: half for cached
    token-distance blocks, half for solver batches. backend: the tiled solver's (``ot.backend``);
    None: the faster one for the states' device.
    """
    backend = check_backend(default_backend(a.states[0]) if backend is None else backend, a.states[0])
    budget = int(cfg.memory_budget_mb * 2**20)
    dist = _TokenDistances(a, b, limit_bytes=budget // 2)
    stats.candidate_pairs += a.num_spans * b.num_spans
    if cfg.metric in _PRUNABLE_METRICS:
        values = _transport_span_distances(a, b, dist, cfg, epsilon, budget // 2, stats, backend)
        stats.pruned_pairs += int(torch.isinf(values).sum())
    else:
        values = a.states[0].new_empty(a.num_spans, b.num_spans)  # [S_a, S_b]
        means_a = a.span_means(cfg.stride) if cfg.metric == "cosine" else None
        means_b = b.span_means(cfg.stride) if cfg.metric == "cosine" else None
        for i, j, rs, cs in _pairs(a, b):
            if cfg.metric == "cosine":
                values[rs, cs] = metrics.cosine(means_a[rs], means_b[cs])
            elif cfg.metric == "chamfer":
                values[rs, cs] = metrics.chamfer(dist(i, j), a.starts[i], a.sizes[i], b.starts[j], b.sizes[j],
                                                 cfg.stride)
            else:
                x, y = a.states[i], b.states[j]
                values[rs, cs] = metrics.mmd(dist(i, j), torch.cdist(x, x), torch.cdist(y, y), a.starts[i], a.sizes[i],
                                             b.starts[j], b.sizes[j], block_bytes=budget // 2)
    return values.amin(1), values.amin(0)
