"""Kernel products of problems whose cost matrices tile shared blocks (SHEAR's overlapping spans).

Each block's Gibbs kernel is built once and multiplied by all the scaling vectors that need it, as
one small GEMM per bucket of blocks, instead of one copied kernel per problem (docs/method.md,
section "Exact pruning and the tiled solver"). Torch operations: the path for any device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Problems up to which the tiled solver iterates on written-out kernels (``kernel_products``);
# chosen on a trained LM's groups (docs/benchmarks.md, "Tuning history").
DENSE_BELOW = 64


class Tiling:
    """Index maps for problems whose cost matrices are L x L tilings of shared g x g blocks.

    Problem p's cost matrix is the block matrix [[blocks[tiles[p, r, c]]]] ([L g, L g]). A block
    that several problems share (SHEAR's overlapping spans: with s = w / 4 a block belongs to up to
    16 span pairs) is multiplied once by all the vectors that need it, as one small GEMM, instead of
    being read again per problem: ``k_mul`` / ``kt_mul`` are K v and K^T v of every problem at once.

    A block's users are its (problem, r, c) tile positions, packed into a slot list: a block with k
    users gets the next power of two >= k slots, one GEMM per slot count, so at most half the slots
    are empty. (A slot per tile position would leave most of them empty once pruning has thinned the
    problems, 15 of 16 where no two remaining problems share a block; docs/benchmarks.md, "Tuning
    history".)
    """

    def __init__(self, tiles: torch.Tensor):  # tiles: [P, L, L] block ids
        P, L, _ = tiles.shape
        device = tiles.device
        self.P, self.L = P, L
        used, local = torch.unique(tiles, return_inverse=True)  # [nb], [P, L, L]
        local = local.reshape(-1)  # [P*L*L] block of each tile position (p, r, c)
        users = torch.bincount(local, minlength=used.shape[0])  # [nb]
        # [nb] next power of two >= users (log2 in float64 is exact at powers of two)
        slots = torch.exp2(torch.log2(users.double()).ceil_()).long()
        by_bucket = slots.argsort(stable=True)  # blocks in bucket order: one GEMM per bucket
        self.used = used[by_bucket]  # [nb]
        slots = slots[by_bucket]
        base = slots.cumsum(0) - slots  # [nb] first slot of each block
        sizes, counts = slots.unique_consecutive(return_counts=True)
        firsts = counts.cumsum(0) - counts  # first block of each bucket
        # (first block, blocks, slots per block, first slot) of each bucket
        self.buckets = list(zip(firsts.tolist(), counts.tolist(), sizes.tolist(), base[firsts].tolist()))
        self.num_slots = int(slots.sum())
        rank_of = torch.empty_like(by_bucket)
        rank_of[by_bucket] = torch.arange(by_bucket.shape[0], device=device)
        block = rank_of[local]  # [P*L*L] block of each tile position, in bucket order
        order = block.argsort(stable=True)
        run_start = users[by_bucket].cumsum(0) - users[by_bucket]  # [nb] first position of each block in `order`
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.shape[0], device=device) - run_start[block[order]]
        self.dst = base[block] + rank  # [P*L*L] slot of each tile position (p, r, c)
        pos = torch.arange(L, device=device)
        first_row = torch.arange(P, device=device)[:, None, None] * L
        # Slot of (p, r, c) takes problem p's vector piece c (for K v) or r (for K^T v); empty slots
        # read the zero row at index P*L.
        self.col_src = torch.full((self.num_slots,), P * L, dtype=torch.long, device=device)
        self.col_src[self.dst] = (first_row + pos[None, None, :]).expand(P, L, L).reshape(-1)
        self.row_src = torch.full((self.num_slots,), P * L, dtype=torch.long, device=device)
        self.row_src[self.dst] = (first_row + pos[None, :, None]).expand(P, L, L).reshape(-1)

    def _gather(self, vec: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """Each slot's vector piece: vec [P, L, g] -> [num_slots, g] (zeros in empty slots)."""
        g = vec.shape[2]
        ext = torch.cat([vec.reshape(self.P * self.L, g), vec.new_zeros(1, g)])  # [P*L + 1, g]
        # index_select (not advanced indexing): ~4x faster on CPU for these row gathers.
        return torch.index_select(ext, 0, src)

    def _scatter(self, slots: torch.Tensor) -> torch.Tensor:
        """Each problem's slots back in its tiling: [num_slots, g] -> [P, L, L, g]."""
        return torch.index_select(slots, 0, self.dst).view(self.P, self.L, self.L, slots.shape[1])

    def _apply(self, vec: torch.Tensor, src: torch.Tensor, kernel: torch.Tensor, reduce_dim: int) -> torch.Tensor:
        pieces = self._gather(vec, src)  # [num_slots, g]
        products = torch.empty_like(pieces)
        g = vec.shape[2]
        for first, count, size, slot in self.buckets:
            lo, hi = slot, slot + count * size
            # (each block's users' pieces) @ block: [count, size, g] x [count, g, g]
            torch.bmm(pieces[lo:hi].view(count, size, g), kernel[first:first + count],
                      out=products[lo:hi].view(count, size, g))
        return self._scatter(products).sum(reduce_dim)

    def c_transform(self, f: torch.Tensor, costs_t: torch.Tensor) -> torch.Tensor:
        """f^c(y) = min_x C(x, y) - f(x) per problem: f [P, L, g] on the rows, costs_t the blocks
        transposed ([nb, g, g], y first) -> [P, L, g]. ``k_mul``'s gathers in the (min, +) semiring,
        one slot of each block at a time into reused buffers (a [nb, g, g] temporary, not [slots, g, g])."""
        g = f.shape[2]
        pieces = self._gather(f, self.row_src)  # [num_slots, g]
        out = torch.empty_like(pieces)
        diff = torch.empty_like(costs_t)
        for first, count, size, slot in self.buckets:
            blocks = costs_t[first:first + count]  # [count, g, g]
            piece = pieces[slot:slot + count * size].view(count, size, g)
            mins = out[slot:slot + count * size].view(count, size, g)
            for k in range(size):
                torch.amin(torch.sub(blocks, piece[:, k, None, :], out=diff[:count]), dim=2, out=mins[:, k])
        return self._scatter(out).amin(1)

    def k_mul(self, vec: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """K v per problem: vec [P, L, g] (piece c = entries c*g..(c+1)*g), kernel [nb, g, g] -> [P, L, g]."""
        return self._apply(vec, self.col_src, kernel.transpose(1, 2), 2)

    def kt_mul(self, vec: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """K^T v per problem: vec [P, L, g] -> [P, L, g]."""
        return self._apply(vec, self.row_src, kernel, 1)


def kernel_products(tiles: torch.Tensor, kernel_all: torch.Tensor) -> tuple[Callable, Callable]:
    """(v -> K v, v -> K^T v) for the problems tiles [P, L, L] ([P, L, g] -> [P, L, g]), with K their
    kernels' block matrices from kernel_all [NB, g, g]. Through ``Tiling`` (each block's kernel once for
    all its problems), or, for the few slow problems left at the end (at most ``DENSE_BELOW``, and
    whose kernels written out (2 P L^2 blocks) are no larger than kernel_all), through written-out
    kernels and one row-vector bmm each: a dozen tensor operations per iteration instead of ~30,
    whose fixed costs dominate at that size."""
    P, L, _ = tiles.shape
    g = kernel_all.shape[1]
    if P > DENSE_BELOW or 2 * P * L * L > kernel_all.shape[0]:
        tiling = Tiling(tiles)
        kernel = kernel_all[tiling.used]
        return (lambda v: tiling.k_mul(v, kernel)), (lambda v: tiling.kt_mul(v, kernel))
    dense = kernel_all[tiles].permute(0, 1, 3, 2, 4).reshape(P, L * g, L * g)  # [P, L g, L g]
    dense_t = dense.transpose(1, 2).contiguous()
    return (lambda v: torch.bmm(v.view(P, 1, L * g), dense_t).view(P, L, g)), \
        (lambda v: torch.bmm(v.view(P, 1, L * g), dense).view(P, L, g))
