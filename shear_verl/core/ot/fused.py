"""The tiled solver's iterations fused per problem and compiled by numba, for problems in host memory.

Why by hand: torch runs an iteration of ``_tiled_sinkhorn`` as ~30 batched operations over all
running problems, each a pass over memory (on a 2-core CPU ~2 us per problem and iteration, of
which the mat-vecs' arithmetic is ~0.6 us). Here each problem runs all its iterations up to the next
check at once, its kernel written out (w x w, 40 KB at w = 100) in the core's cache, and stops at
the first iteration whose marginal error is below the tolerance instead of at the next check. No
library provides this loop: POT's ``ot.batch`` runs batched torch operations like the torch backend, and torch.compile cannot fuse the
per-problem loop with the solve of Anderson's small system. The iterations are the torch path's
(``iteration.sinkhorn_iterations`` with ``anderson.AndersonSinkhorn``), in the problems' dtype, so
the fixed point and the stopping test are unchanged; only the order of the floating-point sums
differs. Why not that loop with numba's kernel products passed in: its per-step torch operations
(Anderson's step, the exp and log) cost more than the products, and more for the whole engine than
the +-5 % a refactoring may cost it (``scripts/bench_iteration.py`` and its ``--engine`` mode;
docs/benchmarks.md, "Sinkhorn's iteration, written once, and the host kernels").

GPU tensors take the torch backend (``tiled``, ``backend``), which is already batched there.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

# Reassociation (vectorised sums) and fused multiply-adds, but not fastmath's "no NaN / no inf":
# a problem whose scalings overflow must reach the check with its NaN or inf intact. For the same
# reason the kernels use numba's numpy error model: with the default (Python's), a kernel sum that
# underflows to 0 at a small epsilon raised ZeroDivisionError in `b / K^T alpha` instead of giving
# the inf that hands the problem to the float64 / per-problem path.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


# exp and log of float32 as straight-line code that vectorises (Cephes' expf and logf: Moshier 1989,
# "Methods and Programs for Mathematical Functions", single precision, <= 1 ulp measured against
# float64 numpy). Why by hand: numba's math.exp / math.log call libm once per element (~2-3 ns on
# this machine; no vector math library in llvmlite's LLVM), which was a quarter of an iteration;
# these take ~0.3 ns. Only for normal inputs in range: the kernels fall back to libm for the others.
_EXP_RANGE = (-87.3, 88.3)  # 2^n stays a normal float32 (n in [-126, 127])
_F = np.float32


@intrinsic
def _float_bits(typingctx, x):  # pragma: no cover - compiled
    """The bits of a float32 as an int32 (a bitcast)."""
    if x != types.float32:
        return None
    return types.int32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def _bits_float(typingctx, x):  # pragma: no cover - compiled
    """The float32 whose bits are the low 32 of the integer x (a bitcast)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        bits = builder.trunc(args[0], ir.IntType(32)) if x.bitwidth > 32 else args[0]
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(x), codegen


@numba.njit(cache=True, inline="always", fastmath={"contract", "nsz"})
def _expf(x):  # pragma: no cover - compiled
    """exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by a degree-7 polynomial."""
    x = min(max(x, _F(_EXP_RANGE[0])), _F(_EXP_RANGE[1]))
    n = math.floor(x * _F(1.44269504088896341) + _F(0.5))
    r = x - n * _F(0.693359375) + n * _F(2.12194440e-4)  # ln 2 in two parts: r exact
    poly = ((((_F(1.9875691500e-4) * r + _F(1.3981999507e-3)) * r + _F(8.3334519073e-3)) * r
             + _F(4.1665795894e-2)) * r + _F(1.6666665459e-1)) * r + _F(5.0000001201e-1)
    return (poly * r * r + r + _F(1.0)) * _bits_float((np.int32(n) + 127) << 23)


