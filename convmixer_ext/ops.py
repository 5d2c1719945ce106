"""The fused depthwise block: its ``torch.library`` custom ops and :func:`fused_dwconv_block`
(docs/DESIGN.md, "Forward", "Backward" and "Backends").

``convmixer_ext::dw_block_fwd`` and ``convmixer_ext::dw_block_bwd`` are functional (they
mutate nothing), have fake implementations (so ``torch.compile(fullgraph=True)`` traces
them) and the forward has its autograd formula registered with the op. The forward returns
``out`` plus the per-channel ``mean`` and biased ``var`` it normalised with; running
buffers are updated from those by :func:`fused_dwconv_block`, outside the op. The op
schemas call the input affine ``pre_scale``/``pre_shift`` (its first name, kept for
callers of the ops); everywhere else it is ``in_scale``/``in_shift``.

Saved for backward: ``x``, the conv weight and bias, gamma, the per-channel mean/var and
the input affine, plus the conv output u where F1 saved it (``save_u``, docs/DESIGN.md,
"Saved convolution output") — never the activation or the normalised tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import eager
from ._common import (autocast_dtype, batch_stats_plan, check_eps, check_momentum,
                      check_num_batches_tracked, check_strided, refuse_double_backward,
                      sync_stats)
from ._layout import dense, dense_vec, is_channels_last, same_layout
from .backends import get_impl, resolve_backend, saves_conv_output
from .cuda_kernels import tc_takes_width
from .semantics import check_activation, rstd_from_var, stats_dtype, update_running_stats


def _for_size(backend: str, x: Tensor) -> str:
    """Empty tensors need no kernel launch: the twin handles them (empty in, empty out)."""
    return "torch" if x.numel() == 0 else backend


def _in_affine(in_scale, in_shift):
    return None if in_scale is None else (in_scale, in_shift)


def _forward_passes(impl, x, weight, bias, gamma, beta, in_affine, eps, activation,
                    running=None, globalize=None, save_u=False):
    """F1 then F2 (docs/DESIGN.md, "Forward"); returns (out, mean, var, u). ``running``:
    (mean, var) to normalise with instead of batch statistics (F1 is skipped).
    ``globalize(mean, var)`` (SyncBatchNorm) maps this rank's statistics to the group's.
    ``save_u``: F1 (when it runs) saves the convolution output u (returned; else None) and
    F2 reads it."""
    sd = stats_dtype(x.dtype)
    u = None
    if running is None:
        u = torch.empty_like(x, dtype=sd) if save_u else None
        mean, var = impl.stats(x, weight, bias, activation, in_affine, u=u)
        if globalize is not None:
            mean, var = globalize(mean, var)
    else:
        mean, var = running
    out = impl.apply(x, weight, bias, mean, rstd_from_var(var, eps), gamma.to(sd),
                     beta.to(sd), activation, in_affine, u=u)
    return out, mean, var, u


def _backward_passes(impl, dout, x, weight, bias, gamma, mean, rstd, batch_stats, activation,
                     in_affine=None, globalize=None, u=None):
    """B1 then B2 (docs/DESIGN.md, "Backward"); returns (dx, dW, db, dgamma, dbeta) in the
    parameters' dtypes, then the input affine's gradients (None without it).
    ``globalize(dbeta, dgamma)`` (SyncBatchNorm) maps this rank's B1 sums to the ones B2
    must use; the returned dgamma/dbeta stay this rank's own. ``u``: F1's saved convolution
    output (read instead of recomputed), or None."""
    dout = same_layout(dout, x)
    dbeta, dgamma = impl.bwd_reduce(dout, x, weight, bias, mean, rstd, activation, in_affine,
                                    u=u)
    b2_dbeta, b2_dgamma = (dbeta, dgamma) if globalize is None else globalize(dbeta, dgamma)
    dx, dw, db, d_aff = impl.bwd_main(dout, x, weight, bias, mean, rstd, gamma.to(mean.dtype),
                                      b2_dbeta, b2_dgamma, batch_stats, activation, in_affine,
                                      u=u)
    return (dx, dw.to(weight.dtype), db.to(bias.dtype), dgamma.to(gamma.dtype),
            dbeta.to(gamma.dtype), d_aff)


@torch.library.custom_op("convmixer_ext::dw_block_fwd", mutates_args=())
def dw_block_fwd(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor,
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 pre_scale: Optional[Tensor], pre_shift: Optional[Tensor],
                 batch_stats: bool, eps: float, activation: str, backend: str,
                 save_u: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, mean, var, u): u is the convolution output F1 saved (``save_u`` and
    ``batch_stats``: the statistics dtype, x's shape and strides), else empty."""
    sd = stats_dtype(x.dtype)
    running = None if batch_stats else (running_mean.to(sd, copy=True),
                                        running_var.to(sd, copy=True))
    out, mean, var, u = _forward_passes(get_impl(_for_size(backend, x)), x, weight, bias,
                                        gamma, beta, _in_affine(pre_scale, pre_shift), eps,
                                        activation, running, save_u=save_u)
    return out, mean, var, (x.new_empty((0,), dtype=sd) if u is None else u)


