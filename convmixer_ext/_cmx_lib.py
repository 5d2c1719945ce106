"""Loader of the compiled kernel library (``csrc/``, C ABI in ``csrc/cmx_abi.h``).

Torch-free on purpose: it uses ctypes only, so the library never depends on the torch it
runs with (one build works with every supported torch version). The structs below mirror
``cmx_abi.h`` field by field; :data:`ABI_VERSION` must equal the library's
``cmx_abi_version()``, otherwise the library is refused.

Two builds of the same source share this loader:

- ``_cmx_cuda.so``: nvcc, real launches on CUDA memory (pointers from CUDA tensors);
- ``_cmx_emu.so``: the host emulator, the same kernels on host memory (CPU tensors).
"""
from __future__ import annotations

import ctypes
import os

ABI_VERSION = 9

# error codes of cmx_abi.h
OK, E_INVALID, E_LIMIT, E_CUDA, E_NO_DEVICE = 0, 1, 2, 3, 4

# element type ids of cmx_abi.h, by dtype name
DTYPE_IDS = {"float32": 0, "float16": 1, "bfloat16": 2}

# cmx_shape.tensor_cores of cmx_abi.h: the passes that may run on tensor cores (none; F2;
# F2, and F1 and B2 where training saves u, B2's du by a pass of its own where an image has
# several tiles; the same with B2 computing du on every tile's halo always)
TC_NONE, TC_F2, TC_ALL, TC_ALL_FUSED = 0, 1, 2, 3

LIBRARY_FILES = {"cuda": "_cmx_cuda.so", "emulation": "_cmx_emu.so"}

_i32, _i64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p


class Shape(ctypes.Structure):
    _fields_ = [("n", _i64), ("c", _i64), ("h", _i64), ("w", _i64), ("stride", _i64 * 4),
                ("dtype", _i32), ("k", _i32), ("act", _i32), ("has_in_affine", _i32),
                ("aligned", _i32), ("target_blocks", _i32), ("saved_u", _i32),
                ("prefetch", _i32), ("tensor_cores", _i32), ("images_per_block", _i32)]


PASSES = ("F1", "F2", "B1", "B2")  # index of the per-pass arrays of Plan


class Plan(ctypes.Structure):
    """Per pass (index: PASSES): partial rows of its reduction, blocks, threads, channels
    per block, bytes of dynamic shared memory; bit masks over the passes: ``direct`` (no
    staged tiles) and ``mma`` (the convolution on tensor cores); ``du``: B2 needs
    ``Outputs.du`` (float32, x's shape and strides) for its du pass."""
    _fields_ = [("tile_h", _i32), ("tile_w", _i32), ("vec", _i32), ("direct", _i32),
                ("mma", _i32), ("du", _i32), ("partial_rows", _i64 * 4), ("blocks", _i64 * 4),
                ("threads", _i32 * 4),
                ("channels_per_block", _i32 * 4), ("smem", _i32 * 4)]


class Inputs(ctypes.Structure):
    _fields_ = [("x", _ptr), ("weight", _ptr), ("bias", _ptr), ("in_scale", _ptr),
                ("in_shift", _ptr), ("mean", _ptr), ("rstd", _ptr), ("gamma", _ptr),
                ("beta", _ptr), ("dout", _ptr), ("dbeta", _ptr), ("dgamma", _ptr), ("u", _ptr),
                ("batch_stats", _i32), ("stream", _ptr)]


class Outputs(ctypes.Structure):
    _fields_ = [("y", _ptr), ("mean_p", _ptr), ("m2_p", _ptr), ("count_p", _ptr),
                ("dbeta_p", _ptr), ("dgamma_p", _ptr), ("dw_p", _ptr), ("db_p", _ptr),
                ("dscale_p", _ptr), ("dshift_p", _ptr), ("u", _ptr), ("du", _ptr)]


