"""The pointwise block ``z = BN2(act(conv1x1(y) + b2))`` (DESIGN.md §4).

One op, ``convmixer_ext::pw_act_fwd``: a GEMM over positions (rows = N*H*W positions,
columns = output channels) whose epilogue adds the bias, applies the activation, stores
``g = act(u)`` (dtype and memory format of ``y``) and emits BN2's per-channel partial
statistics, merged like the depthwise block's (``_partials.merge_stats``). It returns
``(g, mean, var)``, all three differentiable.

BN2 itself is then a per-channel affine ``z = a*g + c`` (``a = gamma*rstd``,
``c = beta - a*mean``: semantics.bn_affine) computed by autograd-tracked per-channel
ops. Inside a stack of fused layers that affine is never applied as its own pass: it is
handed to the next layer's depthwise block, whose kernels apply it on load
(``fused_dwconv_block(..., pre=(a, c))``) and return the gradients of ``g``, ``a`` and
``c``; autograd turns those into the gradients of ``mean``/``var`` and ``gamma``/``beta``.

Backward (``convmixer_ext::pw_act_bwd``): ``u`` is recomputed by the same GEMM, whose
epilogue forms ``du = (dg + dmean/M + dvar*2(g-mean)/M) * act'(u)`` and the partial
sums of ``db`` (Triton: one kernel; torch: the same formula in PyTorch ops); then
``dy = du W`` and ``dW = du^T y`` are two library GEMMs in the dtype of ``y``.

Backends: ``"triton"`` (CUDA tensors, or CPU under TRITON_INTERPRET=1) and ``"torch"``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._partials import merge_stats, sum_partials
from .backends import BackendUnavailableError, _reason
from .ops import autocast_dtype, batch_stats_plan, refuse_double_backward, sync_stats
from .semantics import (ACTIVATIONS, act_fwd, act_grad, bn_affine, bn_scale_shift,
                        check_activation, rstd_from_var, stats_dtype, update_running_stats)

PW_BACKENDS = ("triton", "torch")


def _rows(y: Tensor) -> Tensor:
    """[N, C, H, W] -> [N*H*W, C] (a view for channels_last, a copy otherwise)."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _channels_last(like: Tensor) -> bool:
    return like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()


def _unrows(m: Tensor, like: Tensor) -> Tensor:
    """[N*H*W, C'] -> [N, C', H, W] in ``like``'s memory format."""
    N, _, H, W = like.shape
    out = m.reshape(N, H, W, m.shape[1]).permute(0, 3, 1, 2)
    return out.contiguous(memory_format=torch.channels_last) if _channels_last(like) \
        else out.contiguous()


def out_like(y: Tensor, channels: int) -> Tensor:
    """An empty [N, channels, H, W] tensor of y's dtype in y's memory format."""
    N, _, H, W = y.shape
    fmt = torch.channels_last if _channels_last(y) else torch.contiguous_format
    return torch.empty((N, channels, H, W), device=y.device, dtype=y.dtype,
                       memory_format=fmt)


