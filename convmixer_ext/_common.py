"""What the depthwise and the pointwise ops share: validation of BatchNorm settings, the
batch-statistics plan (nn.BatchNorm2d's rule, the process group to synchronise over),
the autocast dtype, the synchronised statistics (nn.SyncBatchNorm semantics) and the
refusal of double backward."""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
from torch import Tensor

from ._partials import merge_stats
from .semantics import uses_batch_stats


# --------------------------------------------------------------------------- validation
def check_strided(name: str, t: Tensor) -> None:
    """TypeError for sparse or other non-strided layouts (the kernels index strides)."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def _finite(v) -> bool:
    """math.isfinite for a real number that may be symbolic: under torch.compile(dynamic=True)
    a module's float attributes (eps, momentum) are, and they compare but have no isfinite
    (NaN fails both comparisons)."""
    return -math.inf < v < math.inf


def check_eps(eps) -> float:
    """``eps`` as a float; ValueError unless it is a finite positive number."""
    if isinstance(eps, bool) or not isinstance(eps, Real) or not _finite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite positive number, got {eps!r}")
    return float(eps)


def check_momentum(momentum, num_batches_tracked, training: bool, running_mean) -> None:
    """``momentum``: None (cumulative average, which needs ``num_batches_tracked``) or a
    finite number; the check applies when running statistics are updated."""
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative moving average) needs "
                             "num_batches_tracked, the count of batches seen so far; pass "
                             "the BatchNorm's num_batches_tracked buffer or a momentum")
        return
    if isinstance(momentum, bool) or not isinstance(momentum, Real) \
            or not _finite(momentum):
        raise ValueError(f"momentum must be None or a finite number, got {momentum!r}")


def check_num_batches_tracked(t, running_mean) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.dim() != 0 or t.is_floating_point() or t.is_complex():
        got = (t.dtype, tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"num_batches_tracked must be a 0-d integer tensor, got {got}")
    if running_mean is not None and t.device != running_mean.device:
        raise ValueError(f"num_batches_tracked is on {t.device} but running_mean is on "
                         f"{running_mean.device}")


# --------------------------------------------------------------------------- planning
def autocast_dtype(t) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` gives convolution inputs on t's device, or None when
    autocast is off there (or t is not a floating-point tensor)."""
    if isinstance(t, Tensor) and t.is_floating_point() \
            and torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return None


def _sync_group(process_group):
    """The group to synchronise statistics over, or None for local statistics."""
    if process_group is None:
        return None
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised")
    return process_group if dist.get_world_size(process_group) > 1 else None


def batch_stats_plan(training: bool, running_mean, t: Tensor, process_group, name: str):
    """(batch_stats, group, n): whether BN uses batch statistics (nn.BatchNorm2d's rule),
    the group to synchronise them over (None: local) and the local count N*H*W; refuses
    one value per channel like nn.BatchNorm2d (``name`` names the input in the message)."""
    batch_stats = uses_batch_stats(training, running_mean)
    N, _, H, W = t.shape
    n = N * H * W
    group = _sync_group(process_group) if batch_stats else None
    if batch_stats and n <= 1 and group is None:
        raise ValueError(f"expected more than 1 value per channel when using batch "
                         f"statistics, got {name} of shape {tuple(t.shape)}")
    return batch_stats, group, n


# --------------------------------------------------------------------------- SyncBatchNorm
class _GatherRows(torch.autograd.Function):
    """all_gather of one row per rank -> [world, len]; backward sums every rank's gradient
    of the gathered rows and returns this rank's row (each rank's statistics feed every
    rank's loss: the gradient path of nn.SyncBatchNorm). Uses all_gather and all_reduce
    only, so it runs on every process-group backend (gloo included)."""

    @staticmethod
    def forward(ctx, row, group):
        import torch.distributed as dist
        row = row.contiguous()
        parts = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, row, group=group)
        ctx.group, ctx.rank = group, dist.get_rank(group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def sync_stats(mean: Tensor, var: Tensor, count: int, group):
    """Statistics over the whole group's batch from each rank's per-channel (mean, biased
    var) over ``count`` values: all-gather, then the same Chan merge as the per-tile
    partials. Differentiable in mean and var. Returns (mean, var, global count)."""
    C = mean.numel()
    row = torch.cat([mean, var, mean.new_tensor([float(count)])])
    allp = _GatherRows.apply(row, group)
    cnt = allp[:, 2 * C].detach()
    mean_g, var_g = merge_stats(allp[:, :C], allp[:, C:2 * C] * cnt[:, None], cnt)
    return mean_g, var_g, int(cnt.sum().item())


# --------------------------------------------------------------------------- autograd
def refuse_double_backward(bwd_op) -> None:
    """Make ``bwd_op`` (a block's backward op) refuse to be differentiated, clearly."""
    torch.library.register_autograd(bwd_op, _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "double backward (gradients of gradients) through the fused ConvMixer blocks is not "
        "supported; use the reference model (convmixer_ext.reference) for higher-order "
        "gradients")
