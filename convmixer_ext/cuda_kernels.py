"""Launchers of the compiled kernel library (``csrc/``) for torch tensors: the "cuda" backend
(``_cmx_cuda.so``, CUDA tensors) and "cuda_emu" (``_cmx_emu.so``, the same kernel source run
by the host emulator on CPU tensors).

They fill the C ABI structs of :mod:`convmixer_ext._cmx_lib` from tensors (pointers, sizes,
strides, dtype, the current CUDA stream) and allocate the outputs with torch, so launches
are stream-ordered, use the caching allocator and never synchronise or copy from the host:
a training step stays capturable in a CUDA graph. Same contract as the Triton launchers
(``k_stats`` ... ``k_bwd_main``); x is NCHW-contiguous or channels_last and the weight and
vectors are dense (ops.py makes them so at the boundary).
"""
from __future__ import annotations

import contextlib

import torch

from . import _cmx_lib as abi
from . import _env
from ._layout import check_saved_u, is_channels_last

_DTYPE_IDS = {torch.float32: abi.DTYPE_IDS["float32"], torch.float16: abi.DTYPE_IDS["float16"],
              torch.bfloat16: abi.DTYPE_IDS["bfloat16"]}
_PASS_CODES = {abi.E_INVALID: ValueError, abi.E_LIMIT: ValueError}


# The largest k whose F2 the library runs on tensor cores (the planner's kMmaMaxK in
# csrc/fused_dw_kernels.cuh: its halo starts 16 bytes left of the tile); "auto" sends 16-bit
# NCHW eval up to it to this library (backends.measured_depthwise_choice).
TC_MAX_KERNEL_SIZE = 17


def tc_takes_width(width) -> bool:
    """Whether the tensor-core F2 takes x of this width (NCHW): its halo moves in 16-byte
    chunks of 8 16-bit elements, each wholly inside or outside a row (the planner's 16-byte
    path, which also needs x 16-byte aligned, as torch's allocations are)."""
    return width % 8 == 0


def shape_of(x: torch.Tensor, k: int, act: int, has_in_affine: bool, *others,
             target_blocks: int = 0, saved_u: bool = False, prefetch: bool = True,
             tensor_cores: bool = False, images_per_block: int = 1) -> abi.Shape:
    """The C ABI's shape of x; ``aligned`` says whether x and ``others`` (the tensors that
    share its strides: dout, the outputs, the saved u) start 16-byte aligned (meta tensors:
    as torch's allocator gives); ``target_blocks`` (0: the library's default) sets how finely
    the reductions split their work (tests make blocks take many tiles with a small value);
    ``saved_u``: F1 saves the convolution output and the later passes read it;
    ``prefetch``: the kernels prefetch what they stage into L2 (a hint: same results);
    ``tensor_cores``: the passes that may run on tensor cores where their kernels take the
    shape (16-bit x, NCHW, 16-byte path, k <= TC_MAX_KERNEL_SIZE; the plan's ``mma`` says
    where): False / 0 none, True / 1 (``_cmx_lib.TC_F2``) F2, 2 (``TC_ALL``) F1 saving u
    and B2 reading it too (B2: k <= 16; where an image has several 32 x 32
    tiles, du by a pass of its own into a buffer of u's size: the plan's ``du``), 3
    (``TC_ALL_FUSED``) the same with B2 computing du on every tile's halo always;
    ``images_per_block``: F2 on tensor cores takes a tile in this many images per block,
    loading the next one's halo while it convolves one (>= 1; a schedule: same results)."""
    s = abi.Shape()
    s.n, s.c, s.h, s.w = x.shape
    for i, v in enumerate(x.stride()):
        s.stride[i] = v
    s.dtype = _DTYPE_IDS.get(x.dtype, -1)
    s.k, s.act, s.has_in_affine = k, act, int(has_in_affine)
    s.aligned = int(all(t.is_meta or t.data_ptr() % 16 == 0 for t in (x, *others)))
    s.target_blocks = target_blocks
    s.saved_u = int(saved_u)
    s.prefetch = int(prefetch)
    s.tensor_cores = int(tensor_cores)
    if s.tensor_cores not in (abi.TC_NONE, abi.TC_F2, abi.TC_ALL, abi.TC_ALL_FUSED):
        raise ValueError(f"tensor_cores must be a bool, 0, 1, 2 or 3, got {tensor_cores!r}")
    if isinstance(images_per_block, bool) or not isinstance(images_per_block, int) \
            or not 1 <= images_per_block < 2**31:
        raise ValueError(f"images_per_block must be an int >= 1, got {images_per_block!r}")
    s.images_per_block = images_per_block
    return s