@numba.njit(cache=True, inline="always", fastmath={"contract", "nsz"})
def _logf(x):  # pragma: no cover - compiled
    """log(x) = e ln 2 + log(m), x = 2^e m with m in [sqrt(1/2), sqrt(2)), log(1 + z) by a polynomial."""
    bits = _float_bits(x)
    e = ((bits >> 23) & 0xFF) - 126
    m = _bits_float((bits & 0x007FFFFF) | 0x3F000000)  # [1/2, 1)
    below = m < _F(0.707106781186547524)
    e = e - below
    z = m + m * _F(below) - _F(1.0)
    zz = z * z
    poly = ((((((((_F(7.0376836292e-2) * z - _F(1.1514610310e-1)) * z + _F(1.1676998740e-1)) * z
                 - _F(1.2420140846e-1)) * z + _F(1.4249322787e-1)) * z - _F(1.6668057665e-1)) * z
              + _F(2.0000714765e-1)) * z - _F(2.4999993993e-1)) * z + _F(3.3333331174e-1)) * z * zz
    fe = _F(e)
    return z + (poly + fe * _F(-2.12194440e-4) - _F(0.5) * zz) + fe * _F(0.693359375)


def fast_exp(x):
    """exp for the kernels: ``_expf`` for float32 (inputs in ``_EXP_RANGE``), libm otherwise."""
    return math.exp(x)


def fast_log(x):
    """log for the kernels: ``_logf`` for float32 (normal positive inputs), libm otherwise."""
    return math.log(x)


@overload(fast_exp, jit_options={"fastmath": {"contract", "nsz"}})
def _fast_exp(x):  # pragma: no cover - compiled
    return (lambda x: _expf(x)) if x == types.float32 else (lambda x: math.exp(x))


@overload(fast_log, jit_options={"fastmath": {"contract", "nsz"}})
def _fast_log(x):  # pragma: no cover - compiled
    return (lambda x: _logf(x)) if x == types.float32 else (lambda x: math.log(x))


