"""The "triton" backend's kernels and launchers (docs/DESIGN.md, "Forward", "Backward" and
"Pointwise").

Depthwise block: a program owns ``BLOCK_C`` channels of one image and a ``TH x TW`` spatial
tile, flattened to ``BLOCK_S`` lanes (on tensor cores optionally the same tile of ``IMG``
images: :func:`tensor_core_tiling`); programs form a 1-D grid (tiles fastest, then channel
blocks). Tensors are indexed through their strides with 64-bit offsets; the tile shape is
picked per layout (one channel and a whole plane for NCHW; many channels and a small
spatial tile for channels_last). Kernels recompute ``u = dwconv(x) + b``:

- ``_stats_kernel``      F1: per-tile mean, centred M2 and count of ``g = act(u)``;
- ``_apply_kernel``      F2 / eval: ``out = x + gamma*(g-mean)*rstd + beta``;
- ``_bwd_reduce_kernel`` B1: per-tile ``sum(dout)``, ``sum(dout*xhat)``;
- ``_bwd_du_kernel``     B2a: ``du = dg * act'(u)`` into an fp32 scratch tensor (Triton has
  no addressable shared memory to keep it on the halo, as the CUDA kernels do);
- ``_bwd_dx_kernel``     B2b: ``dx = dout + conv_transpose(du, W)``, per-tile ``db`` (on tensor
  cores for "triton_tc", with the ``dW`` partials: ``_bwd_tc``);
- ``_bwd_dw_kernel``     B2c (channels_last on CUDA cores): the ``dW`` partials per image (or
  chunk of rows), accumulated in registers over its positions.

Pointwise block: ``_pw_gemm_kernel`` (GEMM with bias/activation/BN2-statistics epilogue) and
``_pw_bwd_du_kernel`` (the same GEMM recomputing ``u``, forming ``du`` in its epilogue).

Contract of the launchers (``k_*``, ``pw_*``): the vectors and the weight are dense, x is
NCHW-contiguous or channels_last (ops.py makes them so, once, at the boundary).

Every launch goes through :func:`_launch`, which picks the GPU configuration (tiles,
``num_stages``, dtype flags) whenever the launch targets a GPU; :func:`recording` captures
those launches instead of running them, so the real-target compile check
(``benchmarks/targets.py``) compiles exactly what the launchers pick.
With ``TRITON_INTERPRET=1`` set before triton is imported, the kernels run on CPU tensors in
Triton's interpreter (how CI executes them).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import types

import torch
import triton
import triton.language as tl

from ._layout import check_saved_u
from .semantics import ACTIVATIONS, GELU_TANH_COEF, TENSOR_CORE_DTYPES, pad_before


def triton_interpreter() -> bool:
    """Whether these kernels run in Triton's interpreter: fixed when ``triton.jit`` defined
    them, by TRITON_INTERPRET as it was then, whatever the environment says at a later
    launch (a compiled kernel must never be launched as if interpreted, or the reverse)."""
    return _INTERPRETED


# Globals used inside @triton.jit code must be tl.constexpr (a plain Python number compiles
# under the interpreter only).
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(math.sqrt(2.0 / math.pi))
# the GELU derivative's density term as one 2^x: exp(-u^2 / 2) / sqrt(2 pi) = 2^(u^2 A + B)
_PDF_A: tl.constexpr = tl.constexpr(-0.5 / math.log(2.0))
_PDF_B: tl.constexpr = tl.constexpr(math.log2(1.0 / math.sqrt(2.0 * math.pi)))
_GELU_TANH_COEF: tl.constexpr = tl.constexpr(GELU_TANH_COEF)
ACT_GELU: tl.constexpr = tl.constexpr(ACTIVATIONS["gelu"])
ACT_GELU_TANH: tl.constexpr = tl.constexpr(ACTIVATIONS["gelu_tanh"])
# what a pass does for the convolution output u (:func:`_conv`)
U_CONV: tl.constexpr = tl.constexpr(0)
U_SAVE: tl.constexpr = tl.constexpr(1)
U_LOAD: tl.constexpr = tl.constexpr(2)

MAX_PROGRAMS = 2**31 - 1  # grid axis 0 limit (every launch here uses a 1-D grid)


# --------------------------------------------------------------------------- device helpers
@triton.jit
def _tanh(z):
    # tanh through exp (portable to every Triton version and the interpreter).
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _cdf(u):
    """Phi(u), the standard normal CDF, in fp32 (docs/DESIGN.md, "Activation"): one
    polynomial and one 2^x for both signs. ``Phi(-a) = 2^(a t(a) - 1)`` for ``a = |u|``,
    ``t`` the degree-9 weighted minimax fit of ``(1 + log2 Phi(-a)) / a`` on [0, 6]
    (weighted so that the absolute error of ``Phi(-a)`` stays under 1e-8, a sixth of an
    ulp of Phi near 1, and its relative error under 2.3e-6 in exact arithmetic; 4.1e-6 in
    fp32), and ``Phi(u) = 1 - Phi(-u)`` for u >= 0 (within 1.4 ulp); beyond |u| = 6 the
    exponent keeps t(6)'s slope (``Phi(u) < 1e-9`` off by less than that, then 0; 1 above).
    The erf route, ``fma(erf(u / sqrt 2), 0.5, 0.5)``, took two degree-6 pieces, both
    evaluated and one selected, and lost every bit of Phi below -4 to cancellation."""
    a = tl.abs(u)
    c = tl.minimum(a, 6.0)
    t = tl.fma(c, -2.2947066469214406e-08, 7.153334991016891e-07)
    t = tl.fma(t, c, -9.517782018519938e-06)
    t = tl.fma(t, c, 6.858746201032773e-05)
    t = tl.fma(t, c, -0.00025471733533777297)
    t = tl.fma(t, c, -4.7056732000783086e-05)
    t = tl.fma(t, c, 0.006998583674430847)
    t = tl.fma(t, c, -0.052472248673439026)
    t = tl.fma(t, c, -0.4592120349407196)
    t = tl.fma(t, c, -1.1511050462722778)
    e = tl.math.exp2(tl.fma(a, t, -1.0))
    return tl.where(u < 0.0, e, 1.0 - e)


@triton.jit
def _act(u, ACT: tl.constexpr):
    # constexpr globals stand right of tensors: the interpreter mishandles `constexpr * tensor`
    # passed straight to a builtin
    if ACT == ACT_GELU:
        return u * _cdf(u)
    elif ACT == ACT_GELU_TANH:
        return 0.5 * u * (1.0 + _tanh((u + u * u * u * _GELU_TANH_COEF) * _SQRT_2_OVER_PI))
    else:
        return tl.maximum(u, 0.0)


@triton.jit
def _act_grad(u, ACT: tl.constexpr):
    if ACT == ACT_GELU:
        return tl.fma(u, tl.math.exp2(tl.fma(u * u, _PDF_A, _PDF_B)), _cdf(u))
    elif ACT == ACT_GELU_TANH:
        t = _tanh((u + u * u * u * _GELU_TANH_COEF) * _SQRT_2_OVER_PI)
        dt = (1.0 + u * u * _GELU_TANH_COEF * 3.0) * _SQRT_2_OVER_PI
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * dt
    else:
        return tl.where(u > 0.0, 1.0, 0.0)


@triton.jit
def _tile_origin(tiles_w, tiles_per_img, tiles_total, TH: tl.constexpr, TW: tl.constexpr,
                 IMG: tl.constexpr):
    """This program's partial row, channel block, first image and the top-left (h0, w0) of
    its spatial tile, which it covers in IMG consecutive images. 1-D grid: the
    ``tiles_total = cdiv(N, IMG) * tiles_per_img`` tiles fastest, then channel blocks."""
    pid = tl.program_id(0)
    row = pid % tiles_total
    cb = pid // tiles_total
    n = (row // tiles_per_img) * IMG
    t = row % tiles_per_img
    return row, cb, n, (t // tiles_w) * TH, (t % tiles_w) * TW


@triton.jit
def _tile_rows(n, N, sN, TH: tl.constexpr, IMG: tl.constexpr):
    """(r, roff, ok, base) of the tensor-core GEMMs' M = IMG * TH rows (the program's IMG
    images' tiles stacked): each row's tile row, its offset from ``base`` (int64) and whether
    its image exists (the last group of images may be short). One image: base is the
    image's offset, roff 0 and ok true (uniform: nothing per row)."""
    if IMG == 1:
        r = tl.arange(0, TH)
        roff = 0
        ok = True
        base = n.to(tl.int64) * sN
    else:
        rr = tl.arange(0, IMG * TH)
        ni = n + rr // TH
        r = rr % TH
        roff = ni.to(tl.int64) * sN
        ok = ni < N
        base = 0
    return r, roff, ok, base


