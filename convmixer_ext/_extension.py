"""Loading the compiled extensions (``_C``: CUDA kernels; ``_C_emu``: the same kernel source
built for the host emulator). A missing or mismatched extension never breaks import: it
only makes its backend unavailable, with the reason recorded.

The kernel-level op schemas are defined here, once, before any library is loaded; the
C++ side only registers implementations (``TORCH_LIBRARY_IMPL``): CUDA for ``_C``,
CPU for ``_C_emu``.
"""
from __future__ import annotations

import importlib.util
import os

import torch

NAMESPACE = "convmixer_ext"

# pre_a, pre_c: the previous layer's BN2 folded into the block input (a*x + c per channel)
KERNEL_SCHEMAS = {
    "k_stats": ("k_stats(Tensor x, Tensor weight, Tensor bias, Tensor? pre_a, Tensor? pre_c, "
                "int act) -> (Tensor, Tensor, Tensor)"),
    "k_apply": ("k_apply(Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, "
                "Tensor gamma, Tensor beta, Tensor? pre_a, Tensor? pre_c, int act) -> Tensor"),
    "k_bwd_reduce": ("k_bwd_reduce(Tensor dout, Tensor x, Tensor weight, Tensor bias, "
                     "Tensor mean, Tensor rstd, Tensor? pre_a, Tensor? pre_c, int act) "
                     "-> (Tensor, Tensor)"),
    "k_bwd_main": ("k_bwd_main(Tensor dout, Tensor x, Tensor weight, Tensor bias, Tensor mean, "
                   "Tensor rstd, Tensor gamma, Tensor dbeta, Tensor dgamma, bool batch_stats, "
                   "Tensor? pre_a, Tensor? pre_c, int act) "
                   "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"),
    # test hook, implemented by the emulation build only: element offset through the
    # kernels' 64-bit index helpers
    "k_index_probe": "k_index_probe(int[] strides, int n, int c, int h, int w) -> int",
}

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
for _schema in KERNEL_SCHEMAS.values():
    _lib.define(_schema)

try:  # written by setup.py
    from . import _build_info as _info  # type: ignore
except ImportError:  # pragma: no cover - source checkout without a build
    _info = None


def _load(module: str, override_env: str | None = None):
    """Return (True, None) or (False, reason) for ``convmixer_ext.<module>``.

    ``override_env`` names an environment variable that may point to another build of the
    same library (tests load the AddressSanitizer build of ``_C_emu`` this way)."""
    override = os.environ.get(override_env) if override_env else None
    if override:
        torch.ops.load_library(override)
        return True, None
    spec = importlib.util.find_spec(f"convmixer_ext.{module}")
    if spec is None or spec.origin is None:
        why = "was not built"
        if _info is not None and module in getattr(_info, "SKIPPED", {}):
            why += f" ({_info.SKIPPED[module]})"
        return False, f"extension convmixer_ext.{module} {why}; see README 'Install'"
    built_for = getattr(_info, "TORCH_VERSION", None)
    if built_for is not None and built_for != torch.__version__:
        return False, (f"extension convmixer_ext.{module} was built for torch {built_for} but "
                       f"torch {torch.__version__} is running; reinstall convmixer-ext "
                       "(pip install --no-build-isolation .) to rebuild it")
    try:
        torch.ops.load_library(spec.origin)
    except OSError as e:  # undefined symbols from another torch build, etc.
        return False, f"extension convmixer_ext.{module} failed to load: {e}"
    return True, None


CUDA_OK, CUDA_REASON = _load("_C")
EMU_OK, EMU_REASON = _load("_C_emu", "CONVMIXER_EXT_EMU_LIB")