def _match_torch_threads() -> None:
    """Run numba's loops on as many threads as torch's (which the launcher sets, e.g. OMP_NUM_THREADS
    in a Ray worker), not on every core of the node."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


@numba.njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _solve_in_place(system, rhs):  # pragma: no cover - compiled (covered through ``advance``)
    """Solve one small system (Anderson's m x m, regularised) by Gaussian elimination with partial
    pivoting; rhs [m] becomes the solution. torch.linalg.solve_ex solves the batch in the torch path."""
    m = rhs.shape[0]
    for k in range(m):
        pivot = k
        for i in range(k + 1, m):
            if abs(system[i, k]) > abs(system[pivot, k]):
                pivot = i
        if pivot != k:
            for j in range(m):
                system[k, j], system[pivot, j] = system[pivot, j], system[k, j]
            rhs[k], rhs[pivot] = rhs[pivot], rhs[k]
        for i in range(k + 1, m):
            factor = system[i, k] / system[k, k]
            for j in range(k, m):
                system[i, j] -= factor * system[k, j]
            rhs[i] -= factor * rhs[k]
    for k in range(m - 1, -1, -1):
        total = rhs[k]
        for j in range(k + 1, m):
            total -= system[k, j] * rhs[j]
        rhs[k] = total / system[k, k]


@numba.njit(cache=True, inline="always")
def dense_kernel(kernel, tiles):  # pragma: no cover - compiled
    """One problem's kernel [n, n] written out from its blocks: kernel [NB, g, g], tiles [L, L] block ids."""
    L = tiles.shape[0]
    g = kernel.shape[1]
    dense = np.empty((L * g, L * g), kernel.dtype)
    for rb in range(L):
        for cb in range(L):
            block = kernel[tiles[rb, cb]]
            for i in range(g):
                for j in range(g):
                    dense[rb * g + i, cb * g + j] = block[i, j]
    return dense


@numba.njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _steps_from_alpha(dense, alpha, k_t_alpha, beta, row, a, tiny):  # pragma: no cover - compiled
    """Sinkhorn's half-steps of one problem from its row scaling alpha [n]: K^T alpha (row by row, as
    contiguous axpys), beta = b / K^T alpha (b = a) and the row marginal alpha * K beta, in place."""
    n = alpha.shape[0]
    k_t_alpha[:] = 0
    for i in range(n):
        for j in range(n):
            k_t_alpha[j] += alpha[i] * dense[i, j]
    for j in range(n):
        beta[j] = a / k_t_alpha[j]
    for i in range(n):
        total = tiny * 0
        for j in range(n):
            total += dense[i, j] * beta[j]
        row[i] = alpha[i] * total


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _advance(kernel, tiles, u, alpha, k_t_alpha, row, last_u, last_r, d_r, d_ur, gram, plain,
             steps, start, first_step, a, log_a, tol, ridge, tiny, huge, exp_low, exp_high):  # pragma: no cover
    """Up to ``steps`` iterations of every problem p (numba prange), in place: Anderson's step on
    u = log alpha from the residual log a - log row, alpha = exp u, K^T alpha, beta = b / K^T alpha
    (b = a: square problems) and row = alpha * K beta; with ``start`` the first iteration is the
    half-steps from the given alpha alone. A problem stops early once ||row - a|| < tol.

    kernel [NB, g, g] block kernels, tiles [P, L, L] block ids; u, alpha, k_t_alpha, row [P, n] the
    state after an iteration; Anderson's last_u, last_r [P, n], d_r, d_ur [P, m, n], gram [P, m, m],
    plain [P] (``anderson.Anderson``, whose step counter is ``first_step``)."""
    P, L, _ = tiles.shape
    g = kernel.shape[1]
    n = L * g
    memory = d_r.shape[1]
    for p in numba.prange(P):
        dense = dense_kernel(kernel, tiles[p])  # [n, n] problem p's kernel, written out
        r = np.empty(n, kernel.dtype)  # [n] residual
        beta = np.empty(n, kernel.dtype)  # [n]
        system = np.empty((memory, memory), kernel.dtype)
        gamma = np.empty(memory, kernel.dtype)
        for step in range(first_step - start, first_step + steps - start):
            if step < first_step:  # the first iteration: the half-steps from alpha
                _steps_from_alpha(dense, alpha[p], k_t_alpha[p], beta, row[p], a, tiny)
                continue
            err = tiny * 0
            for i in range(n):
                err += (row[p, i] - a) * (row[p, i] - a)
            if math.sqrt(err) < tol:
                break
            normal = True
            for i in range(n):
                r[i] = log_a - fast_log(row[p, i])
                normal &= (row[p, i] >= tiny) & (row[p, i] <= huge)
            if not normal:  # 0, subnormal, inf or NaN: libm's log (the check then finds the problem lost)
                for i in range(n):
                    r[i] = log_a - math.log(row[p, i])
            if memory == 0 or plain[p]:  # plain Sinkhorn: u + r (the history is still recorded)
                gamma[:] = 0
            if memory > 0:
                if step > 0:  # the newest differences replace the oldest
                    slot = step % memory
                    for i in range(n):
                        d_r[p, slot, i] = r[i] - last_r[p, i]
                        d_ur[p, slot, i] = u[p, i] - last_u[p, i] + d_r[p, slot, i]
                    for k in range(memory):
                        total = tiny * 0
                        for i in range(n):
                            total += d_r[p, slot, i] * d_r[p, k, i]
                        gram[p, slot, k] = total
                        gram[p, k, slot] = total
                for i in range(n):
                    last_u[p, i] = u[p, i]
                    last_r[p, i] = r[i]
                if not plain[p]:
                    trace = tiny * 0
                    for k in range(memory):
                        trace += gram[p, k, k]
                    for k in range(memory):
                        for j in range(memory):
                            system[k, j] = gram[p, k, j]
                        system[k, k] += ridge * trace + tiny
                        total = tiny * 0
                        for i in range(n):
                            total += r[i] * d_r[p, k, i]
                        gamma[k] = total
                    _solve_in_place(system, gamma)
            for i in range(n):  # u + r - gamma^T (dU + dR)
                u[p, i] += r[i]
            for k in range(memory):
                for i in range(n):
                    u[p, i] -= gamma[k] * d_ur[p, k, i]
            in_range = True
            for i in range(n):
                alpha[p, i] = fast_exp(u[p, i])
                in_range &= (u[p, i] >= exp_low) & (u[p, i] <= exp_high)
            if not in_range:  # overflow, underflow or NaN: libm's exp
                for i in range(n):
                    alpha[p, i] = math.exp(u[p, i])
            _steps_from_alpha(dense, alpha[p], k_t_alpha[p], beta, row[p], a, tiny)


def advance(kernel_all: torch.Tensor, tiles: torch.Tensor, alpha: torch.Tensor, k_t_alpha: torch.Tensor,
            row: torch.Tensor, accel, steps: int, start: bool, tol: float, ridge: float) -> None:
    """``steps`` iterations of the tiled solver for the problems tiles [P, L, L] on host tensors, in
    place (alpha, k_t_alpha, row [P, n] and ``accel``, an ``anderson.AndersonSinkhorn`` holding u;
    ``start``: the first is the half-steps from alpha alone); problems whose marginal error falls below
    ``tol`` stop there."""
    u = accel.u
    n = u.shape[1]
    if accel.last is None:  # the kernel keeps Anderson's last iterate and residual in these
        accel.last = (torch.empty_like(u), torch.empty_like(u))
    _match_torch_threads()
    info = torch.finfo(u.dtype)
    scalar = np.float32 if u.dtype == torch.float32 else np.float64
    arrays = [t.numpy() for t in (kernel_all, tiles, u, alpha, k_t_alpha, row, *accel.last, accel.d_r, accel.d_ur,
                                  accel.gram, accel.plain)]
    _advance(*arrays, steps, start, accel.steps, scalar(1.0 / n), scalar(math.log(1.0 / n)), scalar(tol), scalar(ridge),
             scalar(info.tiny), scalar(info.max), scalar(_EXP_RANGE[0]), scalar(_EXP_RANGE[1]))
    accel.steps += steps - start


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _c_transform(costs, tiles, f, of_columns, out):  # pragma: no cover - compiled
    """out = f^c per problem p (numba prange): from f [P, L, g] on the rows, out(y) = min_x C(x, y) - f(x)
    on the columns; ``of_columns``: from f on the columns, out(x) = min_y C(x, y) - f(y) on the rows.
    costs [NB, g, g] blocks, tiles [P, L, L] block ids."""
    P, L, _ = tiles.shape
    g = costs.shape[1]
    for p in numba.prange(P):
        out[p] = np.inf
        for rb in range(L):
            for cb in range(L):
                block = costs[tiles[p, rb, cb]]
                for i in range(g):
                    if of_columns:
                        least = out[p, rb, i]
                        for j in range(g):
                            least = min(least, block[i, j] - f[p, cb, j])
                        out[p, rb, i] = least
                    else:
                        for j in range(g):
                            out[p, cb, j] = min(out[p, cb, j], block[i, j] - f[p, rb, i])


def c_transform(costs: torch.Tensor, tiles: torch.Tensor, f: torch.Tensor, of_columns: bool) -> torch.Tensor:
    """``_c_transform`` on host tensors: f [P, L, g] -> f^c [P, L, g] of the problems tiles [P, L, L]."""
    _match_torch_threads()
    out = torch.empty_like(f)
    _c_transform(costs.contiguous().numpy(), tiles.contiguous().numpy(), f.contiguous().numpy(), of_columns,
                 out.numpy())
    return out


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _transport_costs(weighted, tiles, alpha, beta, out):  # pragma: no cover - compiled
    """out[p] = <P, C> = sum_ij alpha_i K_ij C_ij beta_j of every problem p (numba prange): weighted
    [NB, g, g] the blocks of K * C, tiles [P, L, L] block ids, alpha and beta [P, n] its scalings."""
    P, L, _ = tiles.shape
    g = weighted.shape[1]
    for p in numba.prange(P):
        total = alpha[p, 0] * 0
        for rb in range(L):
            for cb in range(L):
                block = weighted[tiles[p, rb, cb]]
                for i in range(g):
                    inner = total * 0
                    for j in range(g):
                        inner += block[i, j] * beta[p, cb * g + j]
                    total += alpha[p, rb * g + i] * inner
        out[p] = total


def transport_costs(weighted: torch.Tensor, tiles: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``_transport_costs`` on host tensors: <P, C> [P] of the problems tiles [P, L, L] from the blocks
    of K * C and their scalings alpha, beta [P, n]."""
    _match_torch_threads()
    out = alpha.new_empty(alpha.shape[0])
    _transport_costs(weighted.contiguous().numpy(), tiles.contiguous().numpy(), alpha.contiguous().numpy(),
                     beta.contiguous().numpy(), out.numpy())
    return out
