"""The fused depthwise block as ``torch.library`` custom ops, and its functional form.

``convmixer_ext::dw_block_fwd`` and ``convmixer_ext::dw_block_bwd`` are functional (they
mutate nothing), have fake implementations (so ``torch.compile(fullgraph=True)`` traces
them) and the forward has its autograd formula registered with the op. The forward
returns ``out`` plus the per-channel ``mean`` and biased ``var`` it normalised with;
running buffers are updated from those by :func:`fused_dwconv_block`, outside the op.

Saved for backward: ``x``, the conv weight and bias, gamma, and the per-channel
mean/var — never the conv output, the activation or the normalised tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._partials import merge_stats
from .backends import get_impl, resolve_backend
from .semantics import (check_activation, rstd_from_var, stats_dtype, update_running_stats,
                        uses_batch_stats)


def _same_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with exactly ``like``'s strides (kernels index both with one set of strides)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _for_size(backend: str, x: Tensor) -> str:
    """Empty tensors need no kernel launch: the twin handles them (empty in, empty out)."""
    return "torch" if x.numel() == 0 else backend


def _dense(x: Tensor) -> Tensor:
    """Kernels read NCHW-contiguous and channels_last natively; any other layout (slices,
    expanded/broadcast views, permutations) is copied once to contiguous."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _pre_of(pre_scale, pre_shift):
    return None if pre_scale is None else (pre_scale, pre_shift)


@torch.library.custom_op("convmixer_ext::dw_block_fwd", mutates_args=())
def dw_block_fwd(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor,
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 pre_scale: Optional[Tensor], pre_shift: Optional[Tensor],
                 batch_stats: bool, eps: float, activation: str,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = get_impl(_for_size(backend, x))
    sd = stats_dtype(x.dtype)
    pre = _pre_of(pre_scale, pre_shift)
    if batch_stats:
        mean, var = impl.stats(x, weight, bias, activation, pre)
    else:
        mean = running_mean.to(sd, copy=True)
        var = running_var.to(sd, copy=True)
    out = impl.apply(x, weight, bias, mean, rstd_from_var(var, eps), gamma.to(sd),
                     beta.to(sd), activation, pre)
    return out, mean, var


@dw_block_fwd.register_fake
def _(x, weight, bias, gamma, beta, running_mean, running_var, pre_scale, pre_shift,
      batch_stats, eps, activation, backend):
    sd = stats_dtype(x.dtype)
    C = x.shape[1]
    return torch.empty_like(x), x.new_empty((C,), dtype=sd), x.new_empty((C,), dtype=sd)


@torch.library.custom_op("convmixer_ext::dw_block_bwd", mutates_args=())
def dw_block_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor,
                 mean: Tensor, var: Tensor, pre_scale: Optional[Tensor],
                 pre_shift: Optional[Tensor], batch_stats: bool, eps: float, activation: str,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five gradients, then those of pre_scale/pre_shift (empty without them)."""
    pre = _pre_of(pre_scale, pre_shift)
    *grads, dpre = _backward_passes(get_impl(_for_size(backend, x)), dout, x, weight, bias,
                                    gamma, mean, rstd_from_var(var, eps), batch_stats,
                                    activation, pre=pre)
    if dpre is None:  # pre_scale/pre_shift are in the statistics dtype, like these sums
        dpre = (mean.new_empty((0,)), mean.new_empty((0,)))
    return (*grads, *dpre)


def _backward_passes(impl, dout, x, weight, bias, gamma, mean, rstd, batch_stats, activation,
                     globalize=None, pre=None):
    """B1 then B2 (DESIGN.md §3); returns (dx, dW, db, dgamma, dbeta) in the parameters'
    dtypes, then dpre (see torch_backend.bwd_main). ``globalize(dbeta, dgamma)``
    (SyncBatchNorm) maps this rank's B1 sums to the ones B2 must use; the returned
    dgamma/dbeta stay this rank's own."""
    dout = _same_layout(dout, x)
    dbeta, dgamma = impl.bwd_reduce(dout, x, weight, bias, mean, rstd, activation, pre)
    b2_dbeta, b2_dgamma = (dbeta, dgamma) if globalize is None else globalize(dbeta, dgamma)
    dx, dw, db, dpre = impl.bwd_main(dout, x, weight, bias, mean, rstd, gamma.to(mean.dtype),
                                     b2_dbeta, b2_dgamma, batch_stats, activation, pre)
    return (dx, dw.to(weight.dtype), db.to(bias.dtype), dgamma.to(gamma.dtype),
            dbeta.to(gamma.dtype), dpre)


@dw_block_bwd.register_fake
def _(dout, x, weight, bias, gamma, mean, var, pre_scale, pre_shift, batch_stats, eps,
      activation, backend):
    n = 0 if pre_scale is None else x.shape[1]
    return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias),
            torch.empty_like(gamma), torch.empty_like(gamma), mean.new_empty((n,)),
            mean.new_empty((n,)))


