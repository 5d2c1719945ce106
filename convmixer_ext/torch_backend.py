"""The "torch" backend: DESIGN.md §2-3 written out in PyTorch, pass by pass.

It computes exactly what the kernels compute, with the same passes, recomputation and
saved tensors (x + per-channel mean/var), in the statistics dtype (fp32, fp64 for
fp64 inputs). It runs on any device and is the twin every kernel is compared with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .semantics import act_fwd, act_grad, bn_affine, bn_grad, pad_before, stats_dtype


def _c(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(stats_dtype(like.dtype))


def _pads(k):
    """(before, after) zero padding of PyTorch's "same" for kernel size k."""
    pb = pad_before(k)
    return pb, k - 1 - pb


def conv_u(x, weight, bias):
    """u = dwconv_k(x) + b with PyTorch's "same" padding, in the statistics dtype."""
    pb, pa = _pads(weight.shape[-1])
    xpad = F.pad(_c(x, x), (pb, pa, pb, pa))
    return F.conv2d(xpad, _c(weight, x), _c(bias, x), groups=x.shape[1])


def _bcast(v):
    return v.view(1, -1, 1, 1)


def stats(x, weight, bias, activation):
    """Pass F1: per-channel mean and biased variance of g = act(u) over (N, H, W)."""
    g = act_fwd(conv_u(x, weight, bias), activation)
    var, mean = torch.var_mean(g, dim=(0, 2, 3), correction=0)
    return mean, var


def apply(x, weight, bias, mean, rstd, gamma, beta, activation):
    """Pass F2 (and the whole eval forward): out = x + gamma*(g-mean)*rstd + beta."""
    g = act_fwd(conv_u(x, weight, bias), activation)
    a, c = bn_affine(mean, rstd, gamma, beta)
    return (_c(x, x) + g * _bcast(a) + _bcast(c)).to(x.dtype)


def bwd_reduce(dout, x, weight, bias, mean, rstd, activation):
    """Pass B1: dbeta = sum(dout), dgamma = sum(dout * xhat) per channel."""
    g = act_fwd(conv_u(x, weight, bias), activation)
    xh = (g - _bcast(mean)) * _bcast(rstd)
    d = _c(dout, x)
    return d.sum(dim=(0, 2, 3)), (d * xh).sum(dim=(0, 2, 3))


def bwd_main(dout, x, weight, bias, mean, rstd, gamma, dbeta, dgamma, batch_stats, activation):
    """Pass B2: recompute u, g; dg -> du; dx = dout + conv_transpose(du, W); db, dW."""
    N, C, H, W = x.shape
    k = weight.shape[-1]
    u = conv_u(x, weight, bias)
    d = _c(dout, x)
    xh = (act_fwd(u, activation) - _bcast(mean)) * _bcast(rstd) if batch_stats else None
    dg = bn_grad(d, xh, _bcast(gamma * rstd), _bcast(dbeta), _bcast(dgamma), N * H * W,
                 batch_stats)
    du = dg * act_grad(u, activation)
    pb, pa = _pads(k)
    wc = _c(weight, x)
    # dx[q] = sum_i du[q - i + pb] * w[i]: correlation of du (padded pa before, pb after)
    # with the flipped kernel.
    dx = d + F.conv2d(F.pad(du, (pa, pb, pa, pb)), wc.flip(-1, -2), groups=C)
    # dW[c,i,j] = sum_{n,h,w} du[n,c,h,w] * xpad[n,c,h+i,w+j]: a grouped conv with the
    # batch as the reduction channel.
    xpad = F.pad(_c(x, x), (pb, pa, pb, pa))
    dw = F.conv2d(xpad.transpose(0, 1).reshape(1, C * N, H + k - 1, W + k - 1),
                  du.transpose(0, 1), groups=C).view(C, 1, k, k)
    db = du.sum(dim=(0, 2, 3))
    return dx.to(x.dtype), dw, db
