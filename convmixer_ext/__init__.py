"""convmixer-ext: fused depthwise-conv + GELU + BatchNorm + residual kernels for ConvMixer.

Importing never fails because the compiled extension, Triton or a GPU is missing; see
:func:`available_backends`.
"""
from . import reference
from .backends import BACKENDS, BackendUnavailableError, available_backends
from .modules import ConvMixer, ConvMixerLayer, FusedBlocks, convert
from .ops import fused_dwconv_block

__version__ = "0.1.0"

__all__ = ["reference", "ConvMixerLayer", "ConvMixer", "FusedBlocks", "convert", "fused_dwconv_block",
           "available_backends", "BACKENDS", "BackendUnavailableError", "__version__"]
