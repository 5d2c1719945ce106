"""The pointwise block ``z = BN2(act(conv1x1(y) + b2))`` as one op (DESIGN.md §4), first step.

Forward: one GEMM over positions (rows = N*H*W positions, columns = output channels)
whose epilogue adds the bias, applies the activation, stores ``g = act(u)`` and emits
BN2's per-channel partial statistics (mean and centred M2 per row tile), merged like the
depthwise block's (``_partials.merge_stats``); then BN2's normalize + affine.
Backward: explicit (BN2 backward from the saved statistics, ``u`` recomputed by a GEMM,
``dy = du W``, ``dW = du^T y``) in PyTorch ops for every backend.

Backends: ``"triton"`` (the GEMM kernel; CUDA tensors, or CPU under TRITON_INTERPRET=1)
and ``"torch"`` (the twin). Not yet done: folding BN2's affine into the next layer's
depthwise load, and a fused backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._partials import merge_stats
from .backends import BackendUnavailableError, _reason
from .ops import register_block_autograd
from .semantics import (ACTIVATIONS, act_fwd, act_grad, bn_affine, bn_grad, check_activation,
                        rstd_from_var, stats_dtype, update_running_stats, uses_batch_stats)

PW_BACKENDS = ("triton", "torch")


def _rows(y: Tensor) -> Tensor:
    """[N, C, H, W] -> [N*H*W, C] (a view for channels_last, a copy otherwise)."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _unrows(m: Tensor, like: Tensor) -> Tensor:
    N, _, H, W = like.shape
    out = m.reshape(N, H, W, -1).permute(0, 3, 1, 2)
    return out.contiguous(memory_format=torch.channels_last) \
        if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous() \
        else out.contiguous()


# --------------------------------------------------------------------------- forward passes
def _gemm_act_stats_torch(y, weight, bias, activation, need_stats):
    sd = stats_dtype(y.dtype)
    u = _rows(y).to(sd) @ weight.reshape(weight.shape[0], -1).to(sd).t() + bias.to(sd)
    g = act_fwd(u, activation)
    if not need_stats:
        return g, None, None
    var, mean = torch.var_mean(g, dim=0, correction=0)
    return g, mean, var


def _gemm_act_stats_triton(y, weight, bias, activation, need_stats):
    from .triton_kernels import pw_gemm_act_stats
    g, mean_p, m2_p, cnt = pw_gemm_act_stats(y, weight.reshape(weight.shape[0], -1), bias,
                                             ACTIVATIONS[activation])
    if not need_stats:
        return g, None, None
    mean, var = merge_stats(mean_p, m2_p, cnt)
    return g, mean, var


_GEMM = {"torch": _gemm_act_stats_torch, "triton": _gemm_act_stats_triton}


@torch.library.custom_op("convmixer_ext::pw_block_fwd", mutates_args=())
def pw_block_fwd(y: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor,
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 batch_stats: bool, eps: float, activation: str,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    sd = stats_dtype(y.dtype)
    g, mean, var = _GEMM[backend](y, weight, bias, activation, batch_stats)
    if not batch_stats:
        mean, var = running_mean.to(sd, copy=True), running_var.to(sd, copy=True)
    a, c = bn_affine(mean, rstd_from_var(var, eps), gamma.to(sd), beta.to(sd))
    return _unrows((g * a + c).to(y.dtype), y), mean, var


@pw_block_fwd.register_fake
def _(y, weight, bias, gamma, beta, running_mean, running_var, batch_stats, eps, activation,
      backend):
    sd = stats_dtype(y.dtype)
    Co = weight.shape[0]
    N, _, H, W = y.shape
    return (y.new_empty((N, Co, H, W)), y.new_empty((Co,), dtype=sd),
            y.new_empty((Co,), dtype=sd))


@torch.library.custom_op("convmixer_ext::pw_block_bwd", mutates_args=())
def pw_block_bwd(dout: Tensor, y: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor,
                 mean: Tensor, var: Tensor, batch_stats: bool, eps: float,
                 activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    sd = stats_dtype(y.dtype)
    yr = _rows(y).to(sd)
    w2 = weight.reshape(weight.shape[0], -1).to(sd)
    u = yr @ w2.t() + bias.to(sd)                       # recomputed, never stored
    rstd = rstd_from_var(var, eps)
    xh = (act_fwd(u, activation) - mean) * rstd
    d = _rows(dout).to(sd)
    dbeta, dgamma = d.sum(0), (d * xh).sum(0)
    dg = bn_grad(d, xh, gamma.to(sd) * rstd, dbeta, dgamma, d.shape[0], batch_stats)
    du = dg * act_grad(u, activation)
    dy = _unrows((du @ w2).to(y.dtype), y)
    dw = (du.t() @ yr).reshape(weight.shape)
    return (dy, dw.to(weight.dtype), du.sum(0).to(bias.dtype), dgamma.to(gamma.dtype),
            dbeta.to(gamma.dtype))


@pw_block_bwd.register_fake
def _(dout, y, weight, bias, gamma, mean, var, batch_stats, eps, activation):
    return (torch.empty_like(y), torch.empty_like(weight), torch.empty_like(bias),
            torch.empty_like(gamma), torch.empty_like(gamma))


register_block_autograd("convmixer_ext::pw_block_fwd", pw_block_bwd, with_backend=False)


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


def fused_pointwise_block(y: Tensor, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d,
                          training: bool, activation: str = "gelu",
                          backend: str = "auto") -> Tensor:
    """``BN2(act(conv1x1(y)))`` with ``nn.BatchNorm2d`` semantics (running buffers updated in
    training), taking the parameters of the reference modules."""
    check_activation(activation)
    if not isinstance(y, Tensor) or y.dim() != 4:
        raise ValueError(f"y must be a 4-D tensor [N, C, H, W], got {getattr(y, 'shape', y)}")
    w, b = conv.weight, conv.bias
    if tuple(w.shape[1:]) != (y.shape[1], 1, 1) or b is None:
        raise ValueError(f"the pointwise conv must be a 1x1 conv with bias on {y.shape[1]} "
                         f"channels, got weight {tuple(w.shape)}")
    if w.dtype != y.dtype:
        raise TypeError(f"pointwise weight must have the dtype of y ({y.dtype}), got {w.dtype}")
    Co = w.shape[0]
    gamma = bn.weight if bn.affine else torch.ones(Co, device=y.device, dtype=y.dtype)
    beta = bn.bias if bn.affine else torch.zeros_like(gamma)
    name = resolve_pw_backend(backend, y.device, y.dtype)
    batch_stats = uses_batch_stats(training, bn.running_mean)
    N, _, H, W = y.shape
    if batch_stats and N * H * W <= 1:
        raise ValueError(f"expected more than 1 value per channel when using batch "
                         f"statistics, got y of shape {tuple(y.shape)}")
    out, mean, var = pw_block_fwd(y, w, b, gamma, beta, bn.running_mean, bn.running_var,
                                  batch_stats, float(bn.eps), activation, name)
    if training and bn.running_mean is not None:
        update_running_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked,
                             bn.momentum, mean, var, N * H * W)
    return out