def default_prefetch(channels_last: bool) -> bool:
    """Whether the kernels issue their L2 prefetches (docs/DESIGN.md, "L2 prefetch") where
    neither the caller nor CONVMIXER_EXT_CUDA_PREFETCH says: in NCHW only. Measured on an H200
    (``benchmarks/results/NVIDIA_H200-2026-11-27-run9-prefetch*``, ConvMixer-1536/20's block,
    fp32): in NCHW they took the training step 5.05 -> 4.78 ms at k = 3 and 6.44 -> 6.23 at
    k = 9 (B2 and B1 gaining most); in channels_last they cost 7-15% (eval at k = 9 1.36 ->
    1.56 ms, training 8.07 -> 9.19; F2 and B1 slower, in bf16 too) and the bound at k = 31
    is the convolution either way (within 1.5%)."""
    return not channels_last


def _p(t):
    return None if t is None else t.data_ptr()


def _f32(x, *shape):
    return torch.empty(shape, device=x.device, dtype=torch.float32)


class Launchers:
    """The four passes of one library build on tensors of its device type."""

    def __init__(self, lib: abi.Library, device_type: str, target_blocks: int = 0,
                 prefetch: bool | None = None, tensor_cores: bool | None = None,
                 images_per_block: int | None = None):
        """``prefetch``: L2 prefetch in the kernels; None: as CONVMIXER_EXT_CUDA_PREFETCH says
        at each launch, and where it is unset as :func:`default_prefetch` says for x.
        ``tensor_cores``: the passes on tensor cores where their kernels take the shape
        (:func:`shape_of`); None: as CONVMIXER_EXT_CUDA_TC says at each launch (F2 where
        unset). ``images_per_block``: F2 on tensor cores takes its tile in that many images
        per block (:func:`shape_of`); None: as CONVMIXER_EXT_CUDA_TC_IMAGES says at each
        launch (1 where unset)."""
        self.lib, self.device_type, self.target_blocks = lib, device_type, target_blocks
        self.prefetch, self.tensor_cores = prefetch, tensor_cores
        self.images_per_block = images_per_block

    def _prefetch(self, x) -> bool:
        p = _env.cuda_prefetch() if self.prefetch is None else self.prefetch
        return default_prefetch(is_channels_last(x)) if p is None else p

    def _tc(self) -> int:
        return _env.cuda_tensor_cores() if self.tensor_cores is None else self.tensor_cores

    def _images(self) -> int:
        return (_env.cuda_tc_images() if self.images_per_block is None
                else self.images_per_block)

    def plan(self, x, k, act=0, has_in_affine=False, *others, saved_u=False) -> abi.Plan:
        """The library's launch plan for x (shape-only: nothing is read or launched);
        ValueError for a shape beyond a hardware limit."""
        return self._plan(shape_of(x, k, act, has_in_affine, *others,
                                   target_blocks=self.target_blocks, saved_u=saved_u,
                                   tensor_cores=self._tc(),
                                   images_per_block=self._images()))

    def _plan(self, shape):
        try:
            return self.lib.plan(shape)
        except abi.LibraryError as e:
            raise _PASS_CODES.get(e.code, RuntimeError)(f"convmixer_ext: {e}") from None

    def _run(self, name, x, shape, inputs, outputs):
        inputs.stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else None
        guard = (torch.cuda.device(x.device) if x.is_cuda and
                 x.device.index != torch.cuda.current_device() else contextlib.nullcontext())
        try:
            with guard:
                self.lib.run(name, shape, inputs, outputs)
        except abi.LibraryError as e:
            raise _PASS_CODES.get(e.code, RuntimeError)(f"convmixer_ext: {e}") from None

    def _setup(self, x, weight, bias, in_scale, in_shift, act, pass_, dout=None, u=None):
        """(shape, partial rows of ``pass_`` (a name of abi.PASSES), inputs, plan); ``u``: the
        saved convolution output (inputs.u, which F2, B1 and B2 read; F1 writes outputs.u)."""
        # outputs are allocated by torch (16-byte aligned); dout and u may be views
        if u is not None:
            check_saved_u(u, x)
        others = tuple(t for t in (dout, u) if t is not None)
        shape = shape_of(x, weight.shape[-1], act, in_scale is not None, *others,
                         target_blocks=self.target_blocks, saved_u=u is not None,
                         prefetch=self._prefetch(x), tensor_cores=self._tc(),
                         images_per_block=self._images())
        plan = self._plan(shape)
        inputs = abi.Inputs(x=_p(x), weight=_p(weight), bias=_p(bias), in_scale=_p(in_scale),
                            in_shift=_p(in_shift), u=_p(u))
        return shape, plan.partial_rows[abi.PASSES.index(pass_)], inputs, plan

    def k_stats(self, x, weight, bias, in_scale, in_shift, act, u=None):
        shape, rows, inputs, _ = self._setup(x, weight, bias, in_scale, in_shift, act, "F1",
                                             u=u)
        C = x.shape[1]
        mean_p, m2_p, count_p = _f32(x, rows, C), _f32(x, rows, C), _f32(x, rows)
        self._run("cmx_stats", x, shape, inputs,
                  abi.Outputs(mean_p=_p(mean_p), m2_p=_p(m2_p), count_p=_p(count_p), u=_p(u)))
        return mean_p, m2_p, count_p

    def k_apply(self, x, weight, bias, mean, rstd, gamma, beta, in_scale, in_shift, act,
                u=None):
        shape, _, inputs, _ = self._setup(x, weight, bias, in_scale, in_shift, act, "F2", u=u)
        inputs.mean, inputs.rstd, inputs.gamma, inputs.beta = map(_p, (mean, rstd, gamma, beta))
        out = torch.empty_like(x)
        self._run("cmx_apply", x, shape, inputs, abi.Outputs(y=_p(out)))
        return out

    def k_bwd_reduce(self, dout, x, weight, bias, mean, rstd, in_scale, in_shift, act, u=None):
        shape, rows, inputs, _ = self._setup(x, weight, bias, in_scale, in_shift, act, "B1",
                                             dout, u)
        inputs.dout, inputs.mean, inputs.rstd = _p(dout), _p(mean), _p(rstd)
        C = x.shape[1]
        dbeta_p, dgamma_p = _f32(x, rows, C), _f32(x, rows, C)
        self._run("cmx_bwd_reduce", x, shape, inputs,
                  abi.Outputs(dbeta_p=_p(dbeta_p), dgamma_p=_p(dgamma_p)))
        return dbeta_p, dgamma_p

    def k_bwd_main(self, dout, x, weight, bias, mean, rstd, gamma, dbeta, dgamma, batch_stats,
                   in_scale, in_shift, act, u=None):
        shape, rows, inputs, plan = self._setup(x, weight, bias, in_scale, in_shift, act, "B2",
                                                dout, u)
        inputs.dout, inputs.mean, inputs.rstd, inputs.gamma = map(_p, (dout, mean, rstd, gamma))
        inputs.dbeta, inputs.dgamma = _p(dbeta), _p(dgamma)
        inputs.batch_stats = int(bool(batch_stats))
        C, k = x.shape[1], weight.shape[-1]
        dx = torch.empty_like(x)
        dw_p, db_p = _f32(x, rows, C, k * k), _f32(x, rows, C)
        n_aff = rows if in_scale is not None else 0
        dscale_p, dshift_p = _f32(x, n_aff, C), _f32(x, n_aff, C)
        # B2's du pass on tensor cores (plan.du): du in float32, laid out as u
        du = torch.empty_strided(x.shape, x.stride(), device=x.device, dtype=torch.float32) \
            if plan.du else None
        self._run("cmx_bwd_main", x, shape, inputs,
                  abi.Outputs(y=_p(dx), dw_p=_p(dw_p), db_p=_p(db_p),
                              dscale_p=_p(dscale_p) if n_aff else None,
                              dshift_p=_p(dshift_p) if n_aff else None, du=_p(du)))
        return dx, dw_p, db_p, dscale_p, dshift_p