def _recompute_u(y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    sd = stats_dtype(y.dtype)
    return _rows(y).to(sd) @ weight.reshape(weight.shape[0], -1).to(sd).t() + bias.to(sd)


# --------------------------------------------------------------------------- forward
def _fwd_torch(y, weight, bias, activation):
    g = act_fwd(_recompute_u(y, weight, bias), activation)
    if g.shape[0] == 0:  # empty batch (eval only): no statistics
        mean, var = (g.new_full((g.shape[1],), float("nan")) for _ in range(2))
    else:
        var, mean = torch.var_mean(g, dim=0, correction=0)
    return _unrows(g.to(y.dtype), y), mean, var


def _fwd_triton(y, weight, bias, activation):
    from .triton_kernels import pw_gemm_act_stats
    g = out_like(y, weight.shape[0])
    mean_p, m2_p, cnt = pw_gemm_act_stats(y, weight.reshape(weight.shape[0], -1), bias, g,
                                          ACTIVATIONS[activation])
    mean, var = merge_stats(mean_p, m2_p, cnt)
    return g, mean, var


# --------------------------------------------------------------------------- backward
def _du_torch(dg, dmean, dvar, y, weight, bias, mean, activation):
    """(du rows [P, Co] in y's dtype, db) from the formula in the module docstring."""
    u = _recompute_u(y, weight, bias)
    inv_m = 1.0 / max(u.shape[0], 1)  # an empty batch has no positions to spread over
    d = _rows(dg).to(u.dtype) + dmean * inv_m + (act_fwd(u, activation) - mean) * (2.0 * inv_m * dvar)
    du = d * act_grad(u, activation)
    return du.to(y.dtype), du.sum(0)


def _du_triton(dg, dmean, dvar, y, weight, bias, mean, activation):
    from .triton_kernels import pw_bwd_du
    du, db_p = pw_bwd_du(dg, dmean, dvar, y, weight.reshape(weight.shape[0], -1), bias, mean,
                         ACTIVATIONS[activation])
    return du, sum_partials(db_p)


_IMPL = {"torch": (_fwd_torch, _du_torch), "triton": (_fwd_triton, _du_triton)}


@torch.library.custom_op("convmixer_ext::pw_act_fwd", mutates_args=())
def pw_act_fwd(y: Tensor, weight: Tensor, bias: Tensor, activation: str,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(g = act(conv1x1(y) + b), per-channel mean, biased var of g)."""
    if y.numel() == 0:
        backend = "torch"
    return _IMPL[backend][0](y, weight, bias, activation)


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
    du, db = _IMPL[backend][1](dg, dmean, dvar, y, weight, bias, mean, activation)
    w2 = weight.reshape(weight.shape[0], -1).to(y.dtype)
    dw = (du.t() @ _rows(y)).reshape(weight.shape)
    N, Ci, H, W = y.shape
    if y.is_contiguous():  # NCHW: one batched GEMM writes the planes directly
        dy = torch.matmul(w2.t(), du.view(N, H * W, du.shape[1]).transpose(1, 2))
        dy = dy.view(N, Ci, H, W)
    else:  # channels_last: rows are the layout itself
        dy = _unrows(du @ w2, y)
    return dy, dw.to(weight.dtype), db.to(bias.dtype)


@pw_act_bwd.register_fake
def _(dg, dmean, dvar, y, weight, bias, mean, activation, backend):
    return torch.empty_like(y), torch.empty_like(weight), torch.empty_like(bias)


def _pw_setup_context(ctx, inputs, output):
    y, weight, bias, activation, backend = inputs
    ctx.save_for_backward(y, weight, bias, output[1])
    ctx.flags = (activation, backend)


def _pw_backward(ctx, dg, dmean, dvar):
    y, weight, bias, mean = ctx.saved_tensors
    zeros = torch.zeros_like(mean)
    dg = out_like(y, weight.shape[0]).zero_() if dg is None else dg
    grads = pw_act_bwd(dg, zeros if dmean is None else dmean, zeros if dvar is None else dvar,
                       y, weight, bias, mean, *ctx.flags)
    return (*grads, None, None)


torch.library.register_autograd("convmixer_ext::pw_act_fwd", _pw_backward,
                                setup_context=_pw_setup_context)
refuse_double_backward(pw_act_bwd)


# --------------------------------------------------------------------------- user functions
def resolve_pw_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto": the Triton GEMM on CUDA tensors (fp16/bf16/fp32) when Triton runs, else torch."""
    if backend not in ("auto",) + PW_BACKENDS:
        raise ValueError(f"pointwise backend must be 'auto' or one of {list(PW_BACKENDS)}, "
                         f"got {backend!r}")
    if backend == "auto":
        ok = (device.type == "cuda" and dtype != torch.float64
              and _reason("triton", "cuda") is None)
        return "triton" if ok else "torch"
    if backend == "triton":
        why = _reason("triton", device.type)
        if why is not None:
            raise BackendUnavailableError(f"pointwise backend 'triton' is not available: {why}")
        if dtype == torch.float64:
            raise TypeError("pointwise backend 'triton' supports float16, bfloat16 and float32; "
                            "use 'torch' for float64")
    return backend


def pointwise_folded(y: Tensor, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d,
                     training: bool, activation: str = "gelu", backend: str = "auto",
                     process_group=None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``(g, (a, c))`` with ``BN2(act(conv1x1(y))) == a*g + c`` per channel (``nn.BatchNorm2d``
    semantics; running buffers updated in training). ``a``, ``c`` are in the statistics
    dtype and carry autograd to gamma, beta and, with batch statistics, through the batch
    mean/var to ``y`` and the conv parameters. Under ``torch.autocast``, y and the conv
    parameters are cast to the autocast dtype as ``nn.Conv2d`` would be.
    ``process_group``: batch statistics over the whole group's batch (``nn.SyncBatchNorm``
    semantics; the gradients through them are summed over the ranks)."""
    check_activation(activation)
    if not isinstance(y, Tensor) or y.dim() != 4:
        raise ValueError(f"y must be a 4-D tensor [N, C, H, W], got {getattr(y, 'shape', y)}")
    w, b = conv.weight, conv.bias
    if tuple(w.shape[1:]) != (y.shape[1], 1, 1) or b is None:
        raise ValueError(f"the pointwise conv must be a 1x1 conv with bias on {y.shape[1]} "
                         f"channels, got weight {tuple(w.shape)}")
    dt = autocast_dtype(y)
    if dt is not None:
        y, w, b = y.to(dt), w.to(dt), b.to(dt)
    if w.dtype != y.dtype:
        raise TypeError(f"pointwise weight must have the dtype of y ({y.dtype}), got {w.dtype}")
    sd = stats_dtype(y.dtype)
    gamma, beta = bn_scale_shift(bn, w.shape[0], y.device, sd)
    name = resolve_pw_backend(backend, y.device, y.dtype)
    batch_stats, group, n = batch_stats_plan(training, bn.running_mean, y, process_group, "y")
    g, mean, var = pw_act_fwd(y, w, b, activation, name)
    if group is not None:
        mean, var, n = sync_stats(mean, var, n, group)
    if training and bn.running_mean is not None:
        update_running_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked,
                             bn.momentum, mean.detach(), var.detach(), n)
    if not batch_stats:
        mean, var = bn.running_mean.to(sd), bn.running_var.to(sd)
    a, c = bn_affine(mean, rstd_from_var(var, bn.eps), gamma.to(sd), beta.to(sd))
    return g, (a, c)


def apply_affine(g: Tensor, pre: tuple[Tensor, Tensor]) -> Tensor:
    """``a*g + c`` per channel (dim 1 of g: [N, C, ...]; computed in the statistics dtype,
    stored in g's dtype)."""
    a, c = pre
    shape = (1, -1) + (1,) * (g.dim() - 2)
    return (g.to(a.dtype) * a.view(shape) + c.view(shape)).to(g.dtype)


def fused_pointwise_block(y: Tensor, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d,
                          training: bool, activation: str = "gelu",
                          backend: str = "auto") -> Tensor:
    """``BN2(act(conv1x1(y)))`` with ``nn.BatchNorm2d`` semantics (running buffers updated in
    training), taking the parameters of the reference modules."""
    g, pre = pointwise_folded(y, conv, bn, training, activation, backend)
    return apply_affine(g, pre)
