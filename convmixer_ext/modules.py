"""Drop-in modules: :class:`ConvMixerLayer`, :class:`ConvMixer` and :func:`convert`.

A :class:`ConvMixerLayer` has exactly the children of a reference (or timm) layer —
``0.fn.0`` depthwise conv, ``0.fn.1`` activation, ``0.fn.2`` BN1, ``1`` pointwise conv,
``2`` activation, ``3`` BN2 — so parameters, buffers and ``state_dict`` keys are the
same; only ``forward`` differs: the depthwise block runs as one fused op.

With a fused pointwise half (``pointwise != "unfused"``), consecutive layers hand BN2 to
each other as a per-channel affine: layer i returns the raw activation ``g`` and
``(a, c)``, and layer i+1's depthwise kernels apply ``a*g + c`` as they load (its input
affine; docs/DESIGN.md, "Folded BN2"), so BN2 never makes its own pass over memory.
:class:`FusedBlocks` (the ``blocks`` of :class:`ConvMixer` and of converted models) runs
that chain and applies the last layer's affine once at the end (:class:`ConvMixer` applies
it after the average pooling, to [N, C] instead); a lone :class:`ConvMixerLayer` applies
its own.
"""
from __future__ import annotations

import torch
from torch import nn

from .backends import BACKENDS, OPS, check_backend_name, check_save_conv
from .ops import fused_dwconv_block
from .pointwise import apply_affine, pointwise_folded, resolve_pointwise
from .reference import ConvMixer as _ReferenceConvMixer, conv_mixer_layer
from .semantics import activation_name, bn_scale_shift, check_activation, stats_dtype


