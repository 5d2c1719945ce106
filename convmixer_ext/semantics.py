"""The one place for the facts every backend shares.

- activations: names, the integer ids the kernels take (the C library's ids are checked
  against these when it is loaded), the reference modules, PyTorch's own functions, the
  formula and its derivative (used by the torch twin);
- the "same" padding rule for odd and even kernel sizes;
- exact ``nn.BatchNorm2d`` semantics for batch statistics and running buffers;
- the accumulation dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# --------------------------------------------------------------------------- activations
#: activation name -> integer id used by every kernel (Triton constexpr, CUDA switch).
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
GELU_TANH_COEF = 0.044715


def check_activation(activation: str) -> int:
    """Return the kernel id of ``activation`` or raise a ValueError naming the choices."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def activation_module(activation: str) -> nn.Module:
    """The reference (timm-style) module for an activation name."""
    check_activation(activation)
    if activation == "gelu":
        return nn.GELU()
    if activation == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return nn.ReLU()


def native_activation(u: torch.Tensor, activation: str) -> torch.Tensor:
    """PyTorch's own activation function (what the reference modules compute)."""
    if activation == "gelu":
        return torch.nn.functional.gelu(u)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(u, approximate="tanh")
    return torch.relu(u)


def activation_name(module: nn.Module) -> str:
    """Inverse of :func:`activation_module`; raises for activations the kernels do not fuse."""
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}[module.approximate]
    if type(module) is nn.ReLU:
        return "relu"
    raise ValueError(
        f"cannot fuse activation module {type(module).__name__}; supported: nn.GELU "
        "(approximate='none' or 'tanh') and nn.ReLU")


def act_fwd(u: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return 0.5 * u * (1.0 + torch.erf(u * _INV_SQRT_2))
    if activation == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (u + GELU_TANH_COEF * u * u * u))
        return 0.5 * u * (1.0 + t)
    return torch.clamp_min(u, 0.0)


def act_grad(u: torch.Tensor, activation: str) -> torch.Tensor:
    """d act / du, matching PyTorch's backward (ReLU: 0 at u == 0)."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(u * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * u * u) * _INV_SQRT_2PI
        return cdf + u * pdf
    if activation == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (u + GELU_TANH_COEF * u * u * u))
        dt = _SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEF * u * u)
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * dt
    return (u > 0).to(u.dtype)


# --------------------------------------------------------------------------- padding
MAX_KERNEL_SIZE = 31  # largest k the Triton and CUDA kernels are built and tested for


def pad_before(kernel_size: int) -> int:
    """PyTorch ``padding="same"``: (k-1)//2 before, k//2 after (even k: extra on the right/bottom)."""
    return (kernel_size - 1) // 2


# --------------------------------------------------------------------------- dtypes
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)  # backend "triton_tc": 16-bit operands


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and reductions: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- BatchNorm
def rstd_from_var(var: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(var + eps)


def bn_affine(mean, rstd, gamma, beta):
    """BN as a per-channel affine: ``BN(g) = a*g + c`` (the kernels use the same form)."""
    a = gamma * rstd
    return a, beta - a * mean


def bn_grad(d, xhat, scale, dbeta, dgamma, n: int, batch_stats: bool):
    """dL/dg of ``gamma*xhat + beta`` given dL/dout ``d`` (``scale = gamma*rstd``,
    ``dbeta = sum(d)``, ``dgamma = sum(d*xhat)`` per channel): batch statistics add the
    paths through the mean and the variance (docs/DESIGN.md, "Backward")."""
    if not batch_stats:
        return scale * d
    return scale * (d - dbeta / n - xhat * (dgamma / n))


def bn_scale_shift(bn, channels: int, device, dtype):
    """A BatchNorm module's (weight, bias), or identity ones/zeros of ``dtype`` when it has
    no affine parameters (``affine=False``)."""
    if bn.affine:
        return bn.weight, bn.bias
    return (torch.ones(channels, device=device, dtype=dtype),
            torch.zeros(channels, device=device, dtype=dtype))


def uses_batch_stats(training: bool, running_mean) -> bool:
    """nn.BatchNorm2d: batch statistics in training, or always without running buffers."""
    return training or running_mean is None


@torch.no_grad()
def update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                         batch_mean, batch_var, n: int) -> None:
    """Exactly nn.BatchNorm2d's update: unbiased variance, ``momentum=None`` = cumulative average."""
    if running_mean is None:
        return
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        factor = 1.0 / num_batches_tracked.to(torch.float64)
        factor = factor.to(running_mean.dtype)
    else:
        factor = momentum
    unbiased = batch_var * (n / (n - 1))
    running_mean.mul_(1 - factor).add_(batch_mean.to(running_mean.dtype) * factor)
    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype) * factor)