@dw_block_fwd.register_fake
def _(x, weight, bias, gamma, beta, running_mean, running_var, pre_scale, pre_shift,
      batch_stats, eps, activation, backend, save_u=False):
    sd = stats_dtype(x.dtype)
    C = x.shape[1]
    u = torch.empty_like(x, dtype=sd) if save_u and batch_stats else \
        x.new_empty((0,), dtype=sd)
    return torch.empty_like(x), x.new_empty((C,), dtype=sd), x.new_empty((C,), dtype=sd), u


@torch.library.custom_op("convmixer_ext::dw_block_bwd", mutates_args=())
def dw_block_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor,
                 mean: Tensor, var: Tensor, pre_scale: Optional[Tensor],
                 pre_shift: Optional[Tensor], batch_stats: bool, eps: float, activation: str,
                 backend: str, u: Optional[Tensor] = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five gradients, then those of the input affine (empty without it). ``u``: the
    forward's saved convolution output, or None (recomputed)."""
    *grads, d_aff = _backward_passes(get_impl(_for_size(backend, x)), dout, x, weight, bias,
                                     gamma, mean, rstd_from_var(var, eps), batch_stats,
                                     activation, _in_affine(pre_scale, pre_shift), u=u)
    if d_aff is None:  # the input affine is in the statistics dtype, like these sums
        d_aff = (mean.new_empty((0,)), mean.new_empty((0,)))
    return (*grads, *d_aff)


@dw_block_bwd.register_fake
def _(dout, x, weight, bias, gamma, mean, var, pre_scale, pre_shift, batch_stats, eps,
      activation, backend, u=None):
    n = 0 if pre_scale is None else x.shape[1]
    return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias),
            torch.empty_like(gamma), torch.empty_like(gamma), mean.new_empty((n,)),
            mean.new_empty((n,)))


def _dw_setup_context(ctx, inputs, output):
    (x, weight, bias, gamma, _beta, _rm, _rv, in_scale, in_shift, batch_stats, eps,
     activation, backend, save_u) = inputs  # (defaults filled in)
    _out, mean, var, u = output
    ctx.save_for_backward(x, weight, bias, gamma, mean, var, in_scale, in_shift,
                          u if save_u and batch_stats else None)
    ctx.has_in_affine = in_scale is not None
    ctx.flags = (batch_stats, eps, activation, backend)
    ctx.mark_non_differentiable(mean, var, u)


def _dw_backward(ctx, dout, _dmean, _dvar, _du):
    *saved, u = ctx.saved_tensors
    (dx, dw, db, dgamma, dbeta, d_scale, d_shift) = dw_block_bwd(dout, *saved, *ctx.flags,
                                                                 u=u)
    if not ctx.has_in_affine:
        d_scale = d_shift = None
    # inputs: x, weight, bias, gamma, beta, running_mean, running_var, pre_scale, pre_shift,
    # batch_stats, eps, activation, backend, save_u
    return (dx, dw, db, dgamma, dbeta, None, None, d_scale, d_shift, None, None, None, None,
            None)


torch.library.register_autograd("convmixer_ext::dw_block_fwd", _dw_backward,
                                setup_context=_dw_setup_context)
refuse_double_backward(dw_block_bwd)


