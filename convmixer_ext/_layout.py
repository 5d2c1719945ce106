"""Memory-layout helpers shared by the ops and backends (a leaf module): which layouts the
kernels read natively, and the row views of the pointwise GEMM.

The kernels index x through its strides; they are built and tested for NCHW-contiguous and
channels_last. Anything else (slices, expanded/broadcast views, permutations) is made dense
once, at the op boundary (ops.py / pointwise.py), by :func:`dense`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def is_channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def dense(x: Tensor) -> Tensor:
    """``x`` itself when NCHW-contiguous or channels_last, else one contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def dense_vec(t):
    """A 1-D tensor with stride 1 (the kernels index vectors as ``v[c]``); None stays None."""
    return None if t is None else t.contiguous()


def same_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with exactly ``like``'s strides (kernels index both with one set of strides)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def rows(y: Tensor) -> Tensor:
    """[N, C, H, W] -> [N*H*W, C] (a view for channels_last, a copy otherwise)."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def unrows(m: Tensor, like: Tensor) -> Tensor:
    """[N*H*W, C'] -> [N, C', H, W] in ``like``'s memory format."""
    N, _, H, W = like.shape
    out = m.reshape(N, H, W, m.shape[1]).permute(0, 3, 1, 2)
    return out.contiguous(memory_format=torch.channels_last) if is_channels_last(like) \
        else out.contiguous()


def out_like(y: Tensor, channels: int) -> Tensor:
    """An empty [N, channels, H, W] tensor of y's dtype in y's memory format."""
    N, _, H, W = y.shape
    fmt = torch.channels_last if is_channels_last(y) else torch.contiguous_format
    return torch.empty((N, channels, H, W), device=y.device, dtype=y.dtype, memory_format=fmt)


def check_saved_u(u: Tensor, x: Tensor) -> None:
    """ValueError unless ``u`` can hold x's convolution output as the kernels index it (every
    backend that saves it: float32, on x's device, with x's shape and strides)."""
    if u.dtype != torch.float32 or u.device != x.device or u.shape != x.shape \
            or u.stride() != x.stride():
        raise ValueError(f"the saved convolution output must be float32 on {x.device} with "
                         f"x's shape {tuple(x.shape)} and strides {x.stride()}, got "
                         f"{u.dtype} on {u.device}, {tuple(u.shape)}, {u.stride()}")
