"""Fixed-order final reductions of per-tile partials, shared by the Triton and CUDA backends.

Kernels never use float atomics by default: every program/block writes its partial
results to its own row, and these small deterministic reductions finish the job.
"""
from __future__ import annotations

import torch

from .semantics import ACTIVATIONS


def merge_stats(mean_p: torch.Tensor, m2_p: torch.Tensor, count_p: torch.Tensor):
    """Chan et al. parallel merge of per-tile (mean, M2, count) rows [T, C] into (mean, var).

    Stable for large mean offsets: each tile's M2 is centred on its own mean, and the
    between-tile term uses centred tile means, never E[g^2] - E[g]^2.
    """
    cnt = count_p.to(mean_p.dtype).view(-1, 1)
    n = cnt.sum()
    mean = (mean_p * cnt).sum(0) / n
    var = (m2_p.sum(0) + (cnt * (mean_p - mean) ** 2).sum(0)) / n
    return mean, var


def sum_partials(p: torch.Tensor) -> torch.Tensor:
    """Sum per-tile partials over their leading dimension (fixed order, deterministic)."""
    return p.sum(0)


def _pre(pre):
    return (None, None) if pre is None else (pre[0], pre[1])


class KernelBackend:
    """Adapts four partial-producing kernels (the Triton launchers or the compiled ops) to
    the backend interface of :mod:`convmixer_ext.torch_backend`.

    Kernel contract (activation passed as its integer id; ``pa``, ``pc``: the folded
    per-channel affine of the block input, both None when there is none):
      k_stats(x, w, b, pa, pc, act) -> mean_p [T, C], m2_p [T, C], count_p [T]
      k_apply(x, w, b, mean, rstd, gamma, beta, pa, pc, act) -> out
      k_bwd_reduce(dout, x, w, b, mean, rstd, pa, pc, act) -> dbeta_p [T, C], dgamma_p [T, C]
      k_bwd_main(dout, x, w, b, mean, rstd, gamma, dbeta, dgamma, batch_stats, pa, pc, act)
          -> dx, dw_p [T, C, k, k], db_p [T, C], da_p [T, C], dc_p [T, C]
             (da_p, dc_p: [0, C] without the affine)
    """

    def __init__(self, k_stats, k_apply, k_bwd_reduce, k_bwd_main):
        self.k_stats, self.k_apply = k_stats, k_apply
        self.k_bwd_reduce, self.k_bwd_main = k_bwd_reduce, k_bwd_main

    def stats(self, x, weight, bias, activation, pre=None):
        return merge_stats(*self.k_stats(x, weight, bias, *_pre(pre), ACTIVATIONS[activation]))

    def apply(self, x, weight, bias, mean, rstd, gamma, beta, activation, pre=None):
        return self.k_apply(x, weight, bias, mean, rstd, gamma, beta, *_pre(pre),
                            ACTIVATIONS[activation])

    def bwd_reduce(self, dout, x, weight, bias, mean, rstd, activation, pre=None):
        dbeta_p, dgamma_p = self.k_bwd_reduce(dout, x, weight, bias, mean, rstd, *_pre(pre),
                                              ACTIVATIONS[activation])
        return sum_partials(dbeta_p), sum_partials(dgamma_p)

    def bwd_main(self, dout, x, weight, bias, mean, rstd, gamma, dbeta, dgamma, batch_stats,
                 activation, pre=None):
        dx, dw_p, db_p, da_p, dc_p = self.k_bwd_main(
            dout, x, weight, bias, mean, rstd, gamma, dbeta, dgamma, batch_stats, *_pre(pre),
            ACTIVATIONS[activation])
        dpre = None if pre is None else (sum_partials(da_p), sum_partials(dc_p))
        return dx, sum_partials(dw_p).view(weight.shape), sum_partials(db_p), dpre