def _check_fusable(dw: nn.Module, bn: nn.Module) -> None:
    if not isinstance(dw, nn.Conv2d) or dw.groups != dw.in_channels or \
            dw.out_channels != dw.in_channels or dw.kernel_size[0] != dw.kernel_size[1]:
        raise ValueError(f"expected a square depthwise nn.Conv2d(dim, dim, k, groups=dim), "
                         f"got {dw}")
    k = dw.kernel_size[0]
    same = dw.padding == "same" or (k % 2 == 1 and tuple(dw.padding) == (k // 2, k // 2))
    if not same or tuple(dw.stride) != (1, 1) or tuple(dw.dilation) != (1, 1) \
            or dw.padding_mode != "zeros" or dw.bias is None:
        raise ValueError(f"the fused block needs stride 1, dilation 1, zero 'same' padding "
                         f"and a bias; got {dw}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise ValueError(f"expected nn.BatchNorm2d after the activation, got {type(bn).__name__}")


PW_CHOICES = ("unfused", "auto") + tuple(b for b in BACKENDS if "pointwise" in OPS[b])


def _check_pointwise(pointwise: str) -> None:
    if pointwise not in PW_CHOICES:
        raise ValueError(f"pointwise must be one of {list(PW_CHOICES)}, got {pointwise!r}")


class ConvMixerLayer(nn.Sequential):
    """One ConvMixer layer with the depthwise block (dwconv + act + BN + residual) fused.

    Args:
        dim: channels. kernel_size: depthwise kernel size (any k >= 1; padding "same",
        even k padded like PyTorch). activation: "gelu", "gelu_tanh" or "relu".
        eps, momentum: BatchNorm settings for both BNs. backend: see
        :mod:`convmixer_ext.backends` ("auto" by default).
        pointwise: the 1x1 conv + act + BN2 half: "unfused" (PyTorch modules, the
        default), or the fused pointwise op with BN2 folded into the next layer ("auto",
        "triton", "torch"; "eager" and an "auto" that resolves to it run the modules
        unfused; see :mod:`convmixer_ext.pointwise`).

        save_conv: passed to :func:`fused_dwconv_block` (also the attribute of that name) —
        None (the default) saves the convolution output in training for the later passes
        where that is predicted faster, False recomputes it (less memory), True always
        saves it.
    """

    def __init__(self, dim: int, kernel_size: int = 9, activation: str = "gelu",
                 eps: float = 1e-5, momentum=0.1, backend: str = "auto",
                 pointwise: str = "unfused", save_conv=None):
        check_activation(activation)
        check_backend_name(backend)
        _check_pointwise(pointwise)
        check_save_conv(save_conv)
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        super().__init__(*conv_mixer_layer(dim, kernel_size, activation, eps, momentum))
        self.activation = activation
        self.backend = backend
        self.pointwise = pointwise
        self.process_group = None  # set by convert(..., sync_bn=True)
        self.save_conv = save_conv

    @classmethod
    def from_reference(cls, layer: nn.Sequential, backend: str = "auto",
                       pointwise: str = "unfused") -> "ConvMixerLayer":
        """Wrap an existing reference/timm layer, sharing its modules (weights are not copied)."""
        check_backend_name(backend)
        _check_pointwise(pointwise)
        dw, act, bn = layer[0].fn[0], layer[0].fn[1], layer[0].fn[2]
        _check_fusable(dw, bn)
        self = cls.__new__(cls)
        nn.Sequential.__init__(self, *layer)
        self.activation = activation_name(act)
        self.backend = backend
        self.pointwise = pointwise
        self.process_group = None
        self.save_conv = None
        return self

    def extra_repr(self) -> str:
        save = getattr(self, "save_conv", None)
        return (f"activation={self.activation!r}, backend={self.backend!r}, "
                f"pointwise={self.pointwise!r}" + ("" if save is None else f", save_conv={save}"))

    def forward_dw(self, x: torch.Tensor, in_affine=None) -> torch.Tensor:
        """The fused depthwise block: ``x + BN1(act(dwconv(x)))``, with the block input
        ``a*x + c`` when ``in_affine=(a, c)`` is given."""
        dw, bn = self[0].fn[0], self[0].fn[2]
        gamma, beta = bn_scale_shift(bn, x.shape[1], x.device, stats_dtype(x.dtype))
        return fused_dwconv_block(
            x, dw.weight, dw.bias, gamma, beta, bn.running_mean, bn.running_var,
            bn.num_batches_tracked, training=self.training, momentum=bn.momentum, eps=bn.eps,
            activation=self.activation, backend=self.backend, process_group=self.process_group,
            in_affine=in_affine, save_conv=getattr(self, "save_conv", None))  # (older pickles)

    def folds_bn2(self, y: torch.Tensor = None) -> bool:
        """Whether this layer leaves its BN2 as an affine for the next one: a fused pointwise
        half over an ``nn.BatchNorm2d`` or ``nn.SyncBatchNorm`` (any other BN2 module runs
        unfused, as itself), whose backend for ``y`` (when given) is not "eager"."""
        if self.pointwise == "unfused" or type(self[3]) not in (nn.BatchNorm2d,
                                                                nn.SyncBatchNorm):
            return False
        return y is None or resolve_pointwise(self.pointwise, y,
                                              sync=self._bn2_group() is not None) != "eager"

    def _bn2_group(self):
        """The group an nn.SyncBatchNorm BN2 synchronises over (None: local statistics),
        decided as nn.SyncBatchNorm decides it."""
        bn = self[3]
        if type(bn) is not nn.SyncBatchNorm:
            return None
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return bn.process_group if bn.process_group is not None else dist.group.WORLD

    def forward_folded(self, x: torch.Tensor, in_affine=None):
        """``(g, (a, c))`` where this layer's output is ``a*g + c`` per channel, or
        ``(out, None)`` when the layer does not fold its BN2 (see :meth:`folds_bn2`).
        ``in_affine``: the previous layer's affine, applied to ``x`` as the kernels load it."""
        y = self.forward_dw(x, in_affine)
        if not self.folds_bn2(y):
            return self[3](self[2](self[1](y))), None
        return pointwise_folded(y, self[1], self[3], self.training, activation_name(self[2]),
                                self.pointwise, self._bn2_group())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, affine = self.forward_folded(x)
        return h if affine is None else apply_affine(h, affine)


class FusedBlocks(nn.Sequential):
    """The layer stack of a ConvMixer (same children and ``state_dict`` keys as the
    ``nn.Sequential`` it replaces) running the BN2-folding chain between
    :class:`ConvMixerLayer` s; any other module gets materialised input."""

    def forward_folded(self, x: torch.Tensor):
        """``(h, affine)``: the stack's output is ``h``, or ``a*h + c`` with
        ``affine=(a, c)``."""
        affine = None
        for layer in self:
            if isinstance(layer, ConvMixerLayer):
                x, affine = layer.forward_folded(x, affine)
            else:
                x, affine = layer(x if affine is None else apply_affine(x, affine)), None
        return x, affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, affine = self.forward_folded(x)
        return h if affine is None else apply_affine(h, affine)


class ConvMixer(_ReferenceConvMixer):
    """The whole ConvMixer with fused layers; ``state_dict``-compatible with the reference
    model and with timm's ``ConvMixer``."""

    def __init__(self, dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7,
                 num_classes: int = 1000, in_chans: int = 3, activation: str = "gelu",
                 backend: str = "auto", pointwise: str = "unfused", save_conv=None):
        super().__init__(dim, depth, kernel_size, patch_size, num_classes, in_chans, activation)
        convert(self, backend=backend, pointwise=pointwise, save_conv=save_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the last layer's folded BN2 commutes with the average pooling (both per channel
        # and linear): pool g, then apply the affine to the [N, C] vector, so it never
        # touches a full activation
        h, affine = self.blocks.forward_folded(self.stem(x))
        if affine is not None and not self._pooling_is_global_average():
            h, affine = apply_affine(h, affine), None
        pooled = self.pooling(h)
        return self.head(pooled if affine is None else apply_affine(pooled, affine))

    def _pooling_is_global_average(self) -> bool:
        p = self.pooling
        return (isinstance(p, nn.Sequential) and len(p) == 2
                and type(p[0]) is nn.AdaptiveAvgPool2d and p[0].output_size in ((1, 1), 1)
                and type(p[1]) is nn.Flatten)


def convert(model: nn.Module, backend: str = "auto", sync_bn: bool = False,
            process_group=None, pointwise: str = "unfused", save_conv=None) -> nn.Module:
    """Swap fused layers into a reference or timm ConvMixer in place, keeping its weights and
    buffers (the modules themselves are reused). Returns ``model``.

    ``pointwise``: see :class:`ConvMixerLayer`; fused, consecutive layers fold BN2 into the
    next layer's depthwise load (``model.blocks`` becomes a :class:`FusedBlocks`, same
    ``state_dict`` keys).
    ``sync_bn=True`` (distributed training): the fused blocks compute batch statistics over
    ``process_group`` (default: the whole world), and every other ``nn.BatchNorm2d`` of the
    model becomes an ``nn.SyncBatchNorm`` over the same group (which PyTorch runs on GPUs);
    a fused pointwise half synchronises BN2's statistics over that group itself (any
    device), still folding BN2 into the next layer.
    ``save_conv``: every fused layer's (:class:`ConvMixerLayer`).
    """
    check_backend_name(backend)
    _check_pointwise(pointwise)
    check_save_conv(save_conv)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise TypeError(f"convert() expects a ConvMixer with a 'blocks' nn.Sequential, got "
                        f"{type(model).__name__}")
    for i, layer in enumerate(blocks):
        if not isinstance(layer, ConvMixerLayer):
            blocks[i] = layer = ConvMixerLayer.from_reference(layer, backend, pointwise)
        layer.backend, layer.pointwise, layer.save_conv = backend, pointwise, save_conv
    if not isinstance(blocks, FusedBlocks):
        model.blocks = blocks = FusedBlocks(*blocks)
    if sync_bn:
        import torch.distributed as dist
        group = process_group if process_group is not None else dist.group.WORLD
        for layer in blocks:
            layer.process_group = group
            layer[3] = nn.SyncBatchNorm.convert_sync_batchnorm(layer[3], group)  # BN2
        for name, child in list(model.named_children()):
            if name != "blocks":
                setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child, group))
    return model


__all__ = ["ConvMixerLayer", "ConvMixer", "FusedBlocks", "convert"]