@triton.jit
def _tile(N, C, H, W, tiles_w, tiles_per_img, tiles_total, sN, TH: tl.constexpr,
          TW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, IMG: tl.constexpr):
    """This program's partial row, channel block, image base offset (int64: a scalar, or
    with IMG > 1 images per program one per lane), channels, tile rows/cols and masks (grid
    order: :func:`_tile_origin`; lanes image by image, row-major within each)."""
    row, cb, n, h0, w0 = _tile_origin(tiles_w, tiles_per_img, tiles_total, TH, TW, IMG)
    s = tl.arange(0, BLOCK_S)
    if IMG == 1:
        h = h0 + s // TW
        w = w0 + s % TW
        valid = (s < TH * TW) & (h < H) & (w < W)
        base = n.to(tl.int64) * sN
    else:  # BLOCK_S = IMG * TH * TW (powers of two)
        ni = n + s // (TH * TW)
        h = h0 + (s // TW) % TH
        w = w0 + s % TW
        valid = (ni < N) & (h < H) & (w < W)
        base = ni.to(tl.int64) * sN
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    return row, cb, base, c, cmask, h, w, valid


@triton.jit
def _offs(c, h, w, sC, sH, sW):
    """[BLOCK_C, BLOCK_S] element offsets (64-bit) of channels c at positions (h, w)."""
    return (c.to(tl.int64) * sC)[:, None] + (h.to(tl.int64) * sH + w.to(tl.int64) * sW)[None, :]


@triton.jit
def _load_c(ptr, c, cmask):
    return tl.load(ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _load_in(x_ptr, offs, m, scale_ptr, shift_ptr, c, cmask, IN_AFFINE: tl.constexpr):
    """The block input at offs in fp32, 0 where masked (the zero padding): x, or with the
    input affine in_scale*x + in_shift per channel."""
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if IN_AFFINE:
        v = tl.where(m, v * _load_c(scale_ptr, c, cmask) + _load_c(shift_ptr, c, cmask), 0.0)
    return v


@triton.jit
def _round16(v, BF16: tl.constexpr):
    """fp32 -> the nearest bfloat16 (BF16) or float16 value, ties to even, kept in fp32, for
    the interpreter: its fp32 -> bfloat16 cast truncates, so bfloat16 is rounded with
    integer arithmetic (on a GPU :func:`_split16` uses the hardware's conversions, which
    round the same way)."""
    if BF16:
        b = v.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return ((b >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float16).to(tl.float32)


@triton.jit
def _split16(a, DT: tl.constexpr, UPCAST: tl.constexpr):
    """(hi, lo): fp32 ``a`` as the sum of two 16-bit (DT) terms ``hi = rn(a)`` and ``lo = rn(a
    - hi)`` (``a - hi`` is exact), which keep 16 (bfloat16) or 22 (float16) significant bits
    instead of 8 or 11 (docs/DESIGN.md, "Tensor cores"). On a GPU the roundings are the
    hardware's round-to-nearest-even conversions; UPCAST (the interpreter): the same values
    from :func:`_round16`, kept in fp32."""
    # (one return: triton 3.6 rejects returns of different types under a constexpr if)
    if UPCAST:
        hi = _round16(a, DT == tl.bfloat16)
        lo = _round16(a - hi, DT == tl.bfloat16)
    else:
        hi = a.to(DT, fp_downcast_rounding="rtne")
        lo = (a - hi.to(tl.float32)).to(DT, fp_downcast_rounding="rtne")
    return hi, lo


@triton.jit
def _dot_terms(hi, lo, b, acc, UPCAST: tl.constexpr):
    """acc + (hi + lo) @ b on tensor cores, ``hi`` and ``lo`` the two 16-bit terms of an fp32
    operand (:func:`_split16`); UPCAST: the GEMMs on fp32 copies."""
    if UPCAST:
        hi, lo, b = hi.to(tl.float32), lo.to(tl.float32), b.to(tl.float32)
    acc = tl.dot(hi, b, acc, input_precision="ieee")
    return tl.dot(lo, b, acc, input_precision="ieee")


@triton.jit
def _dot_split(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b for fp32 ``a`` and 16-bit ``b`` on tensor cores, ``a`` entering as its two
    16-bit terms (:func:`_split16`, :func:`_dot_terms`)."""
    hi, lo = _split16(a, b.dtype, UPCAST)
    return _dot_terms(hi, lo, b, acc, UPCAST)


@triton.jit
def _pow2_scale(m):
    """(s, 1/s): the power of two s that takes the magnitude ``m`` (fp32, >= 0) into [1, 2)
    ([0, 1) for m below the smallest normal number); applying and undoing it is exact."""
    e = tl.minimum(tl.maximum((m.to(tl.uint32, bitcast=True) >> 23) & 0xFF, 1), 253)
    return ((254 - e) << 23).to(tl.float32, bitcast=True), (e << 23).to(tl.float32, bitcast=True)


@triton.jit
def _plane_rows(plane, roff, hrow, col, H, W, sH, sW, row_ok):
    """(values, mask): rows hrow (where row_ok) of the planes at ``plane + roff`` (roff: each
    row's image offset, :func:`_tile_rows`) at columns col, 0 outside the image (the row
    windows of the tensor-core GEMMs)."""
    m = (row_ok & (hrow < H))[:, None] & ((col >= 0) & (col < W))[None, :]
    v = tl.load(plane + (roff + hrow.to(tl.int64) * sH)[:, None] + col.to(tl.int64)[None, :] * sW,
                mask=m, other=0.0)
    return v, m


@triton.jit
def _abs_max(v):
    return tl.max(tl.max(tl.abs(v), axis=1), axis=0)


@triton.jit
def _du_cols(duch, dloch, h0, r, roff, rok, wc, m, H, W, sH, sW, s, DT: tl.constexpr,
             SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """(hi, lo), [16, M] each: s * du[h0 + r, wc + m] (0 outside the image; r, roff, rok:
    :func:`_tile_rows`) as B2's dW operand, its high and low 16-bit terms (:func:`_split16`;
    DT the 16-bit type). SPLIT: du is stored as those terms already (high at duch, low at
    dloch)."""
    col = wc + m
    hh = h0 + r
    ok = (col < W)[:, None] & (rok & (hh < H))[None, :]
    off = col.to(tl.int64)[:, None] * sW + (roff + hh.to(tl.int64) * sH)[None, :]
    if SPLIT:
        hi = tl.load(duch + off, mask=ok, other=0.0)
        lo = tl.load(dloch + off, mask=ok, other=0.0)
        return hi, lo
    return _split16(tl.load(duch + off, mask=ok, other=0.0) * s, DT, UPCAST)


@triton.jit
def _dot_du_rows(duch, dloch, roff, hrow, rok, dcol, H, W, sH, sW, s, ti, acc,
                 SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + D @ T for the du rows ``hrow`` (of the images at roff, where rok) at columns
    ``dcol`` (0 outside the image), D entering as its two 16-bit terms: split here from the
    fp32 scratch (times ``s``), or (SPLIT) loaded as stored, high at duch and low at
    dloch."""
    ok = rok & (hrow >= 0)
    if SPLIT:
        return _dot_terms(_plane_rows(duch, roff, hrow, dcol, H, W, sH, sW, ok)[0],
                          _plane_rows(dloch, roff, hrow, dcol, H, W, sH, sW, ok)[0], ti, acc,
                          UPCAST)
    return _dot_split(_plane_rows(duch, roff, hrow, dcol, H, W, sH, sW, ok)[0] * s, ti, acc,
                      UPCAST)


@triton.jit
def _x_window(xch, roff, xrow, rok, xcol, H, W, sH, sW, UPCAST: tl.constexpr):
    """(X, M): the x rows ``xrow`` (of the images at roff, where rok) at columns ``xcol`` (0
    outside the image) and their in-image mask, as 16-bit GEMM operands; UPCAST: in fp32
    (the interpreter's dot and bool -> 16-bit cast mishandle 16-bit values; the products are
    exact in fp32 either way)."""
    xi, m = _plane_rows(xch, roff, xrow, xcol, H, W, sH, sW, rok & (xrow >= 0))
    if UPCAST:  # (one return, as in _split16)
        xi = xi.to(tl.float32)
    return xi, m.to(xi.dtype)


@triton.jit
def _band_sums(h0, l0, h1, l1, xch, roff, xrow, rok, xcol, H, W, sH, sW, band,
               TWO: tl.constexpr, IN_AFFINE: tl.constexpr, UPCAST: tl.constexpr):
    """(sum_m P[m, band[m, j]] for P = (h0 + l0) @ X0 (+ (h1 + l1) @ X1 where TWO), the same
    for the in-image masks M0 (M1)): one kernel row's dW (and its mask term) over 16 columns
    (32 where TWO), h, l the high and low terms of the transposed du (:func:`_du_cols`), X0
    the x rows ``xrow`` at columns ``xcol`` (0 outside the image), X1 the same 16 columns on.
    Both terms and both column blocks share the band, so all four GEMMs accumulate into one
    16-row P and the band is gathered and summed once."""
    xi, mi = _x_window(xch, roff, xrow, rok, xcol, H, W, sH, sW, UPCAST)
    p = _dot_terms(h0, l0, xi, tl.zeros([16, xi.shape[1]], dtype=tl.float32), UPCAST)
    pm = p
    if IN_AFFINE:
        pm = _dot_terms(h0, l0, mi, tl.zeros_like(p), UPCAST)
    if TWO:
        xi, mi = _x_window(xch, roff, xrow, rok, xcol + 16, H, W, sH, sW, UPCAST)
        p = _dot_terms(h1, l1, xi, p, UPCAST)
        if IN_AFFINE:
            pm = _dot_terms(h1, l1, mi, pm, UPCAST)
    dw = tl.sum(tl.gather(p, band, axis=1), axis=0)
    dm = tl.zeros_like(dw)
    if IN_AFFINE:
        dm = tl.sum(tl.gather(pm, band, axis=1), axis=0)
    return dw, dm


@triton.jit
def _bwd_tc(x_ptr, w_ptr, scale_ptr, shift_ptr, du_ptr, dulo_ptr, dus_p, dw_p, prow, ch, N, H, W,
            sN, sC, sH, sW, tiles_w, tiles_per_img, tiles_total, K: tl.constexpr,
            PB: tl.constexpr, IN_AFFINE: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
            KP: tl.constexpr, CW: tl.constexpr, DO: tl.constexpr, MP: tl.constexpr,
            RP: tl.constexpr, XO: tl.constexpr, KX: tl.constexpr, SPLIT: tl.constexpr,
            UPCAST: tl.constexpr, IMG: tl.constexpr):
    """B2 of channel ``ch`` over the program's TH x TW tile of IMG images on tensor cores
    (M = IMG * TH GEMM rows, :func:`_tile_rows`): stores the tiles' dW partial (K x K at
    ``dw_p + prow * K * K``, summed over the images by the GEMMs' reduction over M) and
    returns the transposed convolution ``sum_ij du[r + PB - i, c + PB - j] W[i, j]`` as
    [1, M*TW] fp32. du enters the GEMMs as its two 16-bit terms (:func:`_split16`): split
    here from the fp32 scratch, or (SPLIT) stored split by B2a at du_ptr (high) and dulo_ptr
    (low), which leaves the loop's operands to go from memory to the tensor cores
    unconverted; x and W are 16-bit and exact.

    dx, kernel row i, per CW columns c0 + [0, CW) as in :func:`_conv_tc`: ``D_i @ T'_i`` with
    ``D_i[r, q] = du[h0 + r + PB - i, w0 + c0 + PB - (K-1) - DO + q]`` (TH x KP, zero outside
    the image) and ``T'_i[q, c] = W[i, K - 1 - (q - DO - c)]`` for ``0 <= q - DO - c < K``
    (KP x CW, read whole from ``w_ptr``, which holds every channel's T'_i: :func:`_toeplitz`
    of the flipped weight); DO: XO's counterpart for du's rows.
    dW, kernel row i, per 16 columns c0 + [0, 16): ``P = (A_hi + A_lo) @ X_i`` (16 x KX) with
    ``A[m, r] = du[h0 + r, w0 + c0 + m]`` (the tile's own du, transposed, as its high and low
    16-bit terms: two GEMMs into one P, the operands built once per program) and X_i the
    forward's row window (:func:`_conv_tc` with XO, KX its KP or 32); then ``dW[i, j] = sum_m
    P[m, m + j + XO]``, the band of P, taken by ``tl.gather``. The band is the same for both
    16-column blocks of a 32-wide tile: their GEMMs accumulate into the same P
    (:func:`_band_sums`). With the input affine,
    ``dW = a (du * x) + c (du * M)``, M the in-image mask. For float16 (whose range is not
    fp32's) du is scaled by the power of two that takes the halo's largest |du| into [1, 2),
    undone on the fp32 results (SPLIT: B2a scaled it, and stored 1 / s at ``dus_p + prow``:
    its tile is this program's whole halo)."""
    _, _, n, h0, w0 = _tile_origin(tiles_w, tiles_per_img, tiles_total, TH, TW, IMG)
    BF16: tl.constexpr = w_ptr.dtype.element_ty == tl.bfloat16
    M: tl.constexpr = IMG * TH
    r, roff, rok, base = _tile_rows(n, N, sN, TH, IMG)
    q = tl.arange(0, KP)
    duch = du_ptr + base + ch.to(tl.int64) * sC
    dloch = dulo_ptr + base + ch.to(tl.int64) * sC
    xch = x_ptr + base + ch.to(tl.int64) * sC
    dcol = w0 + (PB - (K - 1) - DO) + q  # the window of dx columns w0 .. w0 + CW - 1 (+ CW)
    s = 1.0
    inv_s = 1.0
    if not BF16 and SPLIT:  # B2a's scale
        inv_s = tl.load(dus_p + prow)
    elif not BF16:  # one scale for the halo: every du this program reads (all IMG images)
        hr, hoff, hiok, _ = _tile_rows(n, N, sN, RP, IMG)
        hh = h0 + (PB - (K - 1)) + hr
        hok = hiok & (hr < TH + K - 1) & (hh >= 0)
        hmax = _abs_max(_plane_rows(duch, hoff, hh, dcol, H, W, sH, sW, hok)[0])
        if TW > CW:
            hmax = tl.maximum(hmax, _abs_max(_plane_rows(duch, hoff, hh, dcol + CW, H, W, sH,
                                                         sW, hok)[0]))
        s, inv_s = _pow2_scale(hmax)
    # dx: the transposed convolution, kernel row by kernel row
    ccw = tl.arange(0, CW)
    trow = w_ptr + ch.to(tl.int64) * (K * KP * CW) + (q[:, None] * CW + ccw[None, :])
    acc0 = tl.zeros([M, CW], dtype=tl.float32)
    acc1 = tl.zeros([M, CW], dtype=tl.float32)
    for i in range(K):
        ti = tl.load(trow + i * (KP * CW))
        hrow = h0 + r + (PB - i)
        acc0 = _dot_du_rows(duch, dloch, roff, hrow, rok, dcol, H, W, sH, sW, s, ti, acc0,
                            SPLIT, UPCAST)
        if TW > CW:
            acc1 = _dot_du_rows(duch, dloch, roff, hrow, rok, dcol + CW, H, W, sH, sW, s, ti,
                                acc1, SPLIT, UPCAST)
    acc = _join_cols(acc0, acc1, M, TW, CW)
    # dW: kernel row by kernel row, both 16-column blocks into one band
    m = tl.arange(0, 16)
    ij = tl.arange(0, MP)
    band = tl.minimum(m[:, None] + ij[None, :] + XO, KX - 1)  # (j >= K: unused)
    xcol = w0 - (PB + XO) + tl.arange(0, KX)
    hi0, lo0 = _du_cols(duch, dloch, h0, r, roff, rok, w0, m, H, W, sH, sW, s,
                        x_ptr.dtype.element_ty, SPLIT, UPCAST)
    hi1, lo1 = hi0, lo0
    if TW > 16:
        hi1, lo1 = _du_cols(duch, dloch, h0, r, roff, rok, w0 + 16, m, H, W, sH, sW, s,
                            x_ptr.dtype.element_ty, SPLIT, UPCAST)
    accw = tl.zeros([MP, MP], dtype=tl.float32)
    accm = tl.zeros([MP, MP], dtype=tl.float32)
    for i in range(K):
        xrow = h0 + r + (i - PB)
        dw, dm = _band_sums(hi0, lo0, hi1, lo1, xch, roff, xrow, rok, xcol, H, W, sH, sW, band,
                            TW > 16, IN_AFFINE, UPCAST)
        accw = tl.where(ij[:, None] == i, dw[None, :], accw)
        accm = tl.where(ij[:, None] == i, dm[None, :], accm)
    if IN_AFFINE:
        accw = accw * tl.load(scale_ptr + ch).to(tl.float32) + \
            accm * tl.load(shift_ptr + ch).to(tl.float32)
    tl.store(dw_p + prow * (K * K) + (ij[:, None] * K + ij[None, :]), accw * inv_s,
             mask=(ij < K)[:, None] & (ij < K)[None, :])
    return acc * inv_s


@triton.jit
def _dot_rows(xch, roff, xrow, rok, xcol, H, W, sH, sW, ti, acc, accm,
              IN_AFFINE: tl.constexpr, UPCAST: tl.constexpr):
    """(acc + X @ T, accm + M @ T) for X, M of :func:`_x_window` (16-bit x and T on tensor
    cores; UPCAST: the same GEMMs on fp32 copies)."""
    xi, mi = _x_window(xch, roff, xrow, rok, xcol, H, W, sH, sW, UPCAST)
    if UPCAST:
        ti = ti.to(tl.float32)
    acc = tl.dot(xi, ti, acc, input_precision="ieee")
    if IN_AFFINE:
        accm = tl.dot(mi, ti, accm, input_precision="ieee")
    return acc, accm


@triton.jit
def _join_cols(a0, a1, M: tl.constexpr, TW: tl.constexpr, CW: tl.constexpr):
    """The [M, CW] column halves a0 | a1 (a1 only when TW = 2 CW) as the program's
    [1, M * TW] row-major lanes."""
    if TW > CW:
        return tl.reshape(tl.permute(tl.join(a0, a1), (0, 2, 1)), (1, M * TW))
    else:
        return tl.reshape(a0, (1, M * TW))


@triton.jit
def _conv_tc(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, ch, N, H, W, sN, sC, sH, sW, tiles_w,
             tiles_per_img, tiles_total, K: tl.constexpr, PB: tl.constexpr,
             IN_AFFINE: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, KP: tl.constexpr,
             XO: tl.constexpr, CW: tl.constexpr, UPCAST: tl.constexpr, IMG: tl.constexpr):
    """u = dwconv_K(input) + b of channel ``ch`` over the program's TH x TW tile of IMG
    images on tensor cores, as [1, IMG*TH*TW] fp32 (the lanes of :func:`_tile`). UPCAST: the
    same GEMMs on fp32 copies of the 16-bit operands (under the interpreter). The images'
    tiles are stacked along the GEMMs' M (:func:`_tile_rows`): every Toeplitz operand serves
    IMG images, and M = 64 (4 warps) makes them warpgroup GEMMs (wgmma) on sm_90.

    Kernel row i is a GEMM per CW output columns c0 + [0, CW) (docs/DESIGN.md, "Tensor cores"):
    ``u[r, c0 + c] += (X_i @ T_i)[r, c]`` with ``X_i[r, q] = x[h0 + r + i - PB, w0 + c0 - PB -
    XO + q]`` (TH x KP, zero outside the image) and the banded Toeplitz ``T_i[q, c] = W[i, q -
    XO - c]`` for ``0 <= q - XO - c < K`` (KP x CW, the same for c0 = 0 and CW), read whole
    from ``w_ptr``, which holds every channel's T_i (:func:`_toeplitz`: 16-byte loads, where a
    gather from the weights took a masked 2-byte load per element). XO (:func:`_col_shift`)
    starts the rows on a 16-byte boundary: vector loads; CW (:func:`_gemm_cols`) is 16 or the
    whole tile. Columns of X_i outside the band meet zeros of T_i: a non-finite x there (0 *
    inf) reaches the whole output row (docs/DESIGN.md, "Tensor cores"). x and W are 16-bit, so
    every product is exact in the fp32 accumulator: the result is the CUDA-core one up to
    summation order. The input affine ``a*x + c`` is not rounded to 16 bits: the dots take x
    and the in-image mask M (exact 0/1), ``u = a*(X (*) W) + c*(M (*) W) + b``."""
    _, _, n, h0, w0 = _tile_origin(tiles_w, tiles_per_img, tiles_total, TH, TW, IMG)
    M: tl.constexpr = IMG * TH
    r, roff, rok, base = _tile_rows(n, N, sN, TH, IMG)
    q = tl.arange(0, KP)
    col = tl.arange(0, CW)
    xcol = w0 - (PB + XO) + q  # the window of output columns w0 .. w0 + CW - 1 (+ CW)
    trow = w_ptr + ch.to(tl.int64) * (K * KP * CW) + (q[:, None] * CW + col[None, :])
    xch = x_ptr + base + ch.to(tl.int64) * sC
    acc0 = tl.zeros([M, CW], dtype=tl.float32)
    acc1 = tl.zeros([M, CW], dtype=tl.float32)
    accm0 = tl.zeros([M, CW], dtype=tl.float32)
    accm1 = tl.zeros([M, CW], dtype=tl.float32)
    for i in tl.range(K, loop_unroll_factor=K if KP <= 32 else 1):  # (docs/DESIGN.md)
        ti = tl.load(trow + i * (KP * CW))
        xrow = h0 + r + (i - PB)
        acc0, accm0 = _dot_rows(xch, roff, xrow, rok, xcol, H, W, sH, sW, ti, acc0, accm0,
                                IN_AFFINE, UPCAST)
        if TW > CW:
            acc1, accm1 = _dot_rows(xch, roff, xrow, rok, xcol + CW, H, W, sH, sW, ti, acc1,
                                    accm1, IN_AFFINE, UPCAST)
    if IN_AFFINE:
        a = tl.load(scale_ptr + ch).to(tl.float32)
        c = tl.load(shift_ptr + ch).to(tl.float32)
        acc0 = acc0 * a + accm0 * c
        acc1 = acc1 * a + accm1 * c
    return _join_cols(acc0, acc1, M, TW, CW) + tl.load(b_ptr + ch).to(tl.float32)


@triton.jit
def _conv(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, u_ptr, base, c, cmask, h, w, valid, N,
          C, H, W, sN, sC, sH, sW, cb, tiles_w, tiles_per_img, tiles_total, K: tl.constexpr,
          PB: tl.constexpr, IN_AFFINE: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_S: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, TC: tl.constexpr,
          KP: tl.constexpr, XO: tl.constexpr, CW: tl.constexpr, IMG: tl.constexpr,
          U: tl.constexpr):
    """u = dwconv_K(input) + b at (c, h, w) in fp32, zero padding, "same" alignment PB. TC:
    on tensor cores (:func:`_conv_tc`; one channel per program, 16-bit x): TC = 1, or 2 for
    the same algorithm with fp32 operands (the interpreter), w_ptr then holding the Toeplitz
    operands (:func:`_toeplitz`). U (docs/DESIGN.md, "Saved convolution output"): U_CONV
    computes u; U_SAVE also stores it at u_ptr (fp32, x's strides; F1); U_LOAD reads it
    from there instead of computing it (F2, B1, B2a after F1 saved it)."""
    if U == U_LOAD:
        return tl.load(u_ptr + base + _offs(c, h, w, sC, sH, sW),
                       mask=cmask[:, None] & valid[None, :], other=0.0)
    if TC > 0:
        u = _conv_tc(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, cb, N, H, W, sN, sC, sH,
                     sW, tiles_w, tiles_per_img, tiles_total, K, PB, IN_AFFINE, TH, TW, KP,
                     XO, CW, TC == 2, IMG)
    else:
        u = _conv_fma(x_ptr, w_ptr, scale_ptr, shift_ptr, base, c, cmask, h, w, valid, C, H,
                      W, sC, sH, sW, K, PB, IN_AFFINE, BLOCK_C, BLOCK_S)
        u += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    if U == U_SAVE:
        tl.store(u_ptr + base + _offs(c, h, w, sC, sH, sW), u,
                 mask=cmask[:, None] & valid[None, :])
    return u


@triton.jit
def _conv_fma(x_ptr, w_ptr, scale_ptr, shift_ptr, base, c, cmask, h, w, valid, C, H, W, sC, sH,
              sW, K: tl.constexpr, PB: tl.constexpr, IN_AFFINE: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """sum over taps (i, j) of W[c, i, j] * input[c, h + i - PB, w + j - PB] on CUDA cores:
    K*K fp32 FMAs per output, BLOCK_C channels at once, zero padding. w_ptr holds the
    weight as :func:`_fma_weight` lays it out: with several channels (BLOCK_C > 1) tap-major,
    ``[K * K, C]``, so that a tap's weights of the program's channels are one coalesced
    load; with one, channel-major ``[C, K * K]`` (a uniform load per tap either way). With
    several channels each element's tap address is its own pointer plus one scalar per tap
    (fewer instructions and registers there; in NCHW it took more of both: [C])."""
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    if BLOCK_C > 1:  # a pointer per element at its own position; a tap adds one scalar
        p0 = x_ptr + base + _offs(c, h, w, sC, sH, sW)
        row_step = base * 0 + sH  # (64-bit)
    for i in range(K):
        hh = h + (i - PB)
        hok = valid & (hh >= 0) & (hh < H)
        if BLOCK_C > 1:
            prow = p0 + (i - PB) * row_step
        for j in tl.static_range(K):
            ww = w + (j - PB)
            m = cmask[:, None] & (hok & (ww >= 0) & (ww < W))[None, :]
            if BLOCK_C > 1:
                xv = _load_in(prow, (j - PB) * sW, m, scale_ptr, shift_ptr, c, cmask,
                              IN_AFFINE)
                wv = tl.load(w_ptr + (i * K + j) * C + c, mask=cmask, other=0.0)
            else:
                xv = _load_in(x_ptr, base + _offs(c, hh, ww, sC, sH, sW), m, scale_ptr,
                              shift_ptr, c, cmask, IN_AFFINE)
                wv = tl.load(w_ptr + c * (K * K) + (i * K + j), mask=cmask, other=0.0)
            acc += xv * wv.to(tl.float32)[:, None]
    return acc


# --------------------------------------------------------------------------- kernels
@triton.jit
def _stats_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, u_ptr, mean_p, m2_p, count_p, N, C,
                  H, W, sN, sC, sH, sW, tiles_w, tiles_per_img, tiles_total, K: tl.constexpr,
                  PB: tl.constexpr, ACT: tl.constexpr, IN_AFFINE: tl.constexpr, TH: tl.constexpr,
                  TW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, TC: tl.constexpr,
                  KP: tl.constexpr, XO: tl.constexpr, CW: tl.constexpr, IMG: tl.constexpr,
                  U: tl.constexpr):
    row, cb, base, c, cmask, h, w, valid = _tile(N, C, H, W, tiles_w, tiles_per_img,
                                                 tiles_total, sN, TH, TW, BLOCK_C, BLOCK_S, IMG)
    g = _act(_conv(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, u_ptr, base, c, cmask, h, w, valid,
                   N, C, H, W, sN, sC, sH, sW, cb, tiles_w, tiles_per_img, tiles_total, K, PB,
                   IN_AFFINE, BLOCK_C, BLOCK_S, TH, TW, TC, KP, XO, CW, IMG, U), ACT)
    vm = valid[None, :]
    cnt = tl.sum(valid.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(vm, g, 0.0), axis=1) / cnt
    d = tl.where(vm, g - mean[:, None], 0.0)
    m2 = tl.sum(d * d, axis=1)
    prow = row.to(tl.int64) * C + c
    tl.store(mean_p + prow, mean, mask=cmask)
    tl.store(m2_p + prow, m2, mask=cmask)
    if cb == 0:  # counts on the device: no host-built tensor, no copy per call
        tl.store(count_p + row, cnt)


@triton.jit
def _apply_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, u_ptr, mean_ptr, rstd_ptr, gamma_ptr,
                  beta_ptr, out_ptr, N, C, H, W, sN, sC, sH, sW, tiles_w, tiles_per_img,
                  tiles_total, K: tl.constexpr, PB: tl.constexpr, ACT: tl.constexpr,
                  IN_AFFINE: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, TC: tl.constexpr,
                  KP: tl.constexpr, XO: tl.constexpr, CW: tl.constexpr, IMG: tl.constexpr,
                  U: tl.constexpr):
    row, cb, base, c, cmask, h, w, valid = _tile(N, C, H, W, tiles_w, tiles_per_img,
                                                 tiles_total, sN, TH, TW, BLOCK_C, BLOCK_S, IMG)
    g = _act(_conv(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, u_ptr, base, c, cmask, h, w, valid,
                   N, C, H, W, sN, sC, sH, sW, cb, tiles_w, tiles_per_img, tiles_total, K, PB,
                   IN_AFFINE, BLOCK_C, BLOCK_S, TH, TW, TC, KP, XO, CW, IMG, U), ACT)
    a = _load_c(rstd_ptr, c, cmask) * _load_c(gamma_ptr, c, cmask)
    shift = _load_c(beta_ptr, c, cmask) - a * _load_c(mean_ptr, c, cmask)
    offs = base + _offs(c, h, w, sC, sH, sW)
    m = cmask[:, None] & valid[None, :]
    xv = _load_in(x_ptr, offs, m, scale_ptr, shift_ptr, c, cmask, IN_AFFINE)
    tl.store(out_ptr + offs, (xv + a * g + shift).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_reduce_kernel(dout_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, u_ptr, mean_ptr,
                       rstd_ptr, dbeta_p, dgamma_p, N, C, H, W, sN, sC, sH, sW, tiles_w,
                       tiles_per_img, tiles_total, K: tl.constexpr, PB: tl.constexpr,
                       ACT: tl.constexpr, IN_AFFINE: tl.constexpr, TH: tl.constexpr,
                       TW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                       TC: tl.constexpr, KP: tl.constexpr, XO: tl.constexpr,
                       CW: tl.constexpr, IMG: tl.constexpr, U: tl.constexpr):
    row, cb, base, c, cmask, h, w, valid = _tile(N, C, H, W, tiles_w, tiles_per_img,
                                                 tiles_total, sN, TH, TW, BLOCK_C, BLOCK_S, IMG)
    g = _act(_conv(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, u_ptr, base, c, cmask, h, w, valid,
                   N, C, H, W, sN, sC, sH, sW, cb, tiles_w, tiles_per_img, tiles_total, K, PB,
                   IN_AFFINE, BLOCK_C, BLOCK_S, TH, TW, TC, KP, XO, CW, IMG, U), ACT)
    xh = (g - _load_c(mean_ptr, c, cmask)) * _load_c(rstd_ptr, c, cmask)
    m = cmask[:, None] & valid[None, :]
    d = tl.load(dout_ptr + base + _offs(c, h, w, sC, sH, sW), mask=m, other=0.0)
    d = d.to(tl.float32)
    prow = row.to(tl.int64) * C + c
    tl.store(dbeta_p + prow, tl.sum(d, axis=1), mask=cmask)
    tl.store(dgamma_p + prow, tl.sum(tl.where(m, d * xh, 0.0), axis=1), mask=cmask)


@triton.jit
def _bwd_du_kernel(dout_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, u_ptr, mean_ptr, rstd_ptr,
                   gamma_ptr, dbeta_ptr, dgamma_ptr, du_ptr, dulo_ptr, dus_p, db_p, inv_n, N, C, H,
                   W, sN, sC, sH, sW, tiles_w, tiles_per_img, tiles_total, K: tl.constexpr,
                   PB: tl.constexpr, ACT: tl.constexpr, IN_AFFINE: tl.constexpr,
                   BATCH_STATS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, TC: tl.constexpr,
                   KP: tl.constexpr, XO: tl.constexpr, CW: tl.constexpr, SPLIT: tl.constexpr,
                   IMG: tl.constexpr, U: tl.constexpr):
    """du = dg * act'(u) into the scratch: fp32 at du_ptr, or (SPLIT, on tensor cores:
    :func:`_split_du`) as its two 16-bit terms (:func:`_split16`), high at du_ptr and low at
    dulo_ptr, with the tile's db partial taken here from the fp32 values (B2b never sees
    them). float16: the terms of ``s * du``, s the power of two that takes the tile's largest
    |du| into [1, 2) (:func:`_pow2_scale`; the tile is B2b's whole halo, as each image is one
    tile), and 1 / s stored at ``dus_p`` per partial row and channel for B2b to undo."""
    row, cb, base, c, cmask, h, w, valid = _tile(N, C, H, W, tiles_w, tiles_per_img,
                                                 tiles_total, sN, TH, TW, BLOCK_C, BLOCK_S, IMG)
    u = _conv(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, u_ptr, base, c, cmask, h, w, valid, N,
              C, H, W, sN, sC, sH, sW, cb, tiles_w, tiles_per_img, tiles_total, K, PB, IN_AFFINE,
              BLOCK_C, BLOCK_S, TH, TW, TC, KP, XO, CW, IMG, U)
    offs = base + _offs(c, h, w, sC, sH, sW)
    m = cmask[:, None] & valid[None, :]
    d = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
    rstd = _load_c(rstd_ptr, c, cmask)
    scale = _load_c(gamma_ptr, c, cmask) * rstd
    if BATCH_STATS:
        xh = (_act(u, ACT) - _load_c(mean_ptr, c, cmask)) * rstd
        d = d - _load_c(dbeta_ptr, c, cmask) * inv_n \
            - xh * (_load_c(dgamma_ptr, c, cmask) * inv_n)
    du = scale * d * _act_grad(u, ACT)
    if SPLIT:
        if du_ptr.dtype.element_ty == tl.float16:  # one scale per channel of the tile
            sc, inv_sc = _pow2_scale(tl.max(tl.abs(tl.where(m, du, 0.0)), axis=1))
            tl.store(dus_p + row.to(tl.int64) * C + c, inv_sc, mask=cmask)
            hi, lo = _split16(du * sc[:, None], du_ptr.dtype.element_ty, TC == 2)
        else:
            hi, lo = _split16(du, du_ptr.dtype.element_ty, TC == 2)
        tl.store(du_ptr + offs, hi.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(dulo_ptr + offs, lo.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(db_p + row.to(tl.int64) * C + c, tl.sum(tl.where(m, du, 0.0), axis=1),
                 mask=cmask)
    else:
        tl.store(du_ptr + offs, du, mask=m)


@triton.jit
def _bwd_dx_kernel(dout_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, du_ptr, dulo_ptr, dus_p, dx_ptr,
                   dw_p,
                   db_p, dscale_p, dshift_p, N, C, H, W, sN, sC, sH, sW, tiles_w, tiles_per_img,
                   tiles_total, K: tl.constexpr, PB: tl.constexpr, IN_AFFINE: tl.constexpr,
                   TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_S: tl.constexpr, TC: tl.constexpr, KP: tl.constexpr,
                   CW: tl.constexpr, DO: tl.constexpr, MP: tl.constexpr, RP: tl.constexpr,
                   XO: tl.constexpr, KX: tl.constexpr, SPLIT: tl.constexpr,
                   IMG: tl.constexpr):
    """dx = dout + the transposed convolution of du and per-tile db partials: on CUDA cores
    (TC = 0), with the tile's dW partials where it holds one channel (NCHW: a whole plane;
    with several, channels_last, :func:`_bwd_dw_kernel` takes them), or on tensor cores with
    the dW partials
    (:func:`_bwd_tc`; TC as in :func:`_conv`). SPLIT: du comes as B2a's two 16-bit terms
    (float16: scaled, 1 / scale at dus_p), db from B2a."""
    row, cb, base, c, cmask, h, w, valid = _tile(N, C, H, W, tiles_w, tiles_per_img,
                                                 tiles_total, sN, TH, TW, BLOCK_C, BLOCK_S, IMG)
    offs = base + _offs(c, h, w, sC, sH, sW)
    m = cmask[:, None] & valid[None, :]
    prow = row.to(tl.int64) * C + c
    if not SPLIT:
        du = tl.load(du_ptr + offs, mask=m, other=0.0)
        tl.store(db_p + prow, tl.sum(du, axis=1), mask=cmask)
    acc = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if TC > 0:
        acc += _bwd_tc(x_ptr, w_ptr, scale_ptr, shift_ptr, du_ptr, dulo_ptr, dus_p, dw_p,
                       row.to(tl.int64) * C + cb, cb, N, H, W, sN, sC, sH, sW, tiles_w,
                       tiles_per_img, tiles_total, K, PB, IN_AFFINE, TH, TW, KP, CW, DO, MP,
                       RP, XO, KX, SPLIT, TC == 2, IMG)
    else:  # the transposed convolution: the convolution of du with the flipped weight
        # (w_ptr: tap-major, flipped), padded K - 1 - PB before
        acc += _conv_fma(du_ptr, w_ptr, scale_ptr, shift_ptr, base, c, cmask, h, w, valid, C,
                         H, W, sC, sH, sW, K, K - 1 - PB, False, BLOCK_C, BLOCK_S)
        if BLOCK_C == 1:  # dW[i, j] partial of the tile: du * x[q + (i, j) - PB], per tap
            for i in range(K):
                hx = h + (i - PB)
                hx_ok = valid & (hx >= 0) & (hx < H)
                for j in tl.static_range(K):
                    wx = w + (j - PB)
                    mx = cmask[:, None] & (hx_ok & (wx >= 0) & (wx < W))[None, :]
                    xs = _load_in(x_ptr, base + _offs(c, hx, wx, sC, sH, sW), mx, scale_ptr,
                                  shift_ptr, c, cmask, IN_AFFINE)
                    tl.store(dw_p + prow * (K * K) + (i * K + j), tl.sum(du * xs, axis=1),
                             mask=cmask)
    if IN_AFFINE:  # acc is dL/d(block input); the stored input's gradient is in_scale * acc
        xv = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        accm = tl.where(m, acc, 0.0)
        tl.store(dscale_p + prow, tl.sum(accm * xv, axis=1), mask=cmask)
        tl.store(dshift_p + prow, tl.sum(accm, axis=1), mask=cmask)
        acc = acc * _load_c(scale_ptr, c, cmask)
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_dw_kernel(du_ptr, x_ptr, scale_ptr, shift_ptr, dw_p, C, H, W, sN, sC, sH, sW, ROWS,
                   K: tl.constexpr, PB: tl.constexpr, IN_AFFINE: tl.constexpr,
                   LANES: tl.constexpr, TAPS: tl.constexpr):
    """B2's dW partials on CUDA cores in channels_last: ``dw_p[n * chunks + r, c, t]`` = the
    sum over the positions q of image n's r-th chunk of ROWS rows of ``du[n, c, q] *
    input[n, c, q + tap t - PB]`` (input: x, or with the input affine in_scale*x + in_shift;
    zero outside the image). A program owns one chunk, LANES channels and TAPS taps, and
    steps through its positions one by one, each step a 16-byte load along C per tap, adding
    to a ``[LANES, TAPS]`` tile of accumulators: nothing is summed across threads, and the
    partials are one row per chunk (B2b's tiles would give H * W / 32 rows per image and a
    CTA-wide sum per tap). 1-D grid: tap blocks fastest, then row chunks, channel blocks,
    images."""
    pid = tl.program_id(0)
    KK: tl.constexpr = K * K
    n_tb: tl.constexpr = (KK + TAPS - 1) // TAPS
    chunks = tl.cdiv(H, ROWS)
    n_cb = tl.cdiv(C, LANES)
    tb = pid % n_tb
    rest = pid // n_tb
    r = rest % chunks
    rest = rest // chunks
    n = rest // n_cb
    c = (rest % n_cb) * LANES + tl.arange(0, LANES)
    cok = c < C
    t = tb * TAPS + tl.arange(0, TAPS)
    tok = t < KK
    di = t // K - PB
    dj = t % K - PB
    xc = x_ptr + n.to(tl.int64) * sN + (c.to(tl.int64) * sC)[:, None]
    dc = du_ptr + n.to(tl.int64) * sN + c.to(tl.int64) * sC
    acc = tl.zeros([LANES, TAPS], dtype=tl.float32)
    h_lo = (r * ROWS).to(tl.int64)  # the row loop's h: 64-bit offsets h * sH
    for h in range(h_lo, tl.minimum(h_lo + ROWS, H)):
        hh = h + di
        hok = tok & (hh >= 0) & (hh < H)
        for w in range(W):  # 32-bit column offsets w * sW (_dw_plan checks their range)
            ww = w + dj
            m = cok[:, None] & (hok & (ww >= 0) & (ww < W))[None, :]
            v = _load_in(xc, (hh * sH + ww * sW)[None, :], m, scale_ptr, shift_ptr, c, cok,
                         IN_AFFINE)
            d = tl.load(dc + (h * sH + w * sW), mask=cok, other=0.0)
            acc += v * d[:, None]
    prow = (n * chunks + r).to(tl.int64) * C + c
    tl.store(dw_p + prow[:, None] * KK + t[None, :], acc, mask=cok[:, None] & tok[None, :])


# --------------------------------------------------------------------------- launch path
_recorder = None  # set by recording(): launches are handed to it instead of running


@contextlib.contextmanager
def recording(record):
    """Within this context every launch calls ``record(kernel, grid, args, kwargs)`` instead
    of running, and the launchers pick their GPU configuration whatever the tensors' device
    (meta tensors work: nothing is read). Used by the real-target compile check."""
    global _recorder
    prev, _recorder = _recorder, record
    try:
        yield
    finally:
        _recorder = prev


def targets_gpu(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` compiles for a GPU (not the interpreter): the launchers'
    GPU configuration (tiles, stages, dtype flags) applies."""
    return _recorder is not None or (t.is_cuda and not triton_interpreter())


def check_grid(grid, x) -> None:
    """ValueError for a launch beyond the grid limit (shape-only: nothing runs)."""
    if grid[0] > MAX_PROGRAMS:
        raise ValueError(f"convmixer_ext: a tensor of shape {tuple(x.shape)} needs {grid[0]} "
                         f"Triton programs, more than the grid limit of {MAX_PROGRAMS}")


def _launch(kernel, grid, x, args, kwargs):
    if _recorder is not None:
        _recorder(kernel, grid, args, kwargs)
        return
    if grid[0] == 0:
        return
    with _device_of(x):
        kernel[grid](*args, **kwargs)


def _device_of(x):
    """Launch on x's GPU without changing the caller's current device."""
    if x.is_cuda and not triton_interpreter():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The next power of two >= n (0 for 0), as ``triton.next_power_of_2``, which is a
    constexpr function since triton 3.x: each host call through its wrapper cost ~4 us, 35
    a training step (half the launchers' host time)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# --------------------------------------------------------------------------- depthwise launchers
# The tensor-core programs' tiling (:func:`tensor_core_tiling`): images stacked per program,
# and whether every 16 GEMM rows get a warp ("all") or only one image's ("image").
TC_TILINGS = {"1": (1, "image"), "2": (2, "image"), "4": (4, "image"), "2w": (2, "all"),
              "4w": (4, "all")}
# The default, as measured (H200, `passes-NVIDIA_H200-2026-11-27-run10-tilings.json`, bf16
# NCHW, ConvMixer-1536/20's block): "2" took F1 + F2 + B1 + B2 from 2.168 to 2.074 ms at
# k = 3 (every pass faster, F1 9%) and from 3.346 to 3.311 ms at k = 9 (F1 8% faster, F2, B1
# and B2 up to 3% slower); "2w" was the slowest at both (2.231, 3.543).
DEFAULT_TC_TILING = "2"
_tc_tiling = types.SimpleNamespace(images=TC_TILINGS[DEFAULT_TC_TILING][0],
                                   warps=TC_TILINGS[DEFAULT_TC_TILING][1])


@contextlib.contextmanager
def tensor_core_tiling(spec=DEFAULT_TC_TILING):
    """Within this context the tensor-core launchers stack up to ``images`` images' tiles per
    program along the GEMMs' M (at most 64 rows), spec one of :data:`TC_TILINGS`: "1" (one
    image, TH / 16 warps), "2" / "4" (2 / 4 images, the warps of one: each warp takes that
    many row blocks; every Toeplitz operand, index and band reduction serves them all),
    "2w" / "4w" (a warp per 16 rows: M = 64 under 4 warps, warpgroup GEMMs on sm_90).
    The default, :data:`DEFAULT_TC_TILING`, is the one a GPU measured fastest (``python -m
    benchmarks.passes --tc-tilings``): the compiled facts trade instructions per element
    against registers and resident warps (docs/DESIGN.md, "Tensor cores")."""
    if spec not in TC_TILINGS:
        raise ValueError(f"tensor_core_tiling: spec must be one of {sorted(TC_TILINGS)}, "
                         f"got {spec!r}")
    prev = (_tc_tiling.images, _tc_tiling.warps)
    _tc_tiling.images, _tc_tiling.warps = TC_TILINGS[spec]
    try:
        yield
    finally:
        _tc_tiling.images, _tc_tiling.warps = prev


def geometry(shape, strides, tc=False):
    """Tile shape for a [N, C, H, W] tensor with these strides:
    (TH, TW, BLOCK_C, BLOCK_S, num_warps, IMG), a program covering its TH x TW tile in IMG
    consecutive images.

    NCHW (W fastest): one channel, a spatial tile of up to 1024 lanes (a whole 32x32 plane).
    channels_last (C fastest): 32 channels x 32 positions, coalesced along C.
    Tensor cores (``tc``, either layout): one channel, TH x TW of 16 or 32 each, in IMG
    images stacked along the GEMMs' M = IMG * TH (``tl.dot`` needs >= 16; IMG as
    :func:`tensor_core_tiling` sets it, at most what the batch needs and M <= 64),
    BLOCK_S = M * TW, and TH / 16 or M / 16 warps: Triton lays an accumulating loop's GEMMs
    out with every warp along M, 16 rows each, so more warps than M / 16 would compute
    copies of the same rows and of everything after them (the real-target compile checks
    it: ``gemms`` in benchmarks/targets.py).
    """
    N, C, H, W = shape
    if tc:
        th, tw = (32 if H > 16 else 16), (32 if W > 16 else 16)
        img = max(1, min(_tc_tiling.images, 64 // th, _pow2(N)))
        warps = img * th // 16 if _tc_tiling.warps == "all" else th // 16
        return th, tw, 1, img * th * tw, warps, img
    if _lanes_over_c(shape, strides):  # channels_last-like: vectorise over channels
        block_c = min(32, _pow2(C))
        tw = min(8, W)
        th = min(4, H)
    else:
        block_c = 1
        tw = min(W, 64)
        th = min(H, max(1, 1024 // _pow2(tw)))
    block_s = _pow2(th * tw)
    num_warps = 8 if block_c * block_s >= 1024 else 4
    return th, tw, block_c, block_s, num_warps, 1


def _lanes_over_c(shape, strides) -> bool:
    """Whether the CUDA-core kernels put their lanes over channels (channels_last-like
    strides: C fastest) rather than over a channel's spatial positions (NCHW)."""
    return strides[1] == 1 and shape[1] > 1


# The dW kernel's grid aims at this many programs at least (row chunks split each image
# where images x channel blocks give fewer); each chunk adds a partial row of C * K * K.
_DW_MIN_PROGRAMS = 1024


def _dw_plan(x, k):
    """(partial rows, grid, rows per chunk, launch options) of :func:`_bwd_dw_kernel`
    (channels_last): TAPS = K * K padded to a power of two, at most 128 (more in several tap
    blocks), LANES = 32 channels, a warp per 1024 tile elements (1-4: about 32 accumulators a
    thread), and the rows of each image in chunks where images and channel blocks alone give
    fewer than _DW_MIN_PROGRAMS programs."""
    N, C, H, W = x.shape
    if (W + k) * x.stride(3) >= 2**31:  # the kernel's column offsets are 32-bit
        raise ValueError(f"convmixer_ext: the channels_last Triton backward takes rows of "
                         f"fewer than 2^31 elements (W * C), got x of shape {tuple(x.shape)}")
    taps = min(128, _pow2(k * k))
    lanes = min(32, _pow2(C))
    per_img = _cdiv(C, lanes) * _cdiv(k * k, taps)
    chunks = max(1, min(H, _cdiv(_DW_MIN_PROGRAMS, max(1, N * per_img))))
    rows_per_chunk = _cdiv(H, chunks)
    chunks = _cdiv(H, rows_per_chunk)
    grid = (N * chunks * per_img,)
    check_grid(grid, x)
    opts = dict(LANES=lanes, TAPS=taps, num_warps=max(1, min(4, lanes * taps // 1024)))
    return N * chunks, grid, rows_per_chunk, opts


def _fma_weight(weight, x, flip=False):
    """The CUDA-core convolution's weight operand (:func:`_conv_fma`) for a launch over x:
    tap-major ``[K * K, C]`` where a program takes several channels (channels_last: a tap's
    weights of consecutive channels contiguous), else ``[C, K * K]`` as the weight is;
    ``flip``: of the weight rotated by 180 degrees, for the transposed convolution."""
    w = weight.reshape(weight.shape[0], -1)
    w = w.flip(1) if flip else w
    return w.t().contiguous() if _lanes_over_c(x.shape, x.stride()) else w.contiguous()


def _plan(x, tc=False):
    """(partial rows, grid, common args, tile constexprs, launch options) of a launch over x:
    a partial row per program and channel block (one tile of IMG images)."""
    N, C, H, W = x.shape
    th, tw, block_c, block_s, num_warps, img = geometry(x.shape, x.stride(), tc)
    tiles_w = _cdiv(W, tw)
    tiles_per_img = _cdiv(H, th) * tiles_w
    rows = _cdiv(N, img) * tiles_per_img
    grid = (rows * _cdiv(C, block_c),)
    check_grid(grid, x)
    common = (N, C, H, W, *x.stride(), tiles_w, tiles_per_img, rows)
    tile = dict(TH=th, TW=tw, BLOCK_C=block_c, BLOCK_S=block_s, IMG=img, num_warps=num_warps)
    return rows, grid, common, tile


def num_partial_rows(x, tc=False) -> int:
    return _plan(x, tc)[0]


def _kc(weight, in_scale):
    k = weight.shape[-1]
    return dict(K=k, PB=pad_before(k), IN_AFFINE=in_scale is not None)


def _col_shift(pb, elem_bytes):
    """Columns a tensor-core row window starts early so that it starts on a 16-byte boundary
    (w0 - pb - shift is a multiple of 16 / elem_bytes; w0 is one with TW = 16 or 32)."""
    return -pb % (16 // elem_bytes)


def _gemm_cols(tw, k, shift):
    """(CW, KP) of tensor-core GEMMs over a TW-wide tile: the output columns each covers and
    its reduction width, the CW + k - 1 input columns after ``shift`` padded to a power of
    two >= 16. CW = 16 (both halves of a 32-wide tile share one KP x 16 Toeplitz operand), or
    the whole tile where that needs no wider KP (k >= 19 at TW = 32: half the row windows,
    twice the Toeplitz elements). The forward passes take TW = 16 here, always 16 columns:
    their row windows are cheap 16-byte vector loads, and twice the Toeplitz bytes per
    kernel row would come from L2; B2's fp32 du windows cost a 16-bit split per element and
    take the wider GEMM."""
    kp = lambda cw: max(16, _pow2(cw + k - 1 + shift))  # noqa: E731
    cw = tw if kp(tw) == kp(16) else 16
    return cw, kp(cw)


def _conv_kw(x, weight, tc):
    """The convolution's constexprs: TC (0: CUDA cores; 1: tensor cores; 2: their algorithm
    with fp32 operands, under the interpreter), XO (:func:`_col_shift` of the x rows), CW
    and KP (:func:`_gemm_cols`)."""
    if not tc:
        return dict(TC=0, KP=16, XO=0, CW=16)
    if x.dtype not in TENSOR_CORE_DTYPES:
        raise TypeError(f"the tensor-core convolution takes float16 or bfloat16 x, got "
                        f"{x.dtype} (float32 stays on exact FP32 FMA: backend='triton')")
    k = weight.shape[-1]
    xo = _col_shift(pad_before(k), x.element_size())
    cw, kp = _gemm_cols(16, k, xo)
    return dict(TC=1 if targets_gpu(x) else 2, XO=xo, CW=cw, KP=kp)


def _toeplitz(weight, KP, XO, CW, flip=False):
    """[C, K * KP * CW]: every channel's and kernel row's banded Toeplitz operand of
    :func:`_conv_tc`, ``T[c, i, q, j] = W[c, i, q - XO - j]`` inside the band, 0 outside
    (``flip``: of W with its columns reversed, for B2's transposed convolution). Two device
    ops per launch, no index tensor: each kernel row's weights zero-padded to a row P of
    KP + CW - 1, whose Hankel view ``P[q + j']`` (strides 1, 1) reversed along one axis is
    the Toeplitz matrix (``j' = CW - 1 - j``; flipped: ``q' = KP - 1 - q``), copied once."""
    C, k = weight.shape[0], weight.shape[-1]
    lead = KP - k - XO if flip else XO + CW - 1  # zeros before each row's k weights
    p = torch.nn.functional.pad(weight.reshape(C, k, k), (lead, KP + CW - 1 - lead - k))
    hankel = p.as_strided((C, k, KP, CW), (k * p.shape[-1], p.shape[-1], 1, 1))
    return hankel.flip(-2 if flip else -1).reshape(C, k * KP * CW)


def _conv_weight(weight, x, kw):
    """What the convolution's w_ptr takes: the weight as :func:`_fma_weight` lays it out, or
    on tensor cores its Toeplitz operands."""
    return _toeplitz(weight, kw["KP"], kw["XO"], kw["CW"]) if kw["TC"] else _fma_weight(weight, x)


def _split_du(x, tc, tile) -> bool:
    """Whether B2a stores du as its two 16-bit terms, on tensor cores: bfloat16 always;
    float16 (whose range is not fp32's: the terms are of du scaled by a power of two) where
    each image is one tile of the launch (``tile``: :func:`_plan`'s), so that a B2a
    program's tile is the B2b program's whole halo and B2a can pick the scale B2b's halo
    needs; larger images keep the fp32 scratch, which B2b scales halo by halo."""
    if not tc or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return x.dtype == torch.bfloat16 or (x.shape[2] <= tile["TH"] and x.shape[3] <= tile["TW"])


def _bwd_conv_kw(x, weight, tile, tc, kw):
    """B2b's constexprs: TC as in :func:`_conv_kw`, SPLIT (:func:`_split_du`), DO
    (:func:`_col_shift` of the transposed convolution's du rows: 16-bit ones where that
    needs no wider GEMM, else 4-byte aligned), their CW and KP (:func:`_gemm_cols`), MP
    (dW's rows and columns: k padded to a power of two >= 16), RP (the halo's rows TH + k - 1,
    padded to a power of two), XO and KX (the forward's x row windows, :func:`_conv_kw`'s XO
    and KP, at least 32: dW's GEMMs take them, 16 rows, and at 16 columns (k = 1) both warps
    would compute the same 16 x 16); kw: :func:`_conv_kw`'s."""
    k = weight.shape[-1]
    split = _split_du(x, tc, tile)
    if tc:
        pa = k - 1 - pad_before(k)  # the transposed convolution's padding before
        do = _col_shift(pa, 4)
        cw, kp = _gemm_cols(tile["TW"], k, do)
        if split and _gemm_cols(tile["TW"], k, _col_shift(pa, 2)) == (cw, kp):
            do = _col_shift(pa, 2)
    else:
        do, cw, kp = 0, kw["CW"], kw["KP"]
    return dict(TC=kw["TC"], CW=cw, KP=kp, DO=do, MP=max(16, _pow2(k)),
                RP=_pow2(tile["TH"] + k - 1), XO=kw["XO"],
                KX=max(32, kw["KP"]),
                SPLIT=split)


def _affine_ptrs(stand_in, in_scale, in_shift):
    """Pointers for the input affine; a stand-in tensor (never read) when there is none."""
    return (stand_in, stand_in) if in_scale is None else (in_scale, in_shift)


def _f32(x, *shape):
    return torch.empty(shape, device=x.device, dtype=torch.float32)


def _conv_args(x, weight, u, mode, tc):
    """(w_ptr, u_ptr, constexprs U, TC, XO, CW, KP) of a pass's convolution: computed (u
    None), computed and saved into u (``mode`` U_SAVE), or read from u (U_LOAD: the
    weight's Toeplitz operands are then neither built nor read)."""
    kw = _conv_kw(x, weight, tc)
    if u is None:
        return _conv_weight(weight, x, kw), x, dict(U=U_CONV.value, **kw)
    check_saved_u(u, x)
    w_arg = weight if mode is U_LOAD else _conv_weight(weight, x, kw)
    return w_arg, u, dict(U=mode.value, **kw)


def k_stats(x, weight, bias, in_scale, in_shift, act, u=None, tc=False):
    """F1's partials; ``u`` (optional): where F1 also saves the convolution output."""
    rows, grid, common, tile = _plan(x, tc)
    C = x.shape[1]
    mean_p, m2_p, count_p = _f32(x, rows, C), _f32(x, rows, C), _f32(x, rows)
    w_arg, u_arg, kw = _conv_args(x, weight, u, U_SAVE, tc)
    _launch(_stats_kernel, grid, x,
            (x, w_arg, bias, *_affine_ptrs(x, in_scale, in_shift), u_arg, mean_p, m2_p,
             count_p, *common),
            dict(_kc(weight, in_scale), ACT=act, **kw, **tile))
    return mean_p, m2_p, count_p


def k_apply(x, weight, bias, mean, rstd, gamma, beta, in_scale, in_shift, act, u=None,
            tc=False):
    """F2 (and eval); ``u`` (optional): F1's saved convolution output, read instead of
    computed."""
    _, grid, common, tile = _plan(x, tc)
    out = torch.empty_like(x)
    w_arg, u_arg, kw = _conv_args(x, weight, u, U_LOAD, tc)
    _launch(_apply_kernel, grid, x,
            (x, w_arg, bias, *_affine_ptrs(x, in_scale, in_shift), u_arg, mean, rstd, gamma,
             beta, out, *common),
            dict(_kc(weight, in_scale), ACT=act, **kw, **tile))
    return out


def k_bwd_reduce(dout, x, weight, bias, mean, rstd, in_scale, in_shift, act, u=None,
                 tc=False):
    rows, grid, common, tile = _plan(x, tc)
    C = x.shape[1]
    dbeta_p, dgamma_p = _f32(x, rows, C), _f32(x, rows, C)
    w_arg, u_arg, kw = _conv_args(x, weight, u, U_LOAD, tc)
    _launch(_bwd_reduce_kernel, grid, x,
            (dout, x, w_arg, bias, *_affine_ptrs(x, in_scale, in_shift), u_arg, mean, rstd,
             dbeta_p, dgamma_p, *common),
            dict(_kc(weight, in_scale), ACT=act, **kw, **tile))
    return dbeta_p, dgamma_p


def k_bwd_main(dout, x, weight, bias, mean, rstd, gamma, dbeta, dgamma, batch_stats, in_scale,
               in_shift, act, u=None, tc=False):
    N, C, H, W = x.shape
    k = weight.shape[-1]
    rows, grid, common, tile = _plan(x, tc)
    w_arg, u_arg, kw = _conv_args(x, weight, u, U_LOAD, tc)
    bkw = _bwd_conv_kw(x, weight, tile, tc, kw)
    split = bkw["SPLIT"]
    if split:  # du's high and low 16-bit terms (the bytes of one fp32 scratch)
        du, dulo = torch.empty_like(x), torch.empty_like(x)
    else:
        du = dulo = torch.empty_like(x, dtype=torch.float32)
    db_p = _f32(x, rows, C)
    # float16 split: 1 / the scale of each partial row and channel (else never read)
    dus_p = _f32(x, rows, C) if split and x.dtype == torch.float16 else db_p
    _launch(_bwd_du_kernel, grid, x,
            (dout, x, w_arg, bias, *_affine_ptrs(x, in_scale, in_shift), u_arg, mean, rstd,
             gamma, dbeta, dgamma, du, dulo, dus_p, db_p, 1.0 / max(N * H * W, 1), *common),
            dict(_kc(weight, in_scale), ACT=act, BATCH_STATS=bool(batch_stats), **kw, **tile,
                 SPLIT=split))
    dx = torch.empty_like(x)
    n_aff = rows if in_scale is not None else 0
    dscale_p, dshift_p = _f32(x, n_aff, C), _f32(x, n_aff, C)
    # dW: on tensor cores and in NCHW by B2b per tile, else (channels_last on CUDA cores: a
    # tile of several channels, BLOCK_C > 1) by its own kernel, per image
    dw_kernel = not tc and tile["BLOCK_C"] > 1
    if dw_kernel:
        dw_rows, dw_grid, dw_chunk, dw_opts = _dw_plan(x, k)
        dw_p = _f32(x, dw_rows, C, k * k)
    else:
        dw_p = _f32(x, rows, C, k * k)
    if tc:
        wt = _toeplitz(weight, bkw["KP"], bkw["DO"], bkw["CW"], flip=True)
    else:
        wt = _fma_weight(weight, x, flip=True)
    _launch(_bwd_dx_kernel, grid, x,
            (dout, x, wt, *_affine_ptrs(x, in_scale, in_shift), du, dulo, dus_p, dx, dw_p, db_p,
             *_affine_ptrs(db_p, dscale_p if n_aff else None, dshift_p), *common),
            dict(_kc(weight, in_scale), **bkw, **tile))
    if dw_kernel:
        _launch(_bwd_dw_kernel, dw_grid, x,
                (du, x, *_affine_ptrs(x, in_scale, in_shift), dw_p, C, H, W, *x.stride(),
                 dw_chunk), dict(_kc(weight, in_scale), **dw_opts))
    return dx, dw_p, db_p, dscale_p, dshift_p


# The launchers with every convolution on tensor cores (backend "triton_tc"): F1, F2/eval,
# B1, B2's du, its transposed convolution and dW.
tensor_core_launchers = types.SimpleNamespace(
    **{f.__name__: functools.partial(f, tc=True)
       for f in (k_stats, k_apply, k_bwd_reduce, k_bwd_main)})


# --------------------------------------------------------------------------- pointwise GEMM
@triton.jit
def _pw_u(y_ptr, w_ptr, b_ptr, pid_p, pid_n, P, CI, CO, HW, W, sN, sC, sH, sW,
          PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_P: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """u[p, o] = sum_i y[p, i] w[o, i] + b[o] (fp32) on one [BLOCK_P, BLOCK_N] tile, where
    p = (n, h, w) are positions of y [N, CI, H, W] read through its strides."""
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rmask = rows < P
    n = rows // HW
    hw = rows % HW
    rbase = n.to(tl.int64) * sN + (hw // W).to(tl.int64) * sH + (hw % W).to(tl.int64) * sW
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < CO
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, CI, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < CI
        a = tl.load(y_ptr + rbase[:, None] + ks.to(tl.int64)[None, :] * sC,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        bt = tl.load(w_ptr + cols.to(tl.int64)[None, :] * CI + ks[:, None],
                     mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:  # fp32 operands (fp32 inputs, or 16-bit ones under the interpreter)
            acc += tl.dot(a.to(tl.float32), bt.to(tl.float32), input_precision=PRECISION)
        else:  # 16-bit operands on tensor cores, fp32 accumulation
            acc += tl.dot(a, bt)
    u = acc + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return u, rows, rmask, n, hw, cols, cmask


@triton.jit
def _pw_tile_ids(CO, BLOCK_N: tl.constexpr):
    """(row tile, column tile) of this program. One-dimensional grid, columns fastest:
    the programs sharing a tile of y run together, so y is read from HBM about once (its
    tile stays in L2 while every column block uses it) and the weight, small, stays in L2."""
    pid = tl.program_id(0)
    n_col = tl.cdiv(CO, BLOCK_N)
    return pid // n_col, pid % n_col


@triton.jit
def _pos_offs(n, hw, W, cols, oN, oC, oH, oW):
    """[BLOCK_P, BLOCK_N] offsets of positions (n, hw) and channels cols in a 4-D tensor."""
    return (n.to(tl.int64) * oN + (hw // W).to(tl.int64) * oH
            + (hw % W).to(tl.int64) * oW)[:, None] + cols.to(tl.int64)[None, :] * oC


@triton.jit
def _pw_gemm_kernel(y_ptr, w_ptr, b_ptr, g_ptr, mean_p, m2_p, count_p, P, CI, CO, HW, W, sN,
                    sC, sH, sW, oN, oC, oH, oW, ACT: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """g = act(u) stored through g's strides (o*), with the per-(row tile, channel) mean and
    centred M2 of g (BN2 statistics, from the fp32 values) and the row tile's count."""
    pid_p, pid_n = _pw_tile_ids(CO, BLOCK_N)
    u, rows, rmask, n, hw, cols, cmask = _pw_u(y_ptr, w_ptr, b_ptr, pid_p, pid_n,
                                               P, CI, CO, HW, W, sN, sC, sH, sW, PRECISION,
                                               UPCAST, BLOCK_P, BLOCK_N, BLOCK_K)
    g = _act(u, ACT)
    m = rmask[:, None] & cmask[None, :]
    tl.store(g_ptr + _pos_offs(n, hw, W, cols, oN, oC, oH, oW),
             g.to(g_ptr.dtype.element_ty), mask=m)
    cnt = tl.sum(rmask.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(m, g, 0.0), axis=0) / cnt
    d = tl.where(m, g - mean[None, :], 0.0)
    prow = pid_p.to(tl.int64) * CO + cols
    tl.store(mean_p + prow, mean, mask=cmask)
    tl.store(m2_p + prow, tl.sum(d * d, axis=0), mask=cmask)
    if pid_n == 0:
        tl.store(count_p + pid_p, cnt)


@triton.jit
def _pw_bwd_du_kernel(y_ptr, w_ptr, b_ptr, dg_ptr, dmean_ptr, dvar_ptr, mean_ptr, du_ptr, db_p,
                      inv_p, P, CI, CO, HW, W, sN, sC, sH, sW, dN, dC, dH, dW, ACT: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """du = (dg + dmean/P + dvar*2(g-mean)/P) * act'(u) with u recomputed (never stored in
    the forward); du stored as rows [P, CO] in du's dtype, per-row-tile db partials."""
    pid_p, pid_n = _pw_tile_ids(CO, BLOCK_N)
    u, rows, rmask, n, hw, cols, cmask = _pw_u(y_ptr, w_ptr, b_ptr, pid_p, pid_n,
                                               P, CI, CO, HW, W, sN, sC, sH, sW, PRECISION,
                                               UPCAST, BLOCK_P, BLOCK_N, BLOCK_K)
    m = rmask[:, None] & cmask[None, :]
    d = tl.load(dg_ptr + _pos_offs(n, hw, W, cols, dN, dC, dH, dW), mask=m,
                other=0.0).to(tl.float32)
    dmean = tl.load(dmean_ptr + cols, mask=cmask, other=0.0)[None, :]
    dvar = tl.load(dvar_ptr + cols, mask=cmask, other=0.0)[None, :]
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :]
    d = d + dmean * inv_p + (_act(u, ACT) - mean) * (2.0 * inv_p * dvar)
    du = tl.where(m, d * _act_grad(u, ACT), 0.0)
    tl.store(du_ptr + rows.to(tl.int64)[:, None] * CO + cols[None, :],
             du.to(du_ptr.dtype.element_ty), mask=m)
    tl.store(db_p + pid_p.to(tl.int64) * CO + cols, tl.sum(du, axis=0), mask=cmask)


def pw_config(y):
    """GEMM tile and launch options: 128x128x32 tiles, 8 warps, 3 pipeline stages on a GPU
    (the usual shape for large tensor-core GEMMs); 64x64x32 in the interpreter, where tile
    size only costs time. ``CONVMIXER_EXT_PW_TILE=PxNxK`` overrides the tile (tests run
    the GPU tile under the interpreter this way)."""
    on_gpu = targets_gpu(y)
    bp, bn, bk = (128, 128, 32) if on_gpu else (64, 64, 32)
    env = os.environ.get("CONVMIXER_EXT_PW_TILE")
    if env:
        bp, bn, bk = (int(v) for v in env.lower().split("x"))
    cfg = dict(BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=bk, num_warps=8 if bp * bn >= 128 * 128 else 4)
    if on_gpu:
        cfg["num_stages"] = 3
    # fp32 operands: TF32 tensor cores where PyTorch's own 1x1 convolution uses them
    # (torch.backends.cudnn.allow_tf32, on by default), IEEE fp32 products otherwise, so
    # results and speed follow eager's. The interpreter's dot mishandles bf16/fp16 operands,
    # so there they are upcast first (bf16/fp16 products are exact in fp32: the same result
    # as tensor cores give).
    cfg["UPCAST"] = y.dtype == torch.float32 or not on_gpu
    tf32 = on_gpu and y.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    cfg["PRECISION"] = "tf32" if tf32 else "ieee"
    return cfg


def _pw_geometry(y, w2):
    """(positions P, output channels CO, config, row tiles T, 1-D grid over row x column
    tiles) of a pointwise GEMM launch."""
    N, _, H, W = y.shape
    P, CO, cfg = N * H * W, w2.shape[0], pw_config(y)
    if P >= 2**31:  # row indices are 32-bit in the kernel
        raise ValueError(f"convmixer_ext: the pointwise GEMM takes fewer than 2^31 positions "
                         f"(N*H*W), got {P} for y of shape {tuple(y.shape)}")
    T = _cdiv(P, cfg["BLOCK_P"])
    grid = (T * _cdiv(CO, cfg["BLOCK_N"]),)
    check_grid(grid, y)
    return P, CO, cfg, T, grid


def pw_gemm_act_stats(y, w2, bias, g, act):
    """Fill g [N, Co, H, W] (any strides) with act(conv1x1(y) + b) for y [N, Ci, H, W] (any
    strides), w2 [Co, Ci] dense; return (mean_p [T, Co], m2_p [T, Co], count_p [T])."""
    CI, H, W = y.shape[1:]
    P, CO, cfg, T, grid = _pw_geometry(y, w2)
    mean_p, m2_p, count_p = _f32(y, T, CO), _f32(y, T, CO), _f32(y, T)
    _launch(_pw_gemm_kernel, grid, y,
            (y, w2, bias, g, mean_p, m2_p, count_p, P, CI, CO, H * W, W, *y.stride(),
             *g.stride()),
            dict(ACT=act, **cfg))
    return mean_p, m2_p, count_p


def pw_bwd_du(dg, dmean, dvar, y, w2, bias, mean, act):
    """(du [P, Co] rows in y's dtype, db_p [T, Co]) for the pointwise block's backward
    (dmean, dvar, mean: dense float32 vectors)."""
    CI, H, W = y.shape[1:]
    P, CO, cfg, T, grid = _pw_geometry(y, w2)
    du = torch.empty((P, CO), device=y.device, dtype=y.dtype)
    db_p = _f32(y, T, CO)
    _launch(_pw_bwd_du_kernel, grid, y,
            (y, w2, bias, dg, dmean, dvar, mean, du, db_p, 1.0 / max(P, 1), P, CI, CO, H * W,
             W, *y.stride(), *dg.stride()),
            dict(ACT=act, **cfg))
    return du, db_p


# (after the kernels: triton.jit read TRITON_INTERPRET as it defined them)
_INTERPRETED = type(_apply_kernel).__name__ == "InterpretedFunction"
