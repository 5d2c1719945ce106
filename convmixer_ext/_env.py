"""Environment switches read at run time (a leaf module: it imports nothing of the package).

- ``CONVMIXER_EXT_BACKEND``: overrides what ``backend="auto"`` picks (backends.py);
- ``CONVMIXER_EXT_NO_TRITON=1``: the Triton backend is unavailable, triton is never imported;
- ``TRITON_INTERPRET=1`` (Triton's own switch, read before triton is imported): Triton
  kernels run on CPU tensors in Triton's interpreter;
- ``CONVMIXER_EXT_EMU_LIB``: load this file as the host-emulation library instead of the
  built one (the sanitizer tier uses it);
- ``CONVMIXER_EXT_CUDA_PREFETCH``: ``0`` / ``1``: the CUDA library's kernels issue no / every
  L2 prefetch of what they stage, in both layouts; unset: as measured fastest (NCHW only:
  ``cuda_kernels.default_prefetch``; docs/DESIGN.md, "L2 prefetch");
- ``CONVMIXER_EXT_CUDA_TC``: ``1`` or unset: the CUDA library's F2 / eval pass convolves
  float16 / bfloat16 NCHW on tensor cores where its kernel takes the shape (measured faster
  than its CUDA-core kernel at every k it takes; docs/DESIGN.md, "CUDA tensor cores");
  ``all``: its F1 saving the convolution output and its B2 reading it too (training from
  k = 7; not yet timed on a GPU, so asked for only); ``all-fused``: the same with B2
  computing du on every tile's halo; ``0``: every pass on CUDA cores;
- ``CONVMIXER_EXT_CUDA_TC_IMAGES``: an integer >= 1, the images whose tile one block of the
  CUDA library's tensor-core F2 takes one after another, loading the next one's halo while
  it convolves one (docs/DESIGN.md, "CUDA tensor cores"); unset: 1 (not yet timed on a GPU).
"""
from __future__ import annotations

import os

BACKEND_VAR = "CONVMIXER_EXT_BACKEND"
EMU_LIB_VAR = "CONVMIXER_EXT_EMU_LIB"
PREFETCH_VAR = "CONVMIXER_EXT_CUDA_PREFETCH"
CUDA_TC_VAR = "CONVMIXER_EXT_CUDA_TC"
CUDA_TC_IMAGES_VAR = "CONVMIXER_EXT_CUDA_TC_IMAGES"


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_disabled() -> bool:
    return os.environ.get("CONVMIXER_EXT_NO_TRITON", "0") == "1"


def backend_override() -> str:
    return os.environ.get(BACKEND_VAR, "auto").strip() or "auto"


def _switch(var):
    """An on/off variable: "1" True, "0" False, unset or empty None; anything else is
    refused, naming the variable."""
    v = os.environ.get(var, "").strip()
    if v not in ("", "0", "1"):
        raise ValueError(f"environment variable {var} must be 0 or 1, got {v!r}")
    return None if v == "" else v == "1"


def cuda_prefetch():
    """CONVMIXER_EXT_CUDA_PREFETCH: "1" (True: on), "0" (False: off), unset or empty (None:
    the library's default for the layout)."""
    return _switch(PREFETCH_VAR)


# CONVMIXER_EXT_CUDA_TC's values: the C ABI's cmx_shape.tensor_cores levels (_cmx_lib.TC_*)
CUDA_TC_LEVELS = {"0": 0, "1": 1, "": 1, "all": 2, "all-fused": 3}


def cuda_tensor_cores() -> int:
    """CONVMIXER_EXT_CUDA_TC: "0" (0: none), "1", unset or empty (1: F2), "all" (2: F2, F1
    and B2; where an image has several tiles, B2's du computed once by a pass of its own),
    "all-fused" (3: the same, B2 computing du on every tile's halo always)."""
    v = os.environ.get(CUDA_TC_VAR, "").strip()
    if v not in CUDA_TC_LEVELS:
        raise ValueError(f"environment variable {CUDA_TC_VAR} must be 0, 1, all or all-fused, "
                         f"got {v!r}")
    return CUDA_TC_LEVELS[v]


def emu_lib_override():
    return os.environ.get(EMU_LIB_VAR) or None


def cuda_tc_images() -> int:
    """CONVMIXER_EXT_CUDA_TC_IMAGES: an integer >= 1; unset or empty: 1."""
    v = os.environ.get(CUDA_TC_IMAGES_VAR, "").strip()
    if not v:
        return 1
    if not v.isdigit() or int(v) < 1 or int(v) >= 2**31:
        raise ValueError(f"environment variable {CUDA_TC_IMAGES_VAR} must be an integer >= 1, "
                         f"got {v!r}")
    return int(v)
