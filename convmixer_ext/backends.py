"""Backend choice: the one place that decides which implementation runs.

- ``"cuda"``: hand-written kernels in ``csrc/`` (CUDA tensors);
- ``"triton"``: Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``);
- ``"cuda_emu"``: the ``csrc/`` kernel source run by the host emulator (CPU tensors, tests);
- ``"torch"``: the PyTorch twin (any device, any float dtype);
- ``"auto"``: the fastest available for the tensor's device and dtype. The environment
  variable ``CONVMIXER_EXT_BACKEND`` overrides what ``"auto"`` picks.

``CONVMIXER_EXT_NO_TRITON=1`` makes the Triton backend unavailable without importing
triton (for environments where importing it is broken or unwanted).
"""
from __future__ import annotations

import functools
import os

import torch

from . import _extension
from .semantics import KERNEL_DTYPES, MAX_KERNEL_SIZE

BACKENDS = ("cuda", "triton", "cuda_emu", "torch")
ENV_VAR = "CONVMIXER_EXT_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (the message says why)."""


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error():
    if os.environ.get("CONVMIXER_EXT_NO_TRITON", "0") == "1":  # never import triton
        return "disabled by CONVMIXER_EXT_NO_TRITON=1"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    return None


def _reason(name: str, device_type: str | None):
    """None if ``name`` can run on ``device_type`` (None: on some device here), else why not."""
    cuda_ok = torch.cuda.is_available()
    if name == "torch":
        return None
    if name == "cuda_emu":
        if not _extension.EMU_OK:
            return _extension.EMU_REASON
        if device_type not in (None, "cpu"):
            return "backend 'cuda_emu' runs the CUDA kernels on CPU tensors only"
        return None
    if name == "cuda":
        if not _extension.CUDA_OK:
            return _extension.CUDA_REASON
        if device_type == "cpu":
            return ("backend 'cuda' needs CUDA tensors (for the host emulation of the same "
                    "kernels on CPU tensors use backend='cuda_emu')")
        if not cuda_ok:
            return "no CUDA device is available to torch"
        return None
    if name == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device_type == "cpu" or (device_type is None and not cuda_ok):
            if not triton_interpreter():
                return ("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                        "triton is imported to run its kernels on CPU tensors in the interpreter")
            return None
        if not cuda_ok:
            return "no CUDA device is available to torch"
        return None
    raise AssertionError(name)


def available_backends() -> dict:
    """Each backend name -> ``True`` if it can run here (on some device), else the reason."""
    return {name: (_reason(name, None) or True) for name in BACKENDS}


def _check_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype,
                    kernel_size: int) -> str:
    """The concrete backend to run for tensors on ``device`` of ``dtype`` with kernel size k."""
    _check_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip() or "auto"
        if env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_VAR} must be 'auto' or one of "
                                 f"{list(BACKENDS)}, got {env!r}")
            backend = env
    if backend == "auto":
        if device.type == "cuda" and dtype in KERNEL_DTYPES and kernel_size <= MAX_KERNEL_SIZE:
            for name in ("cuda", "triton"):
                if _reason(name, "cuda") is None:
                    return name
        return "torch"
    why = _reason(backend, device.type)
    if why is not None:
        raise BackendUnavailableError(f"backend {backend!r} is not available: {why}")
    if backend != "torch":
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend {backend!r} supports x of dtype float16, bfloat16 or "
                            f"float32, got {dtype}; use backend='torch' for {dtype}")
        if kernel_size > MAX_KERNEL_SIZE:
            raise ValueError(f"backend {backend!r} supports kernel_size up to "
                             f"{MAX_KERNEL_SIZE}, got {kernel_size}; use backend='torch'")
    return backend


@functools.lru_cache(maxsize=None)
def get_impl(name: str):
    """The implementation object for a concrete backend name."""
    if name == "torch":
        from . import torch_backend
        return torch_backend
    if name == "triton":
        from . import triton_kernels
        return triton_kernels.BACKEND
    if name in ("cuda", "cuda_emu"):  # one set of ops: CUDA-key and CPU-key implementations
        from ._partials import KernelBackend
        ops = getattr(torch.ops, _extension.NAMESPACE)
        return KernelBackend(ops.k_stats, ops.k_apply, ops.k_bwd_reduce, ops.k_bwd_main)
    raise ValueError(name)
