"""The "torch" backend (the twin): the kernels' passes written out in PyTorch
(docs/DESIGN.md, "Forward", "Backward" and "Pointwise").

It computes exactly what the kernels compute, with the same passes, recomputation and
saved tensors (x + per-channel mean/var, and the convolution output u where F1 saves
it), in the statistics dtype (fp32, fp64 for fp64
inputs). It runs on any device and float dtype and is what every kernel is compared with,
pass by pass (tests/test_passes.py). It is not the fast path: ``"auto"`` picks "eager" on
CPU tensors.

``in_affine=(in_scale, in_shift)`` (optional, every depthwise pass): the block input is
``in_scale*x + in_shift`` per channel (the previous layer's BN2 folded into this block's
load); the zero padding stays zero (it pads the input, not ``x``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._layout import rows, unrows
from .semantics import act_fwd, act_grad, bn_affine, bn_grad, pad_before, stats_dtype


def _c(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(stats_dtype(like.dtype))


def _pads(k):
    """(before, after) zero padding of PyTorch's "same" for kernel size k."""
    pb = pad_before(k)
    return pb, k - 1 - pb


def _bcast(v):
    return v.view(1, -1, 1, 1)


def block_input(x, in_affine=None):
    """The block's input in the statistics dtype: ``x``, or ``in_scale*x + in_shift``."""
    xc = _c(x, x)
    if in_affine is None:
        return xc
    return xc * _bcast(in_affine[0]) + _bcast(in_affine[1])


def conv_u(x, weight, bias, in_affine=None):
    """u = dwconv_k(input) + b with PyTorch's "same" padding, in the statistics dtype."""
    pb, pa = _pads(weight.shape[-1])
    xpad = F.pad(block_input(x, in_affine), (pb, pa, pb, pa))
    return F.conv2d(xpad, _c(weight, x), _c(bias, x), groups=x.shape[1])


def _u(x, weight, bias, in_affine, u):
    """The convolution output: the saved one (``u``, from F1), else recomputed."""
    return conv_u(x, weight, bias, in_affine) if u is None else u


def stats(x, weight, bias, activation, in_affine=None, u=None):
    """Pass F1: per-channel mean and biased variance of g = act(u) over (N, H, W).
    ``u`` (optional, x's shape, the statistics dtype): where F1 also saves u for the later
    passes to read."""
    uc = conv_u(x, weight, bias, in_affine)
    if u is not None:
        u.copy_(uc)
    g = act_fwd(uc, activation)
    var, mean = torch.var_mean(g, dim=(0, 2, 3), correction=0)
    return mean, var


def apply(x, weight, bias, mean, rstd, gamma, beta, activation, in_affine=None, u=None):
    """Pass F2 (and the whole eval forward): out = input + gamma*(g-mean)*rstd + beta."""
    g = act_fwd(_u(x, weight, bias, in_affine, u), activation)
    a, c = bn_affine(mean, rstd, gamma, beta)
    return (block_input(x, in_affine) + g * _bcast(a) + _bcast(c)).to(x.dtype)


def bwd_reduce(dout, x, weight, bias, mean, rstd, activation, in_affine=None, u=None):
    """Pass B1: dbeta = sum(dout), dgamma = sum(dout * xhat) per channel."""
    g = act_fwd(_u(x, weight, bias, in_affine, u), activation)
    xh = (g - _bcast(mean)) * _bcast(rstd)
    d = _c(dout, x)
    return d.sum(dim=(0, 2, 3)), (d * xh).sum(dim=(0, 2, 3))


def bwd_main(dout, x, weight, bias, mean, rstd, gamma, dbeta, dgamma, batch_stats, activation,
             in_affine=None, u=None):
    """Pass B2: u (recomputed, or F1's saved one), g; dg -> du; dx = dout +
    conv_transpose(du, W); db, dW.

    Returns (dx, dW, db, d_in_affine). With the input affine: dx is the gradient of x
    (``in_scale * dL/d(block input)``) and d_in_affine = (sum(dL/dinput * x),
    sum(dL/dinput)) per channel, the gradients of in_scale and in_shift; otherwise None."""
    N, C, H, W = x.shape
    k = weight.shape[-1]
    u = _u(x, weight, bias, in_affine, u)
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
    xpad = F.pad(block_input(x, in_affine), (pb, pa, pb, pa))
    if N == 0:  # empty batch: no terms
        dw = du.new_zeros((C, 1, k, k))
    else:
        dw = F.conv2d(xpad.transpose(0, 1).reshape(1, C * N, H + k - 1, W + k - 1),
                      du.transpose(0, 1), groups=C).view(C, 1, k, k)
    db = du.sum(dim=(0, 2, 3))
    if in_affine is None:
        return dx.to(x.dtype), dw, db, None
    d_aff = ((dx * _c(x, x)).sum(dim=(0, 2, 3)), dx.sum(dim=(0, 2, 3)))
    return (dx * _bcast(in_affine[0])).to(x.dtype), dw, db, d_aff


# --------------------------------------------------------------------------- pointwise
def _recompute_u(y, w2, bias):
    sd = stats_dtype(y.dtype)
    return rows(y).to(sd) @ w2.to(sd).t() + bias.to(sd)


def pw_fwd(y, w2, bias, activation):
    """(g = act(conv1x1(y) + b) in y's dtype and memory format, per-channel mean, biased
    var of g); ``w2`` is the [Co, Ci] weight."""
    g = act_fwd(_recompute_u(y, w2, bias), activation)
    if g.shape[0] == 0:  # empty batch (eval only): no statistics
        mean, var = (g.new_full((g.shape[1],), float("nan")) for _ in range(2))
    else:
        var, mean = torch.var_mean(g, dim=0, correction=0)
    return unrows(g.to(y.dtype), y), mean, var


def pw_du(dg, dmean, dvar, y, w2, bias, mean, activation):
    """(du rows [P, Co] in y's dtype, db): du = (dg + dmean/P + dvar*2(g-mean)/P) * act'(u)
    with u recomputed."""
    u = _recompute_u(y, w2, bias)
    inv_m = 1.0 / max(u.shape[0], 1)  # an empty batch has no positions to spread over
    d = rows(dg).to(u.dtype) + dmean * inv_m \
        + (act_fwd(u, activation) - mean) * (2.0 * inv_m * dvar)
    du = d * act_grad(u, activation)
    return du.to(y.dtype), du.sum(0)
