"""Entropic optimal transport for SHEAR's span pairs (Chen et al. 2026, arXiv 2604.23318, Algorithm 1 line 4).

One module per job: ``iteration`` (Sinkhorn's iteration, written once, kernel products passed in),
``relaxation`` and ``anderson`` (its accelerations: the per-problem and the tiled solver's),
``sinkhorn`` (the stabilised per-problem solver), ``tiling`` (kernel products of problems sharing cost blocks),
``bounds`` (lower bounds for exact pruning: mean, nearest-neighbour and W1 dual, ``RunningMinima``), ``tiled`` (the tiled solver),
``fused`` (its loops as numba kernels, host memory), ``backend`` (which of the two runs them).
"""

from shear_verl.core.ot.backend import BACKENDS, check_backend, default_backend
from shear_verl.core.ot.bounds import RunningMinima, mean_bound, nearest_neighbour_bound, w1_dual_bound
from shear_verl.core.ot.sinkhorn import sinkhorn_transport_cost
from shear_verl.core.ot.tiled import tiled_sinkhorn_transport_cost

__all__ = ["BACKENDS", "RunningMinima", "check_backend", "default_backend", "mean_bound", "nearest_neighbour_bound",
           "sinkhorn_transport_cost", "tiled_sinkhorn_transport_cost", "w1_dual_bound"]
