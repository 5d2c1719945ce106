"""The pointwise block ``z = BN2(act(conv1x1(y) + b2))`` (docs/DESIGN.md, "Pointwise").

One op, ``convmixer_ext::pw_act_fwd``: a GEMM over positions (rows = N*H*W positions,
columns = output channels) whose epilogue adds the bias, applies the activation, stores
``g = act(u)`` (dtype and memory format of ``y``) and emits BN2's per-channel partial
statistics. It returns ``(g, mean, var)``, all three differentiable.

BN2 is then a per-channel affine ``z = a*g + c`` computed by autograd-tracked per-channel
ops. Inside a stack of fused layers it is handed to the next layer's depthwise block as its
input affine (docs/DESIGN.md, "Folded BN2"), so it never makes its own pass over memory.

Backward (``convmixer_ext::pw_act_bwd``): ``u`` is recomputed by the same GEMM, whose
epilogue forms ``du``; then ``dy = du W`` and ``dW = du^T y`` are two library GEMMs in the
dtype of ``y``. Backends: see :mod:`convmixer_ext.backends` (``OPS``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import (autocast_dtype, batch_stats_plan, check_eps, check_momentum,
                      check_strided, refuse_double_backward, sync_stats)
from ._layout import dense_vec, out_like, rows, unrows
from .backends import get_impl, resolve_backend
from .eager import batch_norm
from .semantics import (bn_affine, bn_scale_shift, check_activation, native_activation,
                        rstd_from_var, stats_dtype, update_running_stats)


def _w2(weight: Tensor) -> Tensor:
    """The [Co, Ci] matrix of a [Co, Ci, 1, 1] conv weight, dense."""
    return weight.reshape(weight.shape[0], -1).contiguous()


@torch.library.custom_op("convmixer_ext::pw_act_fwd", mutates_args=())
def pw_act_fwd(y: Tensor, weight: Tensor, bias: Tensor, activation: str,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(g = act(conv1x1(y) + b), per-channel mean, biased var of g)."""
    if y.numel() == 0:
        backend = "torch"
    return get_impl(backend).pw_fwd(y, _w2(weight), bias, activation)


@pw_act_fwd.register_fake
def _(y, weight, bias, activation, backend):
    sd = stats_dtype(y.dtype)
    Co = weight.shape[0]
    return out_like(y, Co), y.new_empty((Co,), dtype=sd), y.new_empty((Co,), dtype=sd)