def _dw_setup_context(ctx, inputs, output):
    (x, weight, bias, gamma, _beta, _rm, _rv, pre_scale, pre_shift, batch_stats, eps,
     activation, backend) = inputs
    ctx.save_for_backward(x, weight, bias, gamma, output[1], output[2], pre_scale, pre_shift)
    ctx.flags = (batch_stats, eps, activation, backend)
    ctx.mark_non_differentiable(output[1], output[2])


def _dw_backward(ctx, dout, _dmean, _dvar):
    *grads, dpa, dpc = dw_block_bwd(dout, *ctx.saved_tensors, *ctx.flags)
    if ctx.saved_tensors[6] is None:
        dpa = dpc = None
    return (*grads, None, None, dpa, dpc, None, None, None, None)


def refuse_double_backward(bwd_op) -> None:
    """Make ``bwd_op`` (a block's backward op) refuse to be differentiated, clearly."""
    torch.library.register_autograd(bwd_op, _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "double backward (gradients of gradients) through the fused ConvMixer blocks is not "
        "supported; use the reference model (convmixer_ext.reference) for higher-order "
        "gradients")


torch.library.register_autograd("convmixer_ext::dw_block_fwd", _dw_backward,
                                setup_context=_dw_setup_context)
refuse_double_backward(dw_block_bwd)


# --------------------------------------------------------------------------- validation
def _check_param(name: str, t, C: int, x: Tensor, dtypes) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must "
                         "be on the same device")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))} "
                        f"(x is {x.dtype}), got {t.dtype}")
    if tuple(t.shape) != (C,):
        raise ValueError(f"{name} must have shape ({C},) for x with {C} channels, "
                         f"got {tuple(t.shape)}")


def check_block_inputs(x, weight, bias, gamma, beta, running_mean, running_var) -> int:
    """Validate the fused block's tensors; return the kernel size."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    C = x.shape[1]
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1 \
            or weight.shape[2] != weight.shape[3] or weight.shape[2] < 1:
        raise ValueError(f"weight must be a depthwise kernel of shape ({C}, 1, k, k) for x "
                         f"with {C} channels, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; all tensors "
                         "must be on the same device")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    _check_param("bias", bias, C, x, (x.dtype,))
    bn_dtypes = tuple({x.dtype, torch.float32})
    for name, t in (("gamma", gamma), ("beta", beta)):
        _check_param(name, t, C, x, bn_dtypes)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if running_mean is not None:
        _check_param("running_mean", running_mean, C, x, bn_dtypes)
        _check_param("running_var", running_var, C, x, bn_dtypes)
    return weight.shape[-1]


def _check_pre(pre, x: Tensor):
    """(scale, shift) or (None, None); validated against x."""
    if pre is None:
        return None, None
    if not isinstance(pre, (tuple, list)) or len(pre) != 2:
        raise TypeError(f"pre must be None or a (scale, shift) pair of tensors, got "
                        f"{type(pre).__name__}")
    sd = stats_dtype(x.dtype)
    for name, t in zip(("pre scale", "pre shift"), pre):
        _check_param(name, t, x.shape[1], x, (sd,))
    return pre[0].contiguous(), pre[1].contiguous()


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


class _SyncBlock(torch.autograd.Function):
    """Batch statistics over every rank of ``group`` (``nn.SyncBatchNorm`` semantics).

    Forward: F1 on the local batch -> :func:`sync_stats` -> F2 with the global statistics.
    Backward: B1 locally -> all-reduce of (dbeta, dgamma) -> B2 with the global sums.
    dgamma/dbeta/dW/db returned are this rank's contributions (DDP reduces them), and so
    are the gradients of a folded input affine ``(pa, pc)`` when one is given.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, pa, pc, eps, activation, backend, group):
        impl = get_impl(backend)
        sd = stats_dtype(x.dtype)
        N, C, H, W = x.shape
        pre = _pre_of(pa, pc)
        mean_l, var_l = impl.stats(x, weight, bias, activation, pre)
        mean, var, n_global = sync_stats(mean_l, var_l, N * H * W, group)
        rstd = rstd_from_var(var, eps)
        out = impl.apply(x, weight, bias, mean, rstd, gamma.to(sd), beta.to(sd), activation,
                         pre)
        ctx.save_for_backward(x, weight, bias, gamma, mean, rstd, pa, pc)
        ctx.cfg = (activation, backend, group, N * H * W / n_global)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var, n_global

    @staticmethod
    def backward(ctx, dout, _dmean, _dvar, _dn):
        import torch.distributed as dist
        x, weight, bias, gamma, mean, rstd, pa, pc = ctx.saved_tensors
        activation, backend, group, local_share = ctx.cfg

        def globalize(dbeta, dgamma):
            glob = torch.cat([dbeta, dgamma])
            dist.all_reduce(glob, group=group)
            # B2 divides the sums by the local count; scaling by local/global count makes
            # that the division by the global count that SyncBatchNorm's gradient needs.
            return (glob * local_share).split(dbeta.numel())

        *grads, dpre = _backward_passes(get_impl(backend), dout, x, weight, bias, gamma, mean,
                                        rstd, True, activation, globalize, _pre_of(pa, pc))
        dpa, dpc = (None, None) if dpre is None else dpre
        return (*grads, dpa, dpc, None, None, None, None)


