"""convmixer-ext: fused depthwise-conv + GELU + BatchNorm + residual kernels for ConvMixer.

Importing never fails because the compiled library, Triton or a GPU is missing; see
:func:`available_backends` and ``python -m convmixer_ext``.
"""
from . import reference
from .backends import (BACKENDS, BackendUnavailableError, available_backends, backend_reason,
                       check_backend_name)
from .modules import ConvMixer, ConvMixerLayer, FusedBlocks, convert
from .ops import fused_dwconv_block

__version__ = "0.2.0"

__all__ = ["reference", "ConvMixerLayer", "ConvMixer", "FusedBlocks", "convert",
           "fused_dwconv_block", "available_backends", "backend_reason", "check_backend_name",
           "BACKENDS", "BackendUnavailableError", "__version__"]