@torch.library.custom_op("convmixer_ext::pw_act_bwd", mutates_args=())
def pw_act_bwd(dg: Tensor, dmean: Tensor, dvar: Tensor, y: Tensor, weight: Tensor,
               bias: Tensor, mean: Tensor, activation: str,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dy, dW, db) of pw_act_fwd given the gradients of its three outputs."""
    if y.numel() == 0:
        backend = "torch"
    sd = stats_dtype(y.dtype)
    f = lambda t: t.to(sd).contiguous()  # noqa: E731
    du, db = get_impl(backend).pw_du(dg, f(dmean), f(dvar), y, _w2(weight), bias, f(mean),
                                     activation)
    w2 = weight.reshape(weight.shape[0], -1).to(y.dtype)
    dw = (du.t() @ rows(y)).reshape(weight.shape)
    N, Ci, H, W = y.shape
    if y.is_contiguous():  # NCHW: one batched GEMM writes the planes directly
        dy = torch.matmul(w2.t(), du.view(N, H * W, du.shape[1]).transpose(1, 2))
        dy = dy.view(N, Ci, H, W)
    else:  # channels_last: rows are the layout itself
        dy = unrows(du @ w2, y)
    return dy, dw.to(weight.dtype), db.to(bias.dtype)


@pw_act_bwd.register_fake
def _(dg, dmean, dvar, y, weight, bias, mean, activation, backend):
    return torch.empty_like(y), torch.empty_like(weight), torch.empty_like(bias)


def _pw_setup_context(ctx, inputs, output):
    y, weight, bias, activation, backend = inputs
    _g, mean, _var = output
    ctx.save_for_backward(y, weight, bias, mean)
    ctx.flags = (activation, backend)


def _pw_backward(ctx, dg, dmean, dvar):
    y, weight, bias, mean = ctx.saved_tensors
    zeros = torch.zeros_like(mean)
    dg = out_like(y, weight.shape[0]).zero_() if dg is None else dg
    dy, dw, db = pw_act_bwd(dg, zeros if dmean is None else dmean,
                            zeros if dvar is None else dvar, y, weight, bias, mean, *ctx.flags)
    return dy, dw, db, None, None


torch.library.register_autograd("convmixer_ext::pw_act_fwd", _pw_backward,
                                setup_context=_pw_setup_context)
refuse_double_backward(pw_act_bwd)


# --------------------------------------------------------------------------- user functions
def resolve_pointwise(backend: str, y: Tensor, sync: bool = False) -> str:
    """The backend running the pointwise block on ``y`` ("eager": PyTorch's own modules)."""
    return resolve_backend(backend, y.device, autocast_dtype(y) or y.dtype, op="pointwise",
                           sync=sync)


def pointwise_folded(y: Tensor, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d,
                     training: bool, activation: str = "gelu", backend: str = "auto",
                     process_group=None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``(g, (a, c))`` with ``BN2(act(conv1x1(y))) == a*g + c`` per channel (``nn.BatchNorm2d``
    semantics; running buffers updated in training). ``a``, ``c`` are in the statistics
    dtype and carry autograd to gamma, beta and, with batch statistics, through the batch
    mean/var to ``y`` and the conv parameters. Under ``torch.autocast``, y and the conv
    parameters are cast to the autocast dtype as ``nn.Conv2d`` would be.
    ``process_group``: batch statistics over the whole group's batch (``nn.SyncBatchNorm``
    semantics; the gradients through them are summed over the ranks). "eager" has no
    folded form: where ``backend`` resolves to it, the twin ("torch") computes it (modules
    run "eager" unfused instead, see :func:`resolve_pointwise`).
    """
    check_activation(activation)
    if not isinstance(y, Tensor) or y.dim() != 4:
        raise ValueError(f"y must be a 4-D tensor [N, C, H, W], got {getattr(y, 'shape', y)}")
    check_strided("y", y)
    w, b = conv.weight, conv.bias
    if tuple(w.shape[1:]) != (y.shape[1], 1, 1) or b is None:
        raise ValueError(f"the pointwise conv must be a 1x1 conv with bias on {y.shape[1]} "
                         f"channels, got weight {tuple(w.shape)}")
    for name, t in (("pointwise weight", w), ("pointwise bias", b),
                    ("BN2 weight", getattr(bn, "weight", None)),
                    ("BN2 bias", getattr(bn, "bias", None)),
                    ("BN2 running_mean", bn.running_mean)):
        if isinstance(t, Tensor) and t.device != y.device:
            raise ValueError(f"{name} is on {t.device} but y is on {y.device}; all tensors must "
                             "be on the same device")
    eps = check_eps(bn.eps)
    check_momentum(bn.momentum, bn.num_batches_tracked, training, bn.running_mean)
    dt = autocast_dtype(y)
    if dt is not None:
        y, w, b = y.to(dt), w.to(dt), b.to(dt)
    if w.dtype != y.dtype or b.dtype != y.dtype:
        raise TypeError(f"pointwise weight and bias must have the dtype of y ({y.dtype}), got "
                        f"{w.dtype} and {b.dtype}")
    sd = stats_dtype(y.dtype)
    gamma, beta = bn_scale_shift(bn, w.shape[0], y.device, sd)
    batch_stats, group, n = batch_stats_plan(training, bn.running_mean, y, process_group, "y")
    name = resolve_pointwise(backend, y, sync=group is not None)
    if name == "eager":
        name = "torch"
    g, mean, var = pw_act_fwd(y, w, dense_vec(b), activation, name)
    if group is not None:
        mean, var, n = sync_stats(mean, var, n, group)
    if training and bn.running_mean is not None:
        update_running_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked,
                             bn.momentum, mean.detach(), var.detach(), n)
    if not batch_stats:
        mean, var = bn.running_mean.to(sd), bn.running_var.to(sd)
    a, c = bn_affine(mean, rstd_from_var(var, eps), gamma.to(sd), beta.to(sd))
    return g, (a, c)


def apply_affine(g: Tensor, affine: tuple[Tensor, Tensor]) -> Tensor:
    """``a*g + c`` per channel (dim 1 of g: [N, C, ...]; computed in the statistics dtype,
    stored in g's dtype)."""
    a, c = affine
    shape = (1, -1) + (1,) * (g.dim() - 2)
    return (g.to(a.dtype) * a.view(shape) + c.view(shape)).to(g.dtype)


def fused_pointwise_block(y: Tensor, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d,
                          training: bool, activation: str = "gelu",
                          backend: str = "auto") -> Tensor:
    """``BN2(act(conv1x1(y)))`` with ``nn.BatchNorm2d`` semantics (running buffers updated in
    training), taking the parameters of the reference modules."""
    name = resolve_pointwise(backend, y) if isinstance(y, Tensor) else backend
    if name == "eager":
        return batch_norm(native_activation(conv(y), activation), bn.weight, bn.bias,
                          bn.running_mean, bn.running_var, bn.num_batches_tracked, training,
                          bn.momentum, check_eps(bn.eps))
    g, affine = pointwise_folded(y, conv, bn, training, activation, name)
    return apply_affine(g, affine)
