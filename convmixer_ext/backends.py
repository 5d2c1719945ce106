"""The backend registry: the one place that knows every backend, whether it can run here,
what ``"auto"`` picks, and each backend's depthwise and pointwise entry points
(docs/DESIGN.md, "Backends").

==========  ==========================================  =========================
backend     runs on                                     ops
==========  ==========================================  =========================
cuda        CUDA tensors (compiled ``csrc/`` library)   depthwise
triton      CUDA tensors; CPU under TRITON_INTERPRET=1  depthwise, pointwise
triton_tc   as triton; float16/bfloat16 x only          depthwise (the convolution on
            ("auto": NCHW, every k)                     tensor cores, ``tl.dot``)
cuda_emu    CPU tensors (``csrc/`` on the emulator)     depthwise
torch       any device and float dtype (the twin:       depthwise, pointwise
            the kernels' passes written in PyTorch)
eager       any device and float dtype (PyTorch's own   depthwise, pointwise
            ops with autograd, as the reference runs)
==========  ==========================================  =========================

``"auto"``: on CUDA tensors the depthwise backend measured fastest for the kernel size,
layout and mode (:func:`measured_depthwise_choice`), else ``cuda`` or ``triton`` where they
can run, else ``eager``; the pointwise op takes ``triton`` where it runs; on every other
device ``eager`` (never slower than not using the package). With
statistics synchronised over a process group, ``eager`` cannot be used and ``torch`` takes
its place. ``CONVMIXER_EXT_BACKEND`` overrides ``"auto"``. A CUDA tensor that falls back
from ``cuda`` warns once, saying why and how to get the kernels.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings

import torch

from . import _cmx_lib, _env
from ._layout import out_like
from ._partials import merge_stats, sum_partials
from .cuda_kernels import TC_MAX_KERNEL_SIZE
from .semantics import ACTIVATIONS, KERNEL_DTYPES, MAX_KERNEL_SIZE, TENSOR_CORE_DTYPES

BACKENDS = ("cuda", "triton", "triton_tc", "cuda_emu", "torch", "eager")
OPS = {"cuda": ("depthwise",), "triton": ("depthwise", "pointwise"),
       "triton_tc": ("depthwise",), "cuda_emu": ("depthwise",),
       "torch": ("depthwise", "pointwise"), "eager": ("depthwise", "pointwise")}
# take KERNEL_DTYPES (triton_tc: TENSOR_CORE_DTYPES) and k <= MAX only
_KERNEL_BACKENDS = ("cuda", "triton", "triton_tc", "cuda_emu")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (the message says why)."""


# --------------------------------------------------------------------------- the library
_HOW_TO_BUILD = ("reinstall with the CUDA toolkit present (nvcc on PATH or CUDA_HOME set), "
                 "e.g. `pip install .` in a source checkout; see README 'Install' and "
                 "`python -m convmixer_ext`")


def _build_skip_reason(kind: str):
    try:
        from . import _build_info  # written by setup.py
    except ImportError:
        return None
    return getattr(_build_info, "SKIPPED", {}).get(kind)


@functools.lru_cache(maxsize=None)
def library(kind: str):
    """(Library, None) or (None, reason) for the "cuda" or "emulation" build."""
    override = _env.emu_lib_override() if kind == "emulation" else None
    path = _cmx_lib.library_path(kind, override)
    if not os.path.exists(path):
        why = _build_skip_reason(kind)
        what = "the CUDA kernels were not built" if kind == "cuda" else \
            "the host-emulation library was not built (build with CONVMIXER_EXT_BUILD_EMU=1)"
        return None, what + (f" ({why})" if why else "") + \
            (f"; {_HOW_TO_BUILD}" if kind == "cuda" else "")
    try:
        return _cmx_lib.Library(path, ACTIVATIONS), None
    except _cmx_lib.LibraryError as e:
        return None, str(e)


@functools.lru_cache(maxsize=None)
def _cuda_runtime_reason():
    """None if the compiled CUDA library sees a device, else why not (cached: it also
    initialises the library's CUDA runtime once, before any graph capture)."""
    lib, why = library("cuda")
    if lib is None:
        return why
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    try:
        if lib.device_count() == 0:
            return "no CUDA device"
    except _cmx_lib.LibraryError as e:
        return str(e)
    return None