# --------------------------------------------------------------------------- validation
def check_param(name: str, t, C: int, x: Tensor, dtypes) -> None:
    """A per-channel vector: a Tensor on x's device, of one of ``dtypes``, of shape (C,)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    check_strided(name, t)
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
    check_strided("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    N, C, H, W = x.shape
    if C == 0 or H == 0 or W == 0:
        raise ValueError(f"x must have at least one channel and a non-empty image, got shape "
                         f"{tuple(x.shape)}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    check_strided("weight", weight)
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1 \
            or weight.shape[2] != weight.shape[3] or weight.shape[2] < 1:
        raise ValueError(f"weight must be a depthwise kernel of shape ({C}, 1, k, k) for x "
                         f"with {C} channels, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; all tensors "
                         "must be on the same device")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    check_param("bias", bias, C, x, (x.dtype,))
    bn_dtypes = tuple({x.dtype, torch.float32})
    for name, t in (("gamma", gamma), ("beta", beta)):
        check_param(name, t, C, x, bn_dtypes)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if running_mean is not None:
        check_param("running_mean", running_mean, C, x, bn_dtypes)
        check_param("running_var", running_var, C, x, bn_dtypes)
    return weight.shape[-1]


def check_in_affine(in_affine, x: Tensor, name: str = "in_affine"):
    """(in_scale, in_shift) or None, validated against x."""
    if in_affine is None:
        return None
    if not isinstance(in_affine, (tuple, list)) or len(in_affine) != 2:
        raise TypeError(f"{name} must be None or a (scale, shift) pair of tensors, got "
                        f"{type(in_affine).__name__}")
    sd = stats_dtype(x.dtype)
    for part, t in zip(("scale", "shift"), in_affine):
        check_param(f"{name} {part}", t, x.shape[1], x, (sd,))
    return tuple(in_affine)


# --------------------------------------------------------------------------- SyncBatchNorm
class _SyncBlock(torch.autograd.Function):
    """Batch statistics over every rank of ``group`` (``nn.SyncBatchNorm`` semantics).

    Forward: F1 on the local batch -> :func:`sync_stats` -> F2 with the global statistics.
    Backward: B1 locally -> all-reduce of (dbeta, dgamma) -> B2 with the global sums.
    dgamma/dbeta/dW/db returned are this rank's contributions (DDP reduces them), and so
    are the gradients of the input affine ``(in_scale, in_shift)`` when one is given.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, in_scale, in_shift, eps, activation,
                backend, group, save_u):
        N, C, H, W = x.shape
        counts = {}

        def globalize(mean, var):
            mean, var, counts["global"] = sync_stats(mean, var, N * H * W, group)
            return mean, var

        in_affine = _in_affine(in_scale, in_shift)
        out, mean, var, u = _forward_passes(get_impl(backend), x, weight, bias, gamma, beta,
                                            in_affine, eps, activation, globalize=globalize,
                                            save_u=save_u)
        ctx.save_for_backward(x, weight, bias, gamma, mean, rstd_from_var(var, eps), in_scale,
                              in_shift, u)
        ctx.cfg = (activation, backend, group, N * H * W / counts["global"])
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var, counts["global"]

    @staticmethod
    def backward(ctx, dout, _dmean, _dvar, _dn):
        import torch.distributed as dist
        x, weight, bias, gamma, mean, rstd, in_scale, in_shift, u = ctx.saved_tensors
        activation, backend, group, local_share = ctx.cfg

        def globalize(dbeta, dgamma):
            glob = torch.cat([dbeta, dgamma])
            dist.all_reduce(glob, group=group)
            # B2 divides the sums by the local count; scaling by local/global count makes
            # that the division by the global count that SyncBatchNorm's gradient needs.
            return (glob * local_share).split(dbeta.numel())

        *grads, d_aff = _backward_passes(get_impl(backend), dout, x, weight, bias, gamma, mean,
                                         rstd, True, activation,
                                         _in_affine(in_scale, in_shift), globalize, u)
        d_scale, d_shift = (None, None) if d_aff is None else d_aff
        return (*grads, d_scale, d_shift, None, None, None, None, None)


