"""The "triton" backend: fused depthwise block kernels (DESIGN.md §2-3) in Triton.

One tile shape serves every kernel: a program owns ``BLOCK_C`` channels of one image
and a ``TH x TW`` spatial tile, flattened to ``BLOCK_S`` lanes. All tensors are indexed
through their own strides (64-bit), so NCHW-contiguous, channels_last and other strided
layouts are read natively — the tile shape is picked per layout (one channel and a
whole plane for NCHW; many channels and a small spatial tile for channels_last).

Kernels (all recompute ``u = dwconv(x) + b`` instead of storing it):
- ``_stats_kernel``   F1: per-tile mean and centred M2 of ``g = act(u)`` per channel;
- ``_apply_kernel``   F2 / eval: ``out = x + gamma*(g-mean)*rstd + beta``;
- ``_bwd_reduce_kernel`` B1: per-tile ``sum(dout)``, ``sum(dout*xhat)``;
- ``_bwd_du_kernel``  B2a: ``du = dg * act'(u)`` (fp32 scratch);
- ``_bwd_dx_kernel``  B2b: ``dx = dout + conv_transpose(du, W)``, per-tile ``db``, ``dW``;
- ``_pw_gemm_kernel`` the pointwise block's GEMM with bias/activation/BN2-statistics
  epilogue (:mod:`convmixer_ext.pointwise`).
Triton has no addressable shared memory, so the transposed convolution reads ``du`` from
an fp32 scratch tensor rather than recomputing it on the halo (the CUDA kernels keep it
in shared memory). Per-tile partials are reduced in a fixed order by ``_partials``:
no float atomics, deterministic.

With ``TRITON_INTERPRET=1`` set before triton is imported, the same kernels run on CPU
tensors in Triton's interpreter (how CI proves them).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from ._partials import KernelBackend
from .backends import triton_interpreter
from .semantics import GELU_TANH_COEF, pad_before

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --------------------------------------------------------------------------- device helpers
@triton.jit
def _tanh(z):
    # tanh through exp (portable to every Triton version and the interpreter).
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _act(u, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * u * (1.0 + tl.math.erf(u * _INV_SQRT_2))
    elif ACT == 1:
        return 0.5 * u * (1.0 + _tanh(_SQRT_2_OVER_PI * (u + GELU_TANH_COEF * u * u * u)))
    else:
        return tl.maximum(u, 0.0)


@triton.jit
def _act_grad(u, ACT: tl.constexpr):
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(u * _INV_SQRT_2))
        return cdf + u * tl.exp(-0.5 * u * u) * _INV_SQRT_2PI
    elif ACT == 1:
        t = _tanh(_SQRT_2_OVER_PI * (u + GELU_TANH_COEF * u * u * u))
        dt = _SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEF * u * u)
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * dt
    else:
        return tl.where(u > 0.0, 1.0, 0.0)


@triton.jit
def _tile(C, H, W, tiles_w, tiles_per_img, sN, TH: tl.constexpr, TW: tl.constexpr,
          BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's image base offset (int64), channels, tile rows/cols and masks."""
    pid = tl.program_id(0)
    n = pid // tiles_per_img
    t = pid % tiles_per_img
    h0 = (t // tiles_w) * TH
    w0 = (t % tiles_w) * TW
    s = tl.arange(0, BLOCK_S)
    h = h0 + s // TW
    w = w0 + s % TW
    valid = (s < TH * TW) & (h < H) & (w < W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = n.to(tl.int64) * sN
    return pid, base, c, cmask, h, w, valid


@triton.jit
def _offs(c, h, w, sC, sH, sW):
    """[BLOCK_C, BLOCK_S] element offsets (64-bit) of channels c at positions (h, w)."""
    return (c.to(tl.int64) * sC)[:, None] + (h.to(tl.int64) * sH + w.to(tl.int64) * sW)[None, :]


@triton.jit
def _load_c(ptr, c, cmask):
    return tl.load(ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _load_in(x_ptr, offs, m, pa_ptr, pc_ptr, c, cmask, PRE: tl.constexpr):
    """The block input at offs in fp32, 0 where masked (the zero padding): x, or with a
    folded affine (PRE) a*x + c per channel."""
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if PRE:
        v = tl.where(m, v * _load_c(pa_ptr, c, cmask) + _load_c(pc_ptr, c, cmask), 0.0)
    return v


@triton.jit
def _conv(x_ptr, w_ptr, b_ptr, pa_ptr, pc_ptr, base, c, cmask, h, w, valid, H, W, sC, sH,
          sW, K: tl.constexpr, PB: tl.constexpr, PRE: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_S: tl.constexpr):
    """u = dwconv_K(input) + b at (c, h, w) in fp32, zero padding, "same" alignment PB."""
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for i in range(K):
        hh = h + (i - PB)
        hok = valid & (hh >= 0) & (hh < H)
        for j in tl.static_range(K):
            ww = w + (j - PB)
            m = hok & (ww >= 0) & (ww < W)
            xv = _load_in(x_ptr, base + _offs(c, hh, ww, sC, sH, sW),
                          cmask[:, None] & m[None, :], pa_ptr, pc_ptr, c, cmask, PRE)
            wv = tl.load(w_ptr + c * (K * K) + (i * K + j), mask=cmask, other=0.0)
            acc += xv * wv.to(tl.float32)[:, None]
    bv = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    return acc + bv[:, None]


# --------------------------------------------------------------------------- kernels
@triton.jit
def _stats_kernel(x_ptr, w_ptr, b_ptr, pa_ptr, pc_ptr, mean_p, m2_p, C, H, W, sN, sC, sH, sW,
                  tiles_w, tiles_per_img, K: tl.constexpr, PB: tl.constexpr,
                  ACT: tl.constexpr, PRE: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid, base, c, cmask, h, w, valid = _tile(C, H, W, tiles_w, tiles_per_img, sN, TH, TW,
                                             BLOCK_C, BLOCK_S)
    g = _act(_conv(x_ptr, w_ptr, b_ptr, pa_ptr, pc_ptr, base, c, cmask, h, w, valid, H, W,
                   sC, sH, sW, K, PB, PRE, BLOCK_C, BLOCK_S), ACT)
    vm = valid[None, :]
    cnt = tl.sum(valid.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(vm, g, 0.0), axis=1) / cnt
    d = tl.where(vm, g - mean[:, None], 0.0)
    m2 = tl.sum(d * d, axis=1)
    row = pid.to(tl.int64) * C + c
    tl.store(mean_p + row, mean, mask=cmask)
    tl.store(m2_p + row, m2, mask=cmask)


@triton.jit
def _apply_kernel(x_ptr, w_ptr, b_ptr, pa_ptr, pc_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, out_ptr,
                  C, H, W, sN, sC, sH, sW, tiles_w, tiles_per_img, K: tl.constexpr,
                  PB: tl.constexpr, ACT: tl.constexpr, PRE: tl.constexpr, TH: tl.constexpr,
                  TW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid, base, c, cmask, h, w, valid = _tile(C, H, W, tiles_w, tiles_per_img, sN, TH, TW,
                                             BLOCK_C, BLOCK_S)
    g = _act(_conv(x_ptr, w_ptr, b_ptr, pa_ptr, pc_ptr, base, c, cmask, h, w, valid, H, W,
                   sC, sH, sW, K, PB, PRE, BLOCK_C, BLOCK_S), ACT)
    a = _load_c(rstd_ptr, c, cmask) * _load_c(gamma_ptr, c, cmask)
    shift = _load_c(beta_ptr, c, cmask) - a * _load_c(mean_ptr, c, cmask)
    offs = base + _offs(c, h, w, sC, sH, sW)
    m = cmask[:, None] & valid[None, :]
    xv = _load_in(x_ptr, offs, m, pa_ptr, pc_ptr, c, cmask, PRE)
    tl.store(out_ptr + offs, (xv + a * g + shift).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_reduce_kernel(dout_ptr, x_ptr, w_ptr, b_ptr, pa_ptr, pc_ptr, mean_ptr, rstd_ptr, dbeta_p, dgamma_p,
                       C, H, W, sN, sC, sH, sW, tiles_w, tiles_per_img, K: tl.constexpr,
                       PB: tl.constexpr, ACT: tl.constexpr, PRE: tl.constexpr,
                       TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_S: tl.constexpr):
    pid, base, c, cmask, h, w, valid = _tile(C, H, W, tiles_w, tiles_per_img, sN, TH, TW,
                                             BLOCK_C, BLOCK_S)
    g = _act(_conv(x_ptr, w_ptr, b_ptr, pa_ptr, pc_ptr, base, c, cmask, h, w, valid, H, W,
                   sC, sH, sW, K, PB, PRE, BLOCK_C, BLOCK_S), ACT)
    xh = (g - _load_c(mean_ptr, c, cmask)) * _load_c(rstd_ptr, c, cmask)
    m = cmask[:, None] & valid[None, :]
    d = tl.load(dout_ptr + base + _offs(c, h, w, sC, sH, sW), mask=m, other=0.0)
    d = d.to(tl.float32)
    row = pid.to(tl.int64) * C + c
    tl.store(dbeta_p + row, tl.sum(d, axis=1), mask=cmask)
    tl.store(dgamma_p + row, tl.sum(tl.where(m, d * xh, 0.0), axis=1), mask=cmask)


@triton.jit
def _bwd_du_kernel(dout_ptr, x_ptr, w_ptr, b_ptr, pa_ptr, pc_ptr, mean_ptr, rstd_ptr, gamma_ptr, dbeta_ptr,
                   dgamma_ptr, du_ptr, inv_n, C, H, W, sN, sC, sH, sW, tiles_w,
                   tiles_per_img, K: tl.constexpr, PB: tl.constexpr, ACT: tl.constexpr,
                   PRE: tl.constexpr, BATCH_STATS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid, base, c, cmask, h, w, valid = _tile(C, H, W, tiles_w, tiles_per_img, sN, TH, TW,
                                             BLOCK_C, BLOCK_S)
    u = _conv(x_ptr, w_ptr, b_ptr, pa_ptr, pc_ptr, base, c, cmask, h, w, valid, H, W, sC, sH,
              sW, K, PB, PRE, BLOCK_C, BLOCK_S)
    offs = base + _offs(c, h, w, sC, sH, sW)
    m = cmask[:, None] & valid[None, :]
    d = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
    rstd = _load_c(rstd_ptr, c, cmask)
    scale = _load_c(gamma_ptr, c, cmask) * rstd
    if BATCH_STATS:
        xh = (_act(u, ACT) - _load_c(mean_ptr, c, cmask)) * rstd
        d = d - _load_c(dbeta_ptr, c, cmask) * inv_n - xh * (_load_c(dgamma_ptr, c, cmask) * inv_n)
    du = scale * d * _act_grad(u, ACT)
    tl.store(du_ptr + offs, du, mask=m)


@triton.jit
def _bwd_dx_kernel(dout_ptr, x_ptr, w_ptr, pa_ptr, pc_ptr, du_ptr, dx_ptr, dw_p, db_p, da_p,
                   dc_p, C, H, W, sN, sC, sH, sW, tiles_w, tiles_per_img, K: tl.constexpr,
                   PB: tl.constexpr, PRE: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid, base, c, cmask, h, w, valid = _tile(C, H, W, tiles_w, tiles_per_img, sN, TH, TW,
                                             BLOCK_C, BLOCK_S)
    offs = base + _offs(c, h, w, sC, sH, sW)
    m = cmask[:, None] & valid[None, :]
    du = tl.load(du_ptr + offs, mask=m, other=0.0)
    row = pid.to(tl.int64) * C + c
    tl.store(db_p + row, tl.sum(du, axis=1), mask=cmask)
    acc = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
    for i in range(K):
        # dx[q] += du[q + PB - i] * w[i]   (transposed conv);  dW[i] += du[q] * x[q + i - PB]
        hd = h + (PB - i)
        hx = h + (i - PB)
        hd_ok = valid & (hd >= 0) & (hd < H)
        hx_ok = valid & (hx >= 0) & (hx < H)
        for j in tl.static_range(K):
            wd = w + (PB - j)
            wx = w + (j - PB)
            md = cmask[:, None] & (hd_ok & (wd >= 0) & (wd < W))[None, :]
            mx = cmask[:, None] & (hx_ok & (wx >= 0) & (wx < W))[None, :]
            wv = tl.load(w_ptr + c * (K * K) + (i * K + j), mask=cmask, other=0.0)
            dus = tl.load(du_ptr + base + _offs(c, hd, wd, sC, sH, sW), mask=md, other=0.0)
            acc += dus * wv.to(tl.float32)[:, None]
            xs = _load_in(x_ptr, base + _offs(c, hx, wx, sC, sH, sW), mx, pa_ptr, pc_ptr, c,
                          cmask, PRE)
            tl.store(dw_p + row * (K * K) + (i * K + j), tl.sum(du * xs, axis=1), mask=cmask)
    if PRE:  # acc is dL/d(block input); the stored input's gradient is a * acc
        xv = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        accm = tl.where(m, acc, 0.0)
        tl.store(da_p + row, tl.sum(accm * xv, axis=1), mask=cmask)
        tl.store(dc_p + row, tl.sum(accm, axis=1), mask=cmask)
        acc = acc * _load_c(pa_ptr, c, cmask)
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- launchers
def _geometry(x: torch.Tensor):
    """Tile shape for x's layout: (TH, TW, BLOCK_C, BLOCK_S, num_warps).

    NCHW (W fastest): one channel, a spatial tile of up to 1024 lanes (a whole 32x32
    plane). channels_last (C fastest): 32 channels x 32 positions, coalesced along C.
    """
    N, C, H, W = x.shape
    if x.stride(1) == 1 and C > 1:  # channels_last-like: vectorise over channels
        block_c = min(32, triton.next_power_of_2(C))
        tw = min(8, W)
        th = min(4, H)
    else:
        block_c = 1
        tw = min(W, 64)
        th = min(H, max(1, 1024 // triton.next_power_of_2(tw)))
    block_s = triton.next_power_of_2(th * tw)
    num_warps = 8 if block_c * block_s >= 1024 else 4
    return th, tw, block_c, block_s, num_warps


# Opt-in autotuning over warps and pipelining depth (Hopper-oriented, bounded list), keyed
# on shape, layout and k. The tile shape stays fixed by _geometry: it sets the number of
# partial rows, which must be known before the launch. Off by default until it has been
# validated on a GPU; the default is the _geometry heuristic.
AUTOTUNE = os.environ.get("CONVMIXER_EXT_TRITON_AUTOTUNE", "0") == "1"
_TUNE_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s)
                 for w, s in ((4, 1), (8, 1), (4, 2), (8, 2), (16, 1))]
_tuned = {}


def _runner(kernel, on_gpu):
    if not (AUTOTUNE and on_gpu):
        return kernel, True
    if kernel not in _tuned:
        _tuned[kernel] = triton.autotune(configs=_TUNE_CONFIGS,
                                         key=["C", "H", "W", "sC", "sW", "K"])(kernel)
    return _tuned[kernel], False


def _launch(kernel, x, args, extra_constexpr):
    """Launch ``kernel`` over x's tiles with the common shape/stride arguments."""
    N, C, H, W = x.shape
    th, tw, block_c, block_s, num_warps = _geometry(x)
    tiles_w = triton.cdiv(W, tw)
    tiles_per_img = triton.cdiv(H, th) * tiles_w
    grid = (N * tiles_per_img, triton.cdiv(C, block_c))
    on_gpu = x.is_cuda and not triton_interpreter()
    run, pass_warps = _runner(kernel, on_gpu)
    launch_opts = dict(num_warps=num_warps) if pass_warps else {}
    with _device_of(x):
        run[grid](*args, C, H, W, *x.stride(), tiles_w, tiles_per_img, **extra_constexpr,
                  TH=th, TW=tw, BLOCK_C=block_c, BLOCK_S=block_s, **launch_opts)


def _device_of(x):
    """Launch on x's GPU without changing the caller's current device."""
    if x.is_cuda and not triton_interpreter():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _num_tiles(x):
    N, C, H, W = x.shape
    th, tw = _geometry(x)[:2]
    return N * triton.cdiv(H, th) * triton.cdiv(W, tw)


def _tile_counts(x):
    """Valid positions per tile row of the partials (same order as the kernels' pid)."""
    N, C, H, W = x.shape
    th, tw = _geometry(x)[:2]
    hs = torch.arange(0, H, th)
    ws = torch.arange(0, W, tw)
    per = (torch.clamp(H - hs, max=th)[:, None] * torch.clamp(W - ws, max=tw)[None, :])
    return per.flatten().repeat(N).to(device=x.device, dtype=torch.float32)


def _kc(weight, pa):
    k = weight.shape[-1]
    return dict(K=k, PB=pad_before(k), PRE=pa is not None)


def _pp(x, pa, pc):
    """Pointers for the folded affine; x stands in (never read) when there is none."""
    return (x, x) if pa is None else (pa, pc)


def k_stats(x, weight, bias, pa, pc, act):
    T, C = _num_tiles(x), x.shape[1]
    mean_p = torch.empty((T, C), device=x.device, dtype=torch.float32)
    m2_p = torch.empty_like(mean_p)
    _launch(_stats_kernel, x, (x, weight.contiguous(), bias, *_pp(x, pa, pc), mean_p, m2_p),
            dict(_kc(weight, pa), ACT=act))
    return mean_p, m2_p, _tile_counts(x)


def k_apply(x, weight, bias, mean, rstd, gamma, beta, pa, pc, act):
    out = torch.empty_like(x)
    _launch(_apply_kernel, x, (x, weight.contiguous(), bias, *_pp(x, pa, pc), mean, rstd,
                               gamma, beta, out),
            dict(_kc(weight, pa), ACT=act))
    return out


def k_bwd_reduce(dout, x, weight, bias, mean, rstd, pa, pc, act):
    T, C = _num_tiles(x), x.shape[1]
    dbeta_p = torch.empty((T, C), device=x.device, dtype=torch.float32)
    dgamma_p = torch.empty_like(dbeta_p)
    _launch(_bwd_reduce_kernel, x,
            (dout, x, weight.contiguous(), bias, *_pp(x, pa, pc), mean, rstd, dbeta_p,
             dgamma_p),
            dict(_kc(weight, pa), ACT=act))
    return dbeta_p, dgamma_p


def k_bwd_main(dout, x, weight, bias, mean, rstd, gamma, dbeta, dgamma, batch_stats, pa, pc,
               act):
    N, C, H, W = x.shape
    k = weight.shape[-1]
    w = weight.contiguous()
    du = torch.empty_like(x, dtype=torch.float32)
    _launch(_bwd_du_kernel, x,
            (dout, x, w, bias, *_pp(x, pa, pc), mean, rstd, gamma, dbeta, dgamma, du,
             1.0 / (N * H * W)),
            dict(_kc(weight, pa), ACT=act, BATCH_STATS=bool(batch_stats)))
    T = _num_tiles(x)
    dx = torch.empty_like(x)
    dw_p = torch.empty((T, C, k * k), device=x.device, dtype=torch.float32)
    db_p = torch.empty((T, C), device=x.device, dtype=torch.float32)
    tp = T if pa is not None else 0
    da_p = torch.empty((tp, C), device=x.device, dtype=torch.float32)
    dc_p = torch.empty_like(da_p)
    _launch(_bwd_dx_kernel, x,
            (dout, x, w, *_pp(x, pa, pc), du, dx, dw_p, db_p, *_pp(db_p, da_p, dc_p)),
            _kc(weight, pa))
    return dx, dw_p, db_p, da_p, dc_p


BACKEND = KernelBackend(k_stats, k_apply, k_bwd_reduce, k_bwd_main)


# --------------------------------------------------------------------------- pointwise GEMM
@triton.jit
def _pw_u(y_ptr, w_ptr, b_ptr, pid_p, pid_n, P, CI, CO, HW, W, sN, sC, sH, sW,
          IEEE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr):
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
        if IEEE:  # full fp32 products, as the reference conv computes in fp32
            acc += tl.dot(a.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        else:
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
def _pw_gemm_kernel(y_ptr, w_ptr, b_ptr, g_ptr, mean_p, m2_p, P, CI, CO, HW, W, sN, sC, sH,
                    sW, oN, oC, oH, oW, ACT: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """g = act(u) stored through g's strides (o*), with the per-(row tile, channel) mean and
    centred M2 of g (BN2 statistics, from the fp32 values) in the epilogue."""
    pid_p, pid_n = _pw_tile_ids(CO, BLOCK_N)
    u, rows, rmask, n, hw, cols, cmask = _pw_u(y_ptr, w_ptr, b_ptr, pid_p, pid_n,
                                               P, CI, CO, HW, W, sN, sC, sH, sW, IEEE,
                                               BLOCK_P, BLOCK_N, BLOCK_K)
    g = _act(u, ACT)
    m = rmask[:, None] & cmask[None, :]
    tl.store(g_ptr + _pos_offs(n, hw, W, cols, oN, oC, oH, oW),
             g.to(g_ptr.dtype.element_ty), mask=m)
    cnt = tl.sum(rmask.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(m, g, 0.0), axis=0) / cnt
    d = tl.where(m, g - mean[None, :], 0.0)
    row = pid_p.to(tl.int64) * CO + cols
    tl.store(mean_p + row, mean, mask=cmask)
    tl.store(m2_p + row, tl.sum(d * d, axis=0), mask=cmask)


@triton.jit
def _pw_bwd_du_kernel(y_ptr, w_ptr, b_ptr, dg_ptr, dmean_ptr, dvar_ptr, mean_ptr, du_ptr, db_p,
                      inv_p, P, CI, CO, HW, W, sN, sC, sH, sW, dN, dC, dH, dW, ACT: tl.constexpr,
                      IEEE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """du = (dg + dmean/P + dvar*2(g-mean)/P) * act'(u) with u recomputed (never stored in
    the forward); du stored as rows [P, CO] in du's dtype, per-row-tile db partials."""
    pid_p, pid_n = _pw_tile_ids(CO, BLOCK_N)
    u, rows, rmask, n, hw, cols, cmask = _pw_u(y_ptr, w_ptr, b_ptr, pid_p, pid_n,
                                               P, CI, CO, HW, W, sN, sC, sH, sW, IEEE,
                                               BLOCK_P, BLOCK_N, BLOCK_K)
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


def _pw_config(y):
    """GEMM tile and launch options: 128x128x32 tiles, 8 warps, 3 pipeline stages on a GPU
    (the usual shape for large tensor-core GEMMs); 64x64x32 in the interpreter, where tile
    size only costs time. ``CONVMIXER_EXT_PW_TILE=PxNxK`` overrides the tile (tests run
    the GPU tile under the interpreter this way)."""
    on_gpu = y.is_cuda and not triton_interpreter()
    bp, bn, bk = (128, 128, 32) if on_gpu else (64, 64, 32)
    env = os.environ.get("CONVMIXER_EXT_PW_TILE")
    if env:
        bp, bn, bk = (int(v) for v in env.lower().split("x"))
    cfg = dict(BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=bk, num_warps=8 if bp * bn >= 128 * 128 else 4)
    if on_gpu:
        cfg["num_stages"] = 3
    return cfg


def _pw_geometry(y, w2):
    """(positions P, output channels CO, config, row tiles T, 1-D grid over row x column
    tiles) of a pointwise GEMM launch."""
    N, _, H, W = y.shape
    P, CO, cfg = N * H * W, w2.shape[0], _pw_config(y)
    T = triton.cdiv(P, cfg["BLOCK_P"])
    return P, CO, cfg, T, (T * triton.cdiv(CO, cfg["BLOCK_N"]),)


def _pw_ieee(y):
    # fp32: IEEE products (no TF32). The interpreter's dot mishandles bf16/fp16 operands,
    # so there they are upcast first (bf16/fp16 products are exact in fp32: same result).
    return y.dtype == torch.float32 or triton_interpreter()


def pw_gemm_act_stats(y, w2, bias, g, act):
    """Fill g [N, Co, H, W] (any strides) with act(conv1x1(y) + b) for y [N, Ci, H, W] (any
    strides), w2 [Co, Ci]; return (mean_p [T, Co], m2_p [T, Co], count_p [T])."""
    CI, H, W = y.shape[1:]
    P, CO, cfg, T, grid = _pw_geometry(y, w2)
    mean_p = torch.empty((T, CO), device=y.device, dtype=torch.float32)
    m2_p = torch.empty_like(mean_p)
    with _device_of(y):
        _pw_gemm_kernel[grid](y, w2.contiguous(), bias, g, mean_p, m2_p, P, CI, CO, H * W, W,
                              *y.stride(), *g.stride(), ACT=act, IEEE=_pw_ieee(y), **cfg)
    bp = cfg["BLOCK_P"]
    starts = torch.arange(0, P, bp)
    cnt = torch.clamp(P - starts, max=bp).to(device=y.device, dtype=torch.float32)
    return mean_p, m2_p, cnt


def pw_bwd_du(dg, dmean, dvar, y, w2, bias, mean, act):
    """(du [P, Co] rows in y's dtype, db_p [T, Co]) for the pointwise block's backward."""
    CI, H, W = y.shape[1:]
    P, CO, cfg, T, grid = _pw_geometry(y, w2)
    du = torch.empty((P, CO), device=y.device, dtype=y.dtype)
    db_p = torch.empty((T, CO), device=y.device, dtype=torch.float32)
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    with _device_of(y):
        _pw_bwd_du_kernel[grid](y, w2.contiguous(), bias, dg, f32(dmean), f32(dvar), f32(mean),
                                du, db_p, 1.0 / P, P, CI, CO, H * W, W, *y.stride(), *dg.stride(),
                                ACT=act, IEEE=_pw_ieee(y), **cfg)
    return du, db_p