def _sync_group(process_group):
    """The group to synchronise statistics over, or None for local statistics."""
    if process_group is None:
        return None
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised")
    return process_group if dist.get_world_size(process_group) > 1 else None


def autocast_dtype(t) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` gives convolution inputs on t's device, or None when
    autocast is off there (or t is not a floating-point tensor)."""
    if isinstance(t, Tensor) and t.is_floating_point() \
            and torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return None


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


def fused_dwconv_block(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor,
                       running_mean: Optional[Tensor] = None,
                       running_var: Optional[Tensor] = None,
                       num_batches_tracked: Optional[Tensor] = None, training: bool = True,
                       momentum: Optional[float] = 0.1, eps: float = 1e-5,
                       activation: str = "gelu", backend: str = "auto",
                       process_group=None, pre=None) -> Tensor:
    """``x + BN(act(dwconv_k(x) + bias))`` in one fused op (DESIGN.md §2).

    ``pre=(scale, shift)`` (per-channel vectors in the statistics dtype: float32, float64
    for float64 x) folds a per-channel affine into the load: the block's input is then
    ``scale*x + shift`` (zero padding unchanged) — how the previous layer's BN2 reaches
    this block without its own pass over memory. Gradients flow to scale and shift.

    BatchNorm follows ``nn.BatchNorm2d`` exactly: batch statistics when ``training`` or
    when no running buffers are given, otherwise the running statistics; in training the
    running buffers (and ``num_batches_tracked``) are updated in place, with
    ``momentum=None`` meaning the cumulative average. With ``process_group`` (e.g.
    ``torch.distributed.group.WORLD``), batch statistics are those of the whole group's
    batch, as ``nn.SyncBatchNorm`` computes them.

    Under ``torch.autocast``, x, weight and bias are cast to the autocast dtype as
    ``nn.Conv2d`` would be (statistics stay fp32); the output has the dtype the reference
    block's residual add would give.
    """
    out_dtype = None
    dt = autocast_dtype(x)
    if dt is not None:
        out_dtype = torch.promote_types(dt, x.dtype)
        x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
    k = check_block_inputs(x, weight, bias, gamma, beta, running_mean, running_var)
    check_activation(activation)
    pre_scale, pre_shift = _check_pre(pre, x)
    name = resolve_backend(backend, x.device, x.dtype, k)
    batch_stats, group, n = batch_stats_plan(training, running_mean, x, process_group, "x")
    x = _dense(x)
    if group is not None:
        out, mean, var, n = _SyncBlock.apply(x, weight, bias, gamma, beta, pre_scale,
                                             pre_shift, float(eps), activation, name, group)
    else:
        out, mean, var = dw_block_fwd(x, weight, bias, gamma, beta, running_mean,
                                      running_var, pre_scale, pre_shift, batch_stats,
                                      float(eps), activation, name)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                             mean, var, n)
    return out if out_dtype is None else out.to(out_dtype)