# --------------------------------------------------------------------------- user function
def fused_dwconv_block(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor,
                       running_mean: Optional[Tensor] = None,
                       running_var: Optional[Tensor] = None,
                       num_batches_tracked: Optional[Tensor] = None, training: bool = True,
                       momentum: Optional[float] = 0.1, eps: float = 1e-5,
                       activation: str = "gelu", backend: str = "auto",
                       process_group=None, in_affine=None, pre=None,
                       save_conv: Optional[bool] = None) -> Tensor:
    """``input + BN(act(dwconv_k(input) + bias))`` in one fused op, ``input = x`` (or the
    input affine of x, below); docs/DESIGN.md, "Forward".

    Every tensor may have any strides and storage offset: what a kernel cannot index
    natively (anything but NCHW-contiguous or channels_last x, non-dense vectors) is copied
    once to a dense tensor here, and gradients flow back to the originals.

    ``in_affine=(scale, shift)`` (per-channel vectors in the statistics dtype: float32,
    float64 for float64 x; ``pre`` is its older name) makes the block input
    ``scale*x + shift`` (zero padding unchanged) — how the previous layer's BN2 reaches
    this block without its own pass over memory. Gradients flow to scale and shift.

    BatchNorm follows ``nn.BatchNorm2d`` exactly: batch statistics when ``training`` or
    when no running buffers are given, otherwise the running statistics; in training the
    running buffers (and ``num_batches_tracked``) are updated in place, whatever their
    strides. ``momentum=None`` means the cumulative average, which needs
    ``num_batches_tracked`` (a ``ValueError`` without it, as nn.BatchNorm2d always has one).
    ``eps`` must be a finite positive number. With ``process_group`` (e.g.
    ``torch.distributed.group.WORLD``), batch statistics are those of the whole group's
    batch, as ``nn.SyncBatchNorm`` computes them.

    ``save_conv``: whether F1 saves the convolution output (float32, one tensor the size
    of x, kept for backward) so that F2 and backward read it instead of recomputing the
    k*k-tap convolution; None (the default) saves it where that is predicted faster (the
    kernel backends at kernel sizes >= 7, :func:`convmixer_ext.backends.saves_conv_output`);
    False trades that time for the memory. Results are the same either way.

    Under ``torch.autocast``, x, weight and bias are cast to the autocast dtype as
    ``nn.Conv2d`` would be (statistics stay fp32); the output has the dtype the reference
    block's residual add would give.
    """
    if pre is not None:
        if in_affine is not None:
            raise TypeError("give the input affine as in_affine or as pre (its older name), "
                            "not both")
        in_affine = pre
    dt = autocast_dtype(x)
    # under autocast the kernels take x, weight and bias cast as nn.Conv2d casts them
    xc, wc, bc = (x, weight, bias) if dt is None else (
        t.to(dt) if isinstance(t, Tensor) else t for t in (x, weight, bias))
    k = check_block_inputs(xc, wc, bc, gamma, beta, running_mean, running_var)
    check_activation(activation)
    eps = check_eps(eps)
    check_momentum(momentum, num_batches_tracked, training, running_mean)
    check_num_batches_tracked(num_batches_tracked, running_mean)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    in_affine = check_in_affine(in_affine, xc, "pre" if pre is not None else "in_affine")
    batch_stats, group, n = batch_stats_plan(training, running_mean, x, process_group, "x")
    # (tc_width: `True if .. else False` makes a symbolic width's test a guarded constant
    # under torch.compile(dynamic=True), as the backend choice needs; bool() would not)
    name = resolve_backend(backend, x.device, xc.dtype, k, sync=group is not None,
                           channels_last=is_channels_last(x), training=training,
                           tc_width=True if tc_takes_width(x.shape[-1]) else False)
    save_u = saves_conv_output(name, k, batch_stats, save_conv)
    if name == "eager":  # PyTorch's own ops: autocast casts inside them, as in the reference
        return eager.dw_block(x, weight, bias, gamma, beta, running_mean, running_var,
                              num_batches_tracked, training, momentum, eps, activation,
                              in_affine)
    out_dtype = None if dt is None else torch.promote_types(dt, x.dtype)
    x, weight, bias = xc, wc, bc
    # the boundary: everything the kernels index is made dense here, once
    sd = stats_dtype(x.dtype)
    x, weight, bias = dense(x), weight.contiguous(), dense_vec(bias)
    gamma, beta = dense_vec(gamma.to(sd)), dense_vec(beta.to(sd))
    in_scale, in_shift = (None, None) if in_affine is None else map(dense_vec, in_affine)
    if group is not None:
        out, mean, var, n = _SyncBlock.apply(x, weight, bias, gamma, beta, in_scale, in_shift,
                                             eps, activation, name, group, save_u)
    else:
        out, mean, var, _u = dw_block_fwd(x, weight, bias, gamma, beta, running_mean,
                                          running_var, in_scale, in_shift, batch_stats, eps,
                                          activation, name, save_u)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                             mean, var, n)
    return out if out_dtype is None else out.to(out_dtype)

