"""The reference ConvMixer: plain PyTorch modules, exactly as in the paper, with timm's
module structure and ``state_dict`` keys. This is the ground truth for every test.

Keys: ``stem.0`` patch conv, ``stem.2`` BN, ``blocks.i.0.fn.0`` depthwise conv,
``blocks.i.0.fn.2`` BN1, ``blocks.i.1`` pointwise conv, ``blocks.i.3`` BN2, ``head``.
"""
from __future__ import annotations

import torch
from torch import nn

from .semantics import activation_module


class Residual(nn.Module):
    """``fn(x) + x`` (timm's ``Residual``; its child is ``fn`` so keys read ``0.fn.k``)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def conv_mixer_layer(dim: int, kernel_size: int = 9, activation: str = "gelu",
                     eps: float = 1e-5, momentum=0.1) -> nn.Sequential:
    """One reference ConvMixer layer: depthwise block (residual) then pointwise block."""
    return nn.Sequential(
        Residual(nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
            activation_module(activation),
            nn.BatchNorm2d(dim, eps=eps, momentum=momentum),
        )),
        nn.Conv2d(dim, dim, kernel_size=1),
        activation_module(activation),
        nn.BatchNorm2d(dim, eps=eps, momentum=momentum),
    )


class ConvMixer(nn.Module):
    """Reference ConvMixer (stem, ``depth`` layers, global average pooling, linear head)."""

    def __init__(self, dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7,
                 num_classes: int = 1000, in_chans: int = 3, activation: str = "gelu"):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = dim
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
            activation_module(activation),
            nn.BatchNorm2d(dim),
        )
        self.blocks = nn.Sequential(
            *[conv_mixer_layer(dim, kernel_size, activation) for _ in range(depth)])
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1))
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooling(self.forward_features(x)))