def arch_runs(capability: tuple[int, int], archs) -> bool:
    """Whether code built for ``archs`` (e.g. ["sm_80", "sm_90", "compute_90"]) runs on a
    device of compute capability ``capability``: a cubin runs on the same major version at
    an equal or higher minor; PTX is JIT-compiled for any equal or newer capability."""
    cc = capability[0] * 10 + capability[1]
    for a in archs:
        kind, _, num = a.partition("_")
        if not num.isdigit():
            continue
        v = int(num)
        if kind == "sm" and v // 10 == capability[0] and v <= cc:
            return True
        if kind == "compute" and v <= cc:
            return True
    return False


@functools.lru_cache(maxsize=None)
def _cuda_device_reason(index: int):
    lib, _ = library("cuda")
    cap = torch.cuda.get_device_capability(index)
    if not arch_runs(cap, lib.archs):
        return (f"the CUDA kernels were built for {','.join(lib.archs)}, which cannot run on "
                f"device {index} (compute capability {cap[0]}.{cap[1]}); rebuild with "
                f"TORCH_CUDA_ARCH_LIST including {cap[0]}.{cap[1]}")
    try:
        lib.check_device(index)
    except _cmx_lib.LibraryError as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=None)
def _triton_import_error():
    if _env.triton_disabled():  # never import triton
        return "disabled by CONVMIXER_EXT_NO_TRITON=1"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    return None


def _version(mod) -> tuple:
    return tuple(int(p) for p in mod.__version__.split("+")[0].split(".")[:2])


def _triton_interprets() -> bool:
    """Whether the Triton kernels run in the interpreter: as they were defined where they are
    imported (triton_kernels.triton_interpreter), else as they will be (TRITON_INTERPRET)."""
    tk = sys.modules.get(f"{__package__}.triton_kernels")
    return tk.triton_interpreter() if tk is not None else _env.triton_interpreter()


@functools.lru_cache(maxsize=None)
def _interpreter_problem():
    """Triton < 3.7's interpreter turns a scalar argument into an int with ``int(array)``,
    which numpy >= 2.4 refuses for 1-element arrays (the pointwise GEMM's loop over its
    channel count). Compiled kernels are not affected."""
    import numpy
    import triton
    if _version(triton) < (3, 7) and _version(numpy) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot run these kernels with numpy "
                f"{numpy.__version__}: use numpy < 2.4 or triton >= 3.7 (GPU runs are not "
                "affected)")
    return None


