"""The "torch" backend: DESIGN.md §2-3 written out in PyTorch, pass by pass.

It computes exactly what the kernels compute, with the same passes, recomputation and
saved tensors (x + per-channel mean/var), in the statistics dtype (fp32, fp64 for
fp64 inputs). It runs on any device and is the twin every kernel is compared with.

``pre`` (optional, every pass): the previous layer's BN2 folded into this block's load
(DESIGN.md §4). The stored input is then the raw activation ``g`` of the previous
pointwise block and the block's input is ``x = a*g + c`` per channel, ``pre = (a, c)``;
the zero padding stays zero (it pads ``x``, not ``g``).
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


def _bcast(v):
    return v.view(1, -1, 1, 1)


def block_input(x, pre=None):
    """The block's input in the statistics dtype: ``x``, or ``a*x + c`` with ``pre=(a, c)``."""
    xc = _c(x, x)
    if pre is None:
        return xc
    return xc * _bcast(pre[0]) + _bcast(pre[1])


def conv_u(x, weight, bias, pre=None):
    """u = dwconv_k(x) + b with PyTorch's "same" padding, in the statistics dtype."""
    pb, pa = _pads(weight.shape[-1])
    xpad = F.pad(block_input(x, pre), (pb, pa, pb, pa))
    return F.conv2d(xpad, _c(weight, x), _c(bias, x), groups=x.shape[1])


def stats(x, weight, bias, activation, pre=None):
    """Pass F1: per-channel mean and biased variance of g = act(u) over (N, H, W)."""
    g = act_fwd(conv_u(x, weight, bias, pre), activation)
    var, mean = torch.var_mean(g, dim=(0, 2, 3), correction=0)
    return mean, var


def apply(x, weight, bias, mean, rstd, gamma, beta, activation, pre=None):
    """Pass F2 (and the whole eval forward): out = x + gamma*(g-mean)*rstd + beta."""
    g = act_fwd(conv_u(x, weight, bias, pre), activation)
    a, c = bn_affine(mean, rstd, gamma, beta)
    return (block_input(x, pre) + g * _bcast(a) + _bcast(c)).to(x.dtype)


def bwd_reduce(dout, x, weight, bias, mean, rstd, activation, pre=None):
    """Pass B1: dbeta = sum(dout), dgamma = sum(dout * xhat) per channel."""
    g = act_fwd(conv_u(x, weight, bias, pre), activation)
    xh = (g - _bcast(mean)) * _bcast(rstd)
    d = _c(dout, x)
    return d.sum(dim=(0, 2, 3)), (d * xh).sum(dim=(0, 2, 3))


def bwd_main(dout, x, weight, bias, mean, rstd, gamma, dbeta, dgamma, batch_stats, activation,
             pre=None):
    """Pass B2: recompute u, g; dg -> du; dx = dout + conv_transpose(du, W); db, dW.

    Returns (dx, dW, db, dpre). With ``pre=(a, c)``: dx is the gradient of the stored
    input (``a * dL/d(block input)``) and dpre = (sum(dL/dinput * x), sum(dL/dinput)) per
    channel, the gradients of a and c; otherwise dpre is None."""
    N, C, H, W = x.shape
    k = weight.shape[-1]
    u = conv_u(x, weight, bias, pre)
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
    xpad = F.pad(block_input(x, pre), (pb, pa, pb, pa))
    if N == 0:  # empty batch: no terms
        dw = du.new_zeros((C, 1, k, k))
    else:
        dw = F.conv2d(xpad.transpose(0, 1).reshape(1, C * N, H + k - 1, W + k - 1),
                      du.transpose(0, 1), groups=C).view(C, 1, k, k)
    db = du.sum(dim=(0, 2, 3))
    if pre is None:
        return dx.to(x.dtype), dw, db, None
    dpre = ((dx * _c(x, x)).sum(dim=(0, 2, 3)), dx.sum(dim=(0, 2, 3)))
    return (dx * _bcast(pre[0])).to(x.dtype), dw, db, dpre