class LibraryError(RuntimeError):
    """The library could not be loaded or used; ``code`` is one of the E_* codes (0 when the
    library itself is unusable: missing, wrong ABI, disagreeing ids)."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


_PASSES = ("cmx_stats", "cmx_apply", "cmx_bwd_reduce", "cmx_bwd_main")


class Library:
    """One loaded build of the kernel library."""

    def __init__(self, path: str, activations: dict):
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:  # missing file, unresolved symbols, wrong architecture
            raise LibraryError(f"cannot load {path}: {e}") from None
        self.path = path
        self._lib = lib
        try:
            for name, res, args in (
                    ("cmx_abi_version", _i32, []), ("cmx_last_error", ctypes.c_char_p, []),
                    ("cmx_build_info", ctypes.c_char_p, []), ("cmx_max_kernel_size", _i32, []),
                    ("cmx_activation_name", ctypes.c_char_p, [_i32]),
                    ("cmx_device_count", _i32, []), ("cmx_check_device", _i32, [_i32]),
                    ("cmx_make_plan", _i32, [ctypes.POINTER(Shape), ctypes.POINTER(Plan)]),
                    ("cmx_index_probe", _i64, [ctypes.POINTER(_i64), _i64, _i64, _i64, _i64]),
                    ("cmx_prefetch_audit", _i32, [_i32, ctypes.POINTER(_i64)]),
                    ("cmx_mma_probe", _i32, [_i32, ctypes.POINTER(ctypes.c_uint32),
                                             ctypes.POINTER(ctypes.c_float)]),
                    *((p, _i32, [ctypes.POINTER(Shape), ctypes.POINTER(Inputs),
                                 ctypes.POINTER(Outputs)]) for p in _PASSES)):
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
        except AttributeError as e:
            raise LibraryError(f"{path} lacks an entry point of the C ABI ({e}); rebuild it") \
                from None
        version = lib.cmx_abi_version()
        if version != ABI_VERSION:
            raise LibraryError(f"{path} has C ABI version {version} but this package expects "
                               f"{ABI_VERSION}; reinstall convmixer-ext to rebuild it")
        for name, act_id in activations.items():
            got = lib.cmx_activation_name(act_id)
            if got is None or got.decode() != name:
                raise LibraryError(f"{path} gives activation id {act_id} to "
                                   f"{got.decode() if got else None!r}, the package to "
                                   f"{name!r}; rebuild it")
        info = lib.cmx_build_info().decode()
        self.build_info = dict(kv.split("=", 1) for kv in info.split(";") if "=" in kv)
        self.kind = self.build_info.get("kind", "unknown")
        self.archs = [a for a in self.build_info.get("archs", "").split(",") if a]
        self.max_kernel_size = lib.cmx_max_kernel_size()

    # ------------------------------------------------------------------ errors
    def _error(self) -> str:
        msg = self._lib.cmx_last_error()
        return msg.decode() if msg else "unknown error"

    def _check(self, code: int, what: str) -> None:
        if code != OK:
            raise LibraryError(f"{what}: {self._error()}", code)

    # ------------------------------------------------------------------ queries
    def device_count(self) -> int:
        """Number of CUDA devices the library sees (initialises its CUDA runtime); raises
        LibraryError (code E_NO_DEVICE or E_CUDA) when there is none or no driver."""
        n = self._lib.cmx_device_count()
        if n < 0:
            raise LibraryError(self._error(), -n)
        return n

    def check_device(self, index: int) -> None:
        """Raises LibraryError unless the library holds a kernel image for device ``index``."""
        self._check(self._lib.cmx_check_device(index), f"device {index}")

    def plan(self, shape: Shape) -> Plan:
        p = Plan()
        self._check(self._lib.cmx_make_plan(ctypes.byref(shape), ctypes.byref(p)), "plan")
        return p

    def index_probe(self, strides, n: int, c: int, h: int, w: int) -> int:
        arr = (_i64 * 4)(*strides)
        return self._lib.cmx_index_probe(arr, n, c, h, w)

    def prefetch_audit_start(self) -> None:
        """Emulation build: record the L2 prefetches and staged 16-byte loads of the launches
        that follow (LibraryError on the CUDA build)."""
        self._check(self._lib.cmx_prefetch_audit(1, None), "prefetch audit")

    def prefetch_audit_stop(self) -> dict:
        """Stops the audit: prefetches issued, staged loads whose 128-byte line their block
        had not prefetched before (``missed``), and lines a block prefetched but never loaded
        (``unused``)."""
        counts = (_i64 * 3)()
        self._check(self._lib.cmx_prefetch_audit(0, counts), "prefetch audit")
        return dict(prefetches=counts[0], missed=counts[1], unused=counts[2])

    def mma_probe(self, dtype: str, regs, acc):
        """Emulation build: one warp's tensor-core MMA (mma.sync.m16n8k16 .row.col, fp32
        accumulators) on per-lane fragment registers, ``regs`` 32 x 6 unsigned 32-bit values
        (a0..a3, b0, b1), ``acc`` 32 x 4 floats; returns acc + A B as 32 x 4 floats."""
        r = (ctypes.c_uint32 * (32 * 6))(*[int(v) for row in regs for v in row])
        d = (ctypes.c_float * (32 * 4))(*[float(v) for row in acc for v in row])
        self._check(self._lib.cmx_mma_probe(DTYPE_IDS[dtype], r, d), "mma probe")
        return [list(d[4 * lane:4 * lane + 4]) for lane in range(32)]

    # ------------------------------------------------------------------ passes
    def run(self, name: str, shape: Shape, inputs: Inputs, outputs: Outputs) -> None:
        """Launch pass ``name`` (one of cmx_stats, cmx_apply, cmx_bwd_reduce, cmx_bwd_main)."""
        fn = getattr(self._lib, name)
        self._check(fn(ctypes.byref(shape), ctypes.byref(inputs), ctypes.byref(outputs)), name)


def library_path(kind: str, override: str | None = None) -> str:
    """Where the ``kind`` build ("cuda" or "emulation") lives: next to this file, or at
    ``override`` (tests load the sanitizer build of the emulation library this way)."""
    return override or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    LIBRARY_FILES[kind])
