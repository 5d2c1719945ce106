"""The "eager" backend: the blocks computed by PyTorch's own ops with autograd, exactly as
the reference modules compute them (docs/DESIGN.md, "Backends").

``"auto"`` picks it wherever no kernel backend runs (CPU tensors, float64, k > 31, a GPU
without usable kernels), so using the package is never slower than not using it. BatchNorm
is ``F.batch_norm`` called the way ``nn.BatchNorm2d`` calls it, so running statistics,
``momentum=None`` and ``num_batches_tracked`` behave identically; under ``torch.autocast``
the ops cast their inputs exactly as the reference's do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .semantics import native_activation, stats_dtype


def block_input(x, in_affine):
    """``x``, or ``in_scale*x + in_shift`` per channel (computed in the statistics dtype,
    stored in x's dtype)."""
    if in_affine is None:
        return x
    s = (1, -1, 1, 1)
    return (x.to(stats_dtype(x.dtype)) * in_affine[0].view(s) + in_affine[1].view(s)).to(x.dtype)


def batch_norm(g, gamma, beta, running_mean, running_var, num_batches_tracked, training,
               momentum, eps):
    """``F.batch_norm`` with nn.BatchNorm2d's handling of running statistics (its forward,
    written out for tensors instead of a module)."""
    factor = 0.0 if momentum is None else momentum
    if training and running_mean is not None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                factor = 1.0 / float(num_batches_tracked)
    bn_training = training or running_mean is None
    # PyTorch's CUDA batch norm updates a non-contiguous running buffer in a copy and drops
    # it (measured on an H200: the view's storage kept its old values); a buffer it updates
    # is given dense (`contiguous` is the buffer itself when it is dense already) and a copy
    # is written back through its view
    rm, rv = running_mean, running_var
    if training and running_mean is not None:
        rm, rv = running_mean.contiguous(), running_var.contiguous()
    out = F.batch_norm(g, rm, rv, gamma, beta, bn_training, factor, eps)
    for view, dense in ((running_mean, rm), (running_var, rv)):
        if dense is not view:  # (the batch norm's backward keeps a dense one: left as is)
            view.copy_(dense)
    return out


def dw_block(x, weight, bias, gamma, beta, running_mean, running_var, num_batches_tracked,
             training, momentum, eps, activation, in_affine=None):
    """``input + BN1(act(dwconv_k(input) + bias))`` with ``input = x`` or the input affine."""
    xin = block_input(x, in_affine)
    u = F.conv2d(xin, weight, bias, padding="same", groups=x.shape[1])
    g = native_activation(u, activation)
    return batch_norm(g, gamma, beta, running_mean, running_var, num_batches_tracked,
                      training, momentum, eps) + xin
