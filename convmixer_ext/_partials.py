"""Fixed-order final reductions of per-tile partials (docs/DESIGN.md, "Partials").

Kernels never use float atomics: every program/block writes its partial results to its own
row, and these small reductions finish the job in a fixed order, so a backend gives
bitwise-identical results run to run.
"""
from __future__ import annotations

import torch


def merge_stats(mean_p: torch.Tensor, m2_p: torch.Tensor, count_p: torch.Tensor):
    """Chan et al. parallel merge of per-tile (mean, M2, count) rows [T, C] into (mean,
    biased var). Stable for large mean offsets: each tile's M2 is centred on its own mean,
    and the between-tile term uses centred tile means, never E[g^2] - E[g]^2."""
    cnt = count_p.to(mean_p.dtype).view(-1, 1)
    n = cnt.sum()
    mean = (mean_p * cnt).sum(0) / n
    var = (m2_p.sum(0) + (cnt * (mean_p - mean) ** 2).sum(0)) / n
    return mean, var


def sum_partials(p: torch.Tensor) -> torch.Tensor:
    """Sum per-tile partials over their leading dimension (fixed order, deterministic)."""
    return p.sum(0)