# --------------------------------------------------------------------------- availability
def backend_reason(name: str, device=None):
    """None if backend ``name`` can run on ``device`` (a torch.device, a device string such
    as "cpu" or "cuda:1", or None: on some device here), else the reason it cannot."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    dev = torch.device(device) if isinstance(device, str) else device
    dev_type = None if dev is None else dev.type
    if name in ("torch", "eager"):
        return None
    if name == "cuda_emu":
        lib, why = library("emulation")
        if lib is None:
            return why
        if dev_type not in (None, "cpu"):
            return "backend 'cuda_emu' runs the CUDA kernels on CPU tensors only"
        return None
    if name == "cuda":
        if dev_type == "cpu":
            return ("backend 'cuda' needs CUDA tensors (for the host emulation of the same "
                    "kernels on CPU tensors use backend='cuda_emu')")
        why = _cuda_runtime_reason()
        if why is not None or dev_type is None:
            return why
        if dev_type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {dev_type}"
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return _cuda_device_reason(index)
    # triton, triton_tc (the same kernels, the same requirements)
    err = _triton_import_error()
    if err:
        return err
    on_cpu = dev_type == "cpu" or (dev_type is None and not torch.cuda.is_available())
    if on_cpu:
        if not _triton_interprets():
            return ("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                    "triton is imported to run its kernels on CPU tensors in the interpreter")
        return _interpreter_problem()
    if dev_type not in (None, "cuda"):
        return f"backend 'triton' needs CUDA tensors, got {dev_type}"
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    return None


def available_backends() -> dict:
    """Each backend name -> ``True`` if it can run here (on some device), else the reason."""
    return {name: (backend_reason(name) or True) for name in BACKENDS}


def check_backend_name(backend: str, op: str = "depthwise") -> None:
    """ValueError unless ``backend`` is "auto" or a backend implementing ``op``."""
    names = [b for b in BACKENDS if op in OPS[b]]
    if backend != "auto" and backend not in names:
        raise ValueError(f"{op} backend must be 'auto' or one of {names}, got {backend!r}")


# --------------------------------------------------------------------------- choice
_warned = set()


def _warn_fallback(chosen: str, why: str) -> None:
    if why in _warned:  # once per reason
        return
    _warned.add(why)
    warnings.warn(f"convmixer_ext: the CUDA kernels cannot run here ({why}); CUDA tensors "
                  f"run on backend {chosen!r} instead, which is slower. To get them: "
                  f"{_HOW_TO_BUILD}.", RuntimeWarning, stacklevel=4)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype,
                    kernel_size: int = 1, op: str = "depthwise", sync: bool = False,
                    channels_last: bool = False, training: bool = True,
                    tc_width: bool = True) -> str:
    """The concrete backend running ``op`` for tensors on ``device`` of ``dtype`` with kernel
    size ``kernel_size``; ``sync``: batch statistics synchronised over a process group;
    ``channels_last``, ``training``: the layout of x and the mode; ``tc_width``: whether x's
    width suits the CUDA library's tensor-core F2 (``cuda_kernels.tc_takes_width``) (auto's
    measured choice, see :func:`measured_depthwise_choice`). Raises what a bad choice
    deserves (an unknown name, an unavailable backend, a dtype or kernel size it does not
    take)."""
    name, err = _resolve(backend, device, dtype, kernel_size, op, sync, channels_last,
                         training, tc_width)
    if err is not None:
        raise _ERRORS[err[0]](err[1])
    return name


_ERRORS = {"value": ValueError, "type": TypeError, "unavailable": BackendUnavailableError}


# A constant of a compiled graph (torch.compile): the choice reads the library's files and
# the environment, which Dynamo cannot trace, and depends only on these arguments, which
# the graph's guards (x's device, dtype, strides) fix. It returns its error instead of
# raising it, so that the caller raises the exception itself (as Dynamo passes it on).
@torch.compiler.assume_constant_result
def _resolve(backend, device, dtype, kernel_size, op, sync, channels_last, training,
             tc_width=True):
    try:
        return _resolve_or_raise(backend, device, dtype, kernel_size, op, sync, channels_last,
                                 training, tc_width), None
    except BackendUnavailableError as e:
        return None, ("unavailable", str(e))
    except TypeError as e:
        return None, ("type", str(e))
    except ValueError as e:
        return None, ("value", str(e))


def _resolve_or_raise(backend, device, dtype, kernel_size, op, sync, channels_last,
                      training, tc_width=True) -> str:
    check_backend_name(backend, op)
    if backend == "auto":
        env = _env.backend_override()
        if env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"environment variable {_env.BACKEND_VAR} must be 'auto' or "
                                 f"one of {list(BACKENDS)}, got {env!r}")
            if op in OPS[env]:
                backend = env
    if backend == "auto":
        return _auto(device, dtype, kernel_size, op, sync, channels_last, training, tc_width)
    why = backend_reason(backend, device)
    if why is not None:
        raise BackendUnavailableError(f"backend {backend!r} is not available: {why}")
    if backend in _KERNEL_BACKENDS:
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend {backend!r} supports x of dtype float16, bfloat16 or "
                            f"float32, got {dtype}; use backend='torch' or 'eager' for {dtype}")
        if backend == "triton_tc" and dtype not in TENSOR_CORE_DTYPES:
            raise TypeError(f"backend 'triton_tc' supports x of dtype float16 or bfloat16 "
                            f"(16-bit tensor-core operands), got {dtype}; float32 stays on "
                            f"exact FP32 FMA: use backend='triton' or 'cuda'")
        if kernel_size > MAX_KERNEL_SIZE:
            raise ValueError(f"backend {backend!r} supports kernel_size up to "
                             f"{MAX_KERNEL_SIZE}, got {kernel_size}; use backend='eager'")
    if backend == "eager" and sync:
        raise ValueError("backend 'eager' runs PyTorch's own BatchNorm, which cannot "
                         "synchronise statistics over a process group here; use "
                         "backend='torch' (or a kernel backend on CUDA tensors)")
    return backend


def measured_depthwise_choice(kernel_size: int, channels_last: bool, training: bool,
                              dtype: torch.dtype = torch.float32, tc_width: bool = True) -> str:
    """The fastest depthwise backend on CUDA tensors as measured on ConvMixer-1536/20's block
    (benchmarks/results/).

    16-bit x in NCHW eval up to k = TC_MAX_KERNEL_SIZE, of a width its kernel takes
    (``tc_width``; other widths run its CUDA-core F2, slower than Triton's tensor cores): the
    CUDA library, whose F2 runs on tensor cores there, measured on an H200
    (`NVIDIA_H200-2026-11-27-run10-cuda-tc`, fp16, k = 3, 7, 9, 15; bf16 the same at 9 and
    15, slower and spread at 3 and 7, as Triton's tensor-core kernels were, not explained
    yet): 0.234 / 0.276 / 0.305 / 0.806 ms against Triton's tensor-core kernels' 0.321 /
    0.541 / 0.651 / 1.004 and the CUDA library's CUDA-core kernel's 0.413 / 0.610 / 0.728 /
    1.986. Beyond that k, at other widths, and in
    training (the CUDA library's training step, on tensor cores at k < 7 only, 3.70 ms
    against 2.94 at k = 3, 5.41 against 3.56 at k = 9):

    16-bit x in NCHW: the Triton tensor-core kernels, measured on an H100 (`-run4*`, bf16, k = 3,
    7, 9, 15, 31, eval and training step, against the CUDA library and the Triton CUDA-core
    kernels): fastest at every size (eval 0.36 / 0.59 / 0.71 / 1.09 / 3.5 ms against the
    CUDA library's 0.45 / 0.64 / 0.76 / 1.94 / 7.9; training 2.9 / 5.0 / 6.1 / 9.2 / 33 ms
    against 3.7 / 5.3 / 6.2 / 21 / 123, and the Triton CUDA-core kernels' 3.3 ms at k = 3),
    the gap closest at k = 9 in training (1-5%). float16 runs the same kernels (B2b scales
    and splits each du halo itself, where bfloat16's B2a stores du split) and follows
    bfloat16; the H200 timed its training step (run10) at 2.65 / 3.83 / 4.52 / 6.74 ms at
    k = 3 / 7 / 9 / 15 against the CUDA library's 3.98 / 3.90 / 5.49 / 8.37 and eager's 2.82
    / 16.5 / 25.6 / 57.1: still the fastest, by 2% at k = 7 and 6% over eager at k = 3.
    The price is memory: like "triton", a training step keeps an fp32 du scratch (peak 772
    MiB against the CUDA library's 384 MiB on that block, measured before the saved
    convolution output, which from k = 7 keeps 384 MiB more from the forward to the backward:
    :func:`saves_conv_output`). channels_last on tensor cores was 2-10x
    slower than the CUDA library except in training at k = 31 (203 against 249 ms, one
    sample each, at 2.9x its peak memory): not taken.

    Everything else, measured on an H200 (`NVIDIA_H200-2026-11-26*`: k = 3, 7, 9 in fp32
    and bf16, both layouts, eval and training step; k = 15 and 31 in bf16 NCHW; `-run3-b2`:
    training at k = 3, 9, 31 after B2's dW rework; `NVIDIA_H200-2026-11-27-run9-*`: k = 3, 7,
    9, 31 after the Triton CUDA-core rework, the CUDA library with its L2 prefetches as it
    now sets them). channels_last training: eager at k = 3 (cuDNN: 3.27 ms fp32, 2.45 bf16,
    against Triton's 4.00 / 3.68); at k = 7 the dtype decides: cuDNN's bf16 kernel stays fast
    (4.69 ms against Triton's 6.49 and the CUDA library's 6.71) while its fp32 one is 4.3x
    slower than Triton (30.1 ms against 7.00; the CUDA library 7.73). Sizes 4-6 were not
    timed: 16-bit takes eager (both neighbours agree), fp32 takes Triton (1.2x slower than
    eager at k = 3, where eager is 4.3x slower at k = 7: the smaller worst case). From k = 8,
    the CUDA library (k = 9: 8.07 / 7.31 ms against Triton's 10.69 / 9.38). In eval, and in
    NCHW, the choice did not depend on the dtype: Triton at k <= 3 in training and in
    channels_last eval (1.2-2.1x faster than the CUDA library; NCHW eval at k = 3: within
    4%, the CUDA library kept), the CUDA library everywhere else (NCHW training at k = 9:
    6.29 ms against Triton's 12.58; k = 31: 36.3 against 154)."""
    if dtype in TENSOR_CORE_DTYPES and not channels_last:
        if not training and kernel_size <= TC_MAX_KERNEL_SIZE and tc_width and \
                _env.cuda_tensor_cores():
            return "cuda"
        return "triton_tc"
    if training and channels_last and kernel_size <= 7:
        if kernel_size <= 3 or dtype in TENSOR_CORE_DTYPES:
            return "eager"   # cuDNN's channels_last depthwise
        return "triton"      # fp32 k = 4..7: cuDNN's fp32 kernel is 4.3x slower at k = 7
    if kernel_size <= 3 and (training or channels_last):
        return "triton"  # k=3: the Triton kernels are 1.2-2.1x faster than the CUDA library
    return "cuda"


# Backends whose passes can save the convolution output u in F1 and read it afterwards.
SAVES_U_BACKENDS = ("cuda", "triton", "triton_tc", "cuda_emu", "torch")
# The smallest kernel size at which "auto" saves u (estimated, docs/DESIGN.md, "Saved
# convolution output"): reading 4 bytes of u per element costs less than the convolution's
# k*k taps in F2, B1 and B2a from k = 7 up; at k = 3 the two are about even.
SAVE_U_MIN_KERNEL_SIZE = 7


def check_save_conv(save_conv) -> None:
    """TypeError unless ``save_conv`` is None (the default policy) or a bool."""
    if save_conv is not None and not isinstance(save_conv, bool):
        raise TypeError(f"save_conv must be None or a bool, got {type(save_conv).__name__}")


def saves_conv_output(backend: str, kernel_size: int, batch_stats: bool,
                      save_conv=None) -> bool:
    """Whether the fused block on concrete ``backend`` saves its convolution output u in F1
    (float32, x's shape) for F2, B1 and B2a to read instead of recomputing it: only when F1
    runs (``batch_stats``). ``save_conv``: None (the default) saves on the kernel backends
    from :data:`SAVE_U_MIN_KERNEL_SIZE` up; True / False force it on every backend of
    :data:`SAVES_U_BACKENDS` ("eager" keeps PyTorch's own saved tensors either way)."""
    check_save_conv(save_conv)
    if not batch_stats or backend not in SAVES_U_BACKENDS:
        return False
    if save_conv is None:
        return backend != "torch" and kernel_size >= SAVE_U_MIN_KERNEL_SIZE
    return save_conv


def _auto(device, dtype, kernel_size, op, sync, channels_last=False, training=True,
          tc_width=True) -> str:
    fallback = "torch" if sync else "eager"
    if device.type != "cuda" or dtype not in KERNEL_DTYPES or kernel_size > MAX_KERNEL_SIZE:
        return fallback
    if op == "depthwise":
        pick = measured_depthwise_choice(kernel_size, channels_last, training, dtype, tc_width)
        if pick == "eager" and not sync:  # (eager cannot synchronise statistics)
            return "eager"
        if pick in ("triton", "triton_tc") and backend_reason(pick, device) is None:
            return pick
        why = backend_reason("cuda", device)
        if why is None:
            return "cuda"
    if backend_reason("triton", device) is None:
        chosen = "triton"
    else:
        chosen = fallback
    if op == "depthwise":
        _warn_fallback(chosen, why)
    return chosen


# --------------------------------------------------------------------------- entry points
def _in_affine(in_affine):
    return (None, None) if in_affine is None else (in_affine[0], in_affine[1])


class KernelBackend:
    """Adapts partial-producing launchers (the Triton ones, or the compiled library's) to
    the backend interface of :mod:`convmixer_ext.torch_backend`, finishing every reduction
    with the fixed-order sums of :mod:`convmixer_ext._partials`.

    Launcher contract (activation as its integer id; ``in_scale``, ``in_shift``: the input
    affine, both None when there is none; ``u``: where F1 saves the convolution output and
    the later passes read it, passed only to the launchers of :data:`SAVES_U_BACKENDS`,
    ``saves_u``):
      k_stats(x, w, b, in_scale, in_shift, act[, u]) -> mean_p [T, C], m2_p [T, C],
          count_p [T]
      k_apply(x, w, b, mean, rstd, gamma, beta, in_scale, in_shift, act[, u]) -> out
      k_bwd_reduce(dout, x, w, b, mean, rstd, in_scale, in_shift, act[, u])
          -> dbeta_p [T, C], dgamma_p [T, C]
      k_bwd_main(dout, x, w, b, mean, rstd, gamma, dbeta, dgamma, batch_stats, in_scale,
                 in_shift, act[, u]) -> dx, dw_p [T, C, k*k], db_p [T, C], dscale_p, dshift_p
                 ([T, C], or [0, C] without the input affine)
      pointwise (optional): pw_gemm_act_stats(y, w2, b, g, act) -> mean_p, m2_p, count_p;
                            pw_bwd_du(dg, dmean, dvar, y, w2, b, mean, act) -> du, db_p
    """

    def __init__(self, launchers, saves_u=False):
        self.k = launchers
        self.saves_u = saves_u

    def _u(self, u):
        """The launchers' keyword for the saved convolution output (none without one)."""
        if u is None:
            return {}
        if not self.saves_u:
            raise ValueError("these kernels cannot save the convolution output (u must be "
                             "None)")
        return {"u": u}

    # depthwise (the pass interface of torch_backend)
    def stats(self, x, weight, bias, activation, in_affine=None, u=None):
        return merge_stats(*self.k.k_stats(x, weight, bias, *_in_affine(in_affine),
                                           ACTIVATIONS[activation], **self._u(u)))

    def apply(self, x, weight, bias, mean, rstd, gamma, beta, activation, in_affine=None,
              u=None):
        return self.k.k_apply(x, weight, bias, mean, rstd, gamma, beta, *_in_affine(in_affine),
                              ACTIVATIONS[activation], **self._u(u))

    def bwd_reduce(self, dout, x, weight, bias, mean, rstd, activation, in_affine=None,
                   u=None):
        dbeta_p, dgamma_p = self.k.k_bwd_reduce(dout, x, weight, bias, mean, rstd,
                                                *_in_affine(in_affine), ACTIVATIONS[activation],
                                                **self._u(u))
        return sum_partials(dbeta_p), sum_partials(dgamma_p)

    def bwd_main(self, dout, x, weight, bias, mean, rstd, gamma, dbeta, dgamma, batch_stats,
                 activation, in_affine=None, u=None):
        dx, dw_p, db_p, dscale_p, dshift_p = self.k.k_bwd_main(
            dout, x, weight, bias, mean, rstd, gamma, dbeta, dgamma, batch_stats,
            *_in_affine(in_affine), ACTIVATIONS[activation], **self._u(u))
        d_aff = None if in_affine is None else (sum_partials(dscale_p), sum_partials(dshift_p))
        return dx, sum_partials(dw_p).view(weight.shape), sum_partials(db_p), d_aff

    # pointwise (the interface of torch_backend.pw_fwd / pw_du)
    def pw_fwd(self, y, w2, bias, activation):
        g = out_like(y, w2.shape[0])
        mean_p, m2_p, count_p = self.k.pw_gemm_act_stats(y, w2, bias, g,
                                                         ACTIVATIONS[activation])
        mean, var = merge_stats(mean_p, m2_p, count_p)
        return g, mean, var

    def pw_du(self, dg, dmean, dvar, y, w2, bias, mean, activation):
        du, db_p = self.k.pw_bwd_du(dg, dmean, dvar, y, w2, bias, mean,
                                    ACTIVATIONS[activation])
        return du, sum_partials(db_p)


@functools.lru_cache(maxsize=None)
def get_impl(name: str):
    """The entry points of a concrete backend: an object with the depthwise passes (stats,
    apply, bwd_reduce, bwd_main) and, for pointwise backends, pw_fwd and pw_du. "eager" has
    none: the ops run PyTorch's own modules for it (ops.py, modules.py)."""
    if name == "torch":
        from . import torch_backend
        return torch_backend
    if name == "triton":
        from . import triton_kernels
        return KernelBackend(triton_kernels, saves_u=name in SAVES_U_BACKENDS)
    if name == "triton_tc":
        from . import triton_kernels
        return KernelBackend(triton_kernels.tensor_core_launchers,
                             saves_u=name in SAVES_U_BACKENDS)
    if name in ("cuda", "cuda_emu"):
        from .cuda_kernels import Launchers
        lib, why = library("cuda" if name == "cuda" else "emulation")
        if lib is None:
            raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
        return KernelBackend(Launchers(lib, "cuda" if name == "cuda" else "cpu"),
                             saves_u=name in SAVES_U_BACKENDS)
    raise ValueError(f"backend {name!r} has no kernel entry points")
