// Fused depthwise block kernels (docs/DESIGN.md, "Forward" and "Backward"): one source for the GPU (nvcc) and
// the host emulator (cmx_device.h). Templates: element type T (float, cmx_half, cmx_bf16) and
// kernel size KT (3, 5, 7, 9 unrolled with register blocking; 0 = generic run-time k).
//
// Every block owns one (image n, channel c, TH x TW spatial tile). The input tile and its
// halo are staged in shared memory as fp32 (zero outside the image, which is exactly the
// "same" padding), weights too; each thread computes RW consecutive outputs along W
// sliding a register window over the shared row. Statistics and reductions are fp32;
// offsets are 64-bit. Reductions are per-block partials written to their own row (no
// atomics), finished in a fixed order on the host side.
#pragma once

#include "cmx_abi.h"
#include "cmx_device.h"

namespace cmx {

constexpr int kThreads = 256;  // power of two (block_sum)
constexpr int kMaxK = 31;

// Outputs per thread along W: register blocking for the unrolled sizes.
__host__ __device__ constexpr int rw_for(int KT) { return KT > 0 ? 4 : 1; }
__host__ __device__ constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

// Launch geometry and strides (named geo in the kernels: g is the activation act(u)).
struct Geom {
  int C, H, W, K, PB, TH, TW, tiles_w, tiles_per_img;
  int act;      // CMX_ACT_* (cmx_abi.h)
  float inv_n;  // 1 / (N*H*W)
  int64_t sN, sC, sH, sW;  // strides of x (and of out/dout/dx, which share x's layout)
};

// The input affine (docs/DESIGN.md, "Folded BN2"): the block input is
// in_scale[c]*x + in_shift[c] (in_scale == nullptr: the input is x itself). B2 then also
// returns per-block partials of sum(dL/dinput * x) and sum(dL/dinput), the gradients of
// in_scale and in_shift.
struct InAffine {
  const float* scale;
  const float* shift;
  float* dscale_p;
  float* dshift_p;
};

// ---------------------------------------------------------------- activations (CMX_ACT_*)
__device__ __forceinline__ float tanh_f(float z) { return tanhf(z); }

__device__ __forceinline__ float act_fwd(float u, int act) {
  if (act == CMX_ACT_GELU) return 0.5f * u * (1.f + erff(u * 0.70710678118654752f));
  if (act == CMX_ACT_GELU_TANH) {
    const float t = tanh_f(0.79788456080286536f * (u + 0.044715f * u * u * u));
    return 0.5f * u * (1.f + t);
  }
  return u > 0.f ? u : 0.f;
}

__device__ __forceinline__ float act_grad(float u, int act) {
  if (act == CMX_ACT_GELU) {
    const float cdf = 0.5f * (1.f + erff(u * 0.70710678118654752f));
    return cdf + u * expf(-0.5f * u * u) * 0.39894228040143268f;
  }
  if (act == CMX_ACT_GELU_TANH) {
    const float t = tanh_f(0.79788456080286536f * (u + 0.044715f * u * u * u));
    const float dt = 0.79788456080286536f * (1.f + 3.f * 0.044715f * u * u);
    return 0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * dt;
  }
  return u > 0.f ? 1.f : 0.f;
}

template <typename T>
__device__ __forceinline__ float ld(const T* p, int64_t i) {
  return cmx_to_float(p[i]);
}

template <typename T>
__device__ __forceinline__ void st(T* p, int64_t i, float v) {
  p[i] = cmx_from_float(v, T{});
}

// ---------------------------------------------------------------- index helpers (64-bit)
// The only places element offsets are formed; unit-tested beyond 2^31 through the
// emulation build's cmx_index_probe.
__host__ __device__ __forceinline__ int64_t plane_base(const Geom& geo, int n, int c) {
  return static_cast<int64_t>(n) * geo.sN + static_cast<int64_t>(c) * geo.sC;
}

__host__ __device__ __forceinline__ int64_t offset_of(const Geom& geo, int64_t base, int h, int w) {
  return base + static_cast<int64_t>(h) * geo.sH + static_cast<int64_t>(w) * geo.sW;
}

// ---------------------------------------------------------------- block helpers
struct Tile {
  int n, c, h0, w0, th, tw;  // th, tw: valid extent of this (possibly edge) tile
  int64_t base, row;         // x offset of (n, c, 0, 0); partial row index
};

// One-dimensional grid (limit 2^31 - 1 blocks, checked by the planner): tiles of a plane are
// adjacent blocks (their halos overlap in L2), then channels, then images.
__device__ __forceinline__ Tile tile_of(const Geom& geo) {
  Tile t;
  const unsigned b = blockIdx.x;  // 32-bit division: a 64-bit one is a called subroutine
  const int ti = static_cast<int>(b % static_cast<unsigned>(geo.tiles_per_img));
  const unsigned nc = b / static_cast<unsigned>(geo.tiles_per_img);
  t.n = static_cast<int>(nc / static_cast<unsigned>(geo.C));
  t.c = static_cast<int>(nc % static_cast<unsigned>(geo.C));
  t.h0 = (ti / geo.tiles_w) * geo.TH;
  t.w0 = (ti % geo.tiles_w) * geo.TW;
  t.th = min(geo.TH, geo.H - t.h0);
  t.tw = min(geo.TW, geo.W - t.w0);
  t.base = plane_base(geo, t.n, t.c);
  t.row = static_cast<int64_t>(t.n) * geo.tiles_per_img + ti;
  return t;
}

// Sum over the block; every thread must call it; result broadcast to all. Fixed order
// (deterministic): a shuffle tree within each warp, then warp 0 over the warp sums.
// blockDim.x must be a multiple of 32 and at most 32*32.
__device__ __forceinline__ float warp_sum(float v) {
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  // every warp runs the second shuffle tree (the emulated shuffle needs all threads of
  // the block); only warp 0 holds the warp sums, the others add zeros
  float r = (warp == 0 && lane < nwarps) ? red[lane] : 0.f;
  r = warp_sum(r);
  if (threadIdx.x == 0) red[32] = r;
  __syncthreads();
  r = red[32];
  __syncthreads();
  return r;
}

// Per-channel scale and shift of the block input (identity without a folded affine:
// x * 1 + 0 == x exactly).
struct Affine {
  float scale, shift;
};
__device__ __forceinline__ Affine affine_of(const InAffine& in_aff, int c) {
  return in_aff.scale ? Affine{in_aff.scale[c], in_aff.shift[c]} : Affine{1.f, 0.f};
}

// s[R x S] <- the block input at x[r0.., c0..] of this block's (n, c) plane as fp32, zero
// outside the image (the padding pads the input, so it stays zero with an affine).
template <typename T>
__device__ void load_rect(float* s, const T* __restrict__ x, int64_t base, const Geom& geo,
                          int r0, int c0, int R, int S, Affine in) {
  for (int i = threadIdx.x; i < R * S; i += blockDim.x) {
    const int h = r0 + i / S, w = c0 + i % S;
    s[i] = (h >= 0 && h < geo.H && w >= 0 && w < geo.W)
               ? ld(x, offset_of(geo, base, h, w)) * in.scale + in.shift
               : 0.f;
  }
}

// Weights of channel c into shared memory; `flip` stores them rotated by 180 degrees.
template <typename T>
__device__ void load_weights(float* sw, const T* __restrict__ w, int c, int K, bool flip) {
  for (int i = threadIdx.x; i < K * K; i += blockDim.x)
    sw[flip ? K * K - 1 - i : i] = ld(w, static_cast<int64_t>(c) * K * K + i);
}

// acc[o] += correlation of the shared tile s (row stride S) with sw at output (r, c + o),
// where s(0, 0) is the top-left tap of output (0, 0).
template <int KT>
__device__ __forceinline__ void conv_row(const float* s, int S, const float* sw, int K, int r,
                                         int c, float (&acc)[rw_for(KT)]) {
  constexpr int RW = rw_for(KT);
  if constexpr (KT > 0) {
    CMX_UNROLL
    for (int i = 0; i < KT; ++i) {
      float v[RW + KT - 1];
      const float* sr = s + (r + i) * S + c;
      CMX_UNROLL
      for (int j = 0; j < RW + KT - 1; ++j) v[j] = sr[j];
      CMX_UNROLL
      for (int j = 0; j < KT; ++j) {
        const float wv = sw[i * KT + j];
        CMX_UNROLL
        for (int o = 0; o < RW; ++o) acc[o] += v[o + j] * wv;
      }
    }
  } else {
    for (int i = 0; i < K; ++i) {
      const float* sr = s + (r + i) * S + c;
      for (int j = 0; j < K; ++j) acc[0] += sr[j] * sw[i * K + j];
    }
  }
}

// Calls f(r, c, acc) for every group of RW outputs of an R x CW region (CW multiple of RW),
// acc = correlation of s (row stride S) with sw, plus `init`.
template <int KT, class F>
__device__ __forceinline__ void for_each_conv(const float* s, int S, const float* sw, int K,
                                              int R, int CW, float init, F&& f) {
  constexpr int RW = rw_for(KT);
  const int groups = CW / RW;
  for (int it = threadIdx.x; it < R * groups; it += blockDim.x) {
    const int r = it / groups, c = (it % groups) * RW;
    float acc[RW];
    CMX_UNROLL
    for (int o = 0; o < RW; ++o) acc[o] = init;
    conv_row<KT>(s, S, sw, K, r, c, acc);
    f(r, c, acc);
  }
}

// Shared-memory layout of the forward-type kernels (stats, apply, bwd_reduce), in floats.
struct FwdSmem {
  int TWp, S, R;  // padded tile width, staged row stride, staged rows
  __host__ __device__ FwdSmem(int K, int KT, int th, int tw)
      : TWp(round_up(tw, rw_for(KT))), S(round_up(tw, rw_for(KT)) + K - 1), R(th + K - 1) {}
  __host__ __device__ int x(int K) const { return K * K; }
  __host__ __device__ int g(int K) const { return x(K) + R * S; }
  __host__ __device__ int red(int K, int th) const { return g(K) + th * TWp; }
  __host__ __device__ int total(int K, int th) const { return red(K, th) + kThreads; }
};

// ---------------------------------------------------------------- F1: statistics
// Per-block mean and centred M2 of g = act(conv(x) + b) over the tile (merged on the host
// with Chan's formula: stable for large mean offsets), and the count of the tile.
template <typename T, int KT>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                 float* __restrict__ mean_p, float* __restrict__ m2_p,
                 float* __restrict__ count_p, InAffine in_aff, Geom geo) {
  CMX_DYN_SMEM(smem);
  const Tile t = tile_of(geo);
  const int K = KT > 0 ? KT : geo.K;
  const FwdSmem L(K, KT, t.th, t.tw);
  float *sw = smem, *sx = smem + L.x(K), *sg = smem + L.g(K), *red = smem + L.red(K, t.th);
  load_weights(sw, w, t.c, K, false);
  load_rect(sx, x, t.base, geo, t.h0 - geo.PB, t.w0 - geo.PB, L.R, L.S, affine_of(in_aff, t.c));
  const float bias = ld(b, t.c);
  __syncthreads();
  float sum = 0.f;
  for_each_conv<KT>(sx, L.S, sw, K, t.th, L.TWp, bias, [&](int r, int c, auto& acc) {
    for (int o = 0; o < rw_for(KT) && c + o < t.tw; ++o) {
      const float gv = act_fwd(acc[o], geo.act);
      sg[r * L.TWp + c + o] = gv;
      sum += gv;
    }
  });
  const float cnt = static_cast<float>(t.th * t.tw);
  const float mean = block_sum(sum, red) / cnt;  // block_sum's barriers also publish sg
  float m2 = 0.f;
  for (int i = threadIdx.x; i < t.th * t.tw; i += blockDim.x) {
    const float d = sg[(i / t.tw) * L.TWp + i % t.tw] - mean;
    m2 += d * d;
  }
  m2 = block_sum(m2, red);
  if (threadIdx.x == 0) {
    mean_p[t.row * geo.C + t.c] = mean;
    m2_p[t.row * geo.C + t.c] = m2;
    if (t.c == 0) count_p[t.row] = cnt;  // counts on the device: no host copy per call
  }
}

// ---------------------------------------------------------------- F2 / eval: apply
// out = x + a*g + shift with a = gamma*rstd, shift = beta - a*mean.
template <typename T, int KT>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                 const float* __restrict__ mean, const float* __restrict__ rstd,
                 const float* __restrict__ gamma, const float* __restrict__ beta,
                 T* __restrict__ out, InAffine in_aff, Geom geo) {
  CMX_DYN_SMEM(smem);
  const Tile t = tile_of(geo);
  const int K = KT > 0 ? KT : geo.K;
  const FwdSmem L(K, KT, t.th, t.tw);
  float *sw = smem, *sx = smem + L.x(K);
  load_weights(sw, w, t.c, K, false);
  load_rect(sx, x, t.base, geo, t.h0 - geo.PB, t.w0 - geo.PB, L.R, L.S, affine_of(in_aff, t.c));
  const float a = gamma[t.c] * rstd[t.c];
  const float shift = beta[t.c] - a * mean[t.c];
  __syncthreads();
  for_each_conv<KT>(sx, L.S, sw, K, t.th, L.TWp, ld(b, t.c), [&](int r, int c, auto& acc) {
    for (int o = 0; o < rw_for(KT) && c + o < t.tw; ++o) {
      const float xv = sx[(r + geo.PB) * L.S + c + o + geo.PB];
      const int64_t off = offset_of(geo, t.base, t.h0 + r, t.w0 + c + o);
      st(out, off, xv + a * act_fwd(acc[o], geo.act) + shift);
    }
  });
}

// ---------------------------------------------------------------- B1: dbeta / dgamma partials
template <typename T, int KT>
__global__ void __launch_bounds__(kThreads)
    bwd_reduce_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                      const T* __restrict__ w, const T* __restrict__ b,
                      const float* __restrict__ mean, const float* __restrict__ rstd,
                      float* __restrict__ dbeta_p, float* __restrict__ dgamma_p, InAffine in_aff,
                      Geom geo) {
  CMX_DYN_SMEM(smem);
  const Tile t = tile_of(geo);
  const int K = KT > 0 ? KT : geo.K;
  const FwdSmem L(K, KT, t.th, t.tw);
  float *sw = smem, *sx = smem + L.x(K), *red = smem + L.red(K, t.th);
  load_weights(sw, w, t.c, K, false);
  load_rect(sx, x, t.base, geo, t.h0 - geo.PB, t.w0 - geo.PB, L.R, L.S, affine_of(in_aff, t.c));
  const float m = mean[t.c], rs = rstd[t.c];
  __syncthreads();
  float s1 = 0.f, s2 = 0.f;
  for_each_conv<KT>(sx, L.S, sw, K, t.th, L.TWp, ld(b, t.c), [&](int r, int c, auto& acc) {
    for (int o = 0; o < rw_for(KT) && c + o < t.tw; ++o) {
      const int64_t off = offset_of(geo, t.base, t.h0 + r, t.w0 + c + o);
      const float d = ld(dout, off);
      s1 += d;
      s2 += d * (act_fwd(acc[o], geo.act) - m) * rs;
    }
  });
  s1 = block_sum(s1, red);
  s2 = block_sum(s2, red);
  if (threadIdx.x == 0) {
    dbeta_p[t.row * geo.C + t.c] = s1;
    dgamma_p[t.row * geo.C + t.c] = s2;
  }
}

// ---------------------------------------------------------------- B2: dx, dW / db partials
// Shared layout (floats): weights, flipped weights, x staged with a 2(K-1) halo, du on the
// tile plus a (K-1) halo, and the reduction scratch.
struct BwdSmem {
  int TWp, EH, EWs, XR, XS;
  __host__ __device__ BwdSmem(int K, int KT, int th, int tw)
      : TWp(round_up(tw, rw_for(KT))),
        EH(th + K - 1),
        EWs(round_up(tw, rw_for(KT)) + K - 1),
        XR(th + 2 * (K - 1)),
        XS(round_up(round_up(tw, rw_for(KT)) + K - 1, rw_for(KT)) + K - 1) {}
  __host__ __device__ int wflip(int K) const { return K * K; }
  __host__ __device__ int x(int K) const { return 2 * K * K; }
  __host__ __device__ int du(int K) const { return x(K) + XR * XS; }
  __host__ __device__ int red(int K) const { return du(K) + EH * EWs; }
  __host__ __device__ static int red_size(int K) {
    return K * K + 1 > kThreads ? K * K + 1 : kThreads;
  }
  __host__ __device__ int total(int K) const { return red(K) + red_size(K); }
};

template <typename T, int KT>
__global__ void __launch_bounds__(kThreads)
    bwd_main_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                    const T* __restrict__ w, const T* __restrict__ b,
                    const float* __restrict__ mean, const float* __restrict__ rstd,
                    const float* __restrict__ gamma, const float* __restrict__ dbeta,
                    const float* __restrict__ dgamma, bool batch_stats, T* __restrict__ dx,
                    float* __restrict__ dw_p, float* __restrict__ db_p, InAffine in_aff, Geom geo) {
  CMX_DYN_SMEM(smem);
  const Tile t = tile_of(geo);
  const int K = KT > 0 ? KT : geo.K;
  const int PA = K - 1 - geo.PB;  // padding after
  const BwdSmem L(K, KT, t.th, t.tw);
  float *sw = smem, *swf = smem + L.wflip(K), *sx = smem + L.x(K), *sdu = smem + L.du(K),
        *red = smem + L.red(K);
  load_weights(sw, w, t.c, K, false);
  load_weights(swf, w, t.c, K, true);
  // du is needed on rows/cols [h0 - PA, h0 + th - 1 + PB]; u there needs x a further
  // (PB before, PA after) around it.
  const int eh0 = t.h0 - PA, ew0 = t.w0 - PA;
  const Affine in = affine_of(in_aff, t.c);
  load_rect(sx, x, t.base, geo, eh0 - geo.PB, ew0 - geo.PB, L.XR, L.XS, in);
  const float rs = rstd[t.c], m = mean[t.c];
  const float scale = gamma[t.c] * rs;
  const float mb = batch_stats ? dbeta[t.c] * geo.inv_n : 0.f;
  const float mg = batch_stats ? dgamma[t.c] * geo.inv_n : 0.f;
  __syncthreads();
  // 1) du on the extended region (zero outside the image: those terms do not exist).
  const int ecw = round_up(L.EWs, rw_for(KT));
  for_each_conv<KT>(sx, L.XS, sw, K, L.EH, ecw, ld(b, t.c), [&](int r, int c, auto& acc) {
    for (int o = 0; o < rw_for(KT); ++o) {
      const int h = eh0 + r, wc = ew0 + c + o;
      float du = 0.f;
      if (c + o < L.EWs && h >= 0 && h < geo.H && wc >= 0 && wc < geo.W) {
        const float u = acc[o];
        float d = ld(dout, offset_of(geo, t.base, h, wc));
        if (batch_stats) d = d - mb - (act_fwd(u, geo.act) - m) * rs * mg;
        du = scale * d * act_grad(u, geo.act);
      }
      if (c + o < L.EWs) sdu[r * L.EWs + c + o] = du;
    }
  });
  __syncthreads();
  // 2) dx = dout + correlation of du with the flipped kernel (the gradient of the block
  //    input; with a folded affine the stored input's gradient is a * that).
  float sdscale = 0.f, sdshift = 0.f;
  for_each_conv<KT>(sdu, L.EWs, swf, K, t.th, L.TWp, 0.f, [&](int r, int c, auto& acc) {
    for (int o = 0; o < rw_for(KT) && c + o < t.tw; ++o) {
      const int64_t off = offset_of(geo, t.base, t.h0 + r, t.w0 + c + o);
      const float din = ld(dout, off) + acc[o];
      if (in_aff.scale) {
        sdscale += din * ld(x, off);
        sdshift += din;
      }
      st(dx, off, din * in.scale);
    }
  });
  if (in_aff.scale) {  // uniform over the grid: every thread of the block takes it
    sdscale = block_sum(sdscale, red);
    sdshift = block_sum(sdshift, red);
    if (threadIdx.x == 0) {
      in_aff.dscale_p[t.row * geo.C + t.c] = sdscale;
      in_aff.dshift_p[t.row * geo.C + t.c] = sdshift;
    }
  }
  // 3) dW[i][j] = sum_q du[q] x[q + (i, j) - PB] and db = sum_q du[q] over the tile.
  //    Tap KK is db. Threads split into G groups over positions; groups summed in order.
  const int KK = K * K, taps = KK + 1;
  const int G = taps >= static_cast<int>(blockDim.x) ? 1 : static_cast<int>(blockDim.x) / taps;
  const int npos = t.th * t.tw;
  for (int slot = threadIdx.x; slot < G * taps; slot += blockDim.x) {
    const int grp = slot / taps, tap = slot % taps;
    const int i = tap / K, j = tap % K;
    float acc = 0.f;
    for (int p = grp; p < npos; p += G) {
      const int qr = p / t.tw, qc = p % t.tw;
      const float du = sdu[(qr + PA) * L.EWs + qc + PA];
      acc += tap == KK ? du : du * sx[(qr + i + PA) * L.XS + qc + j + PA];
    }
    red[grp * taps + tap] = acc;
  }
  __syncthreads();
  for (int tap = threadIdx.x; tap < taps; tap += blockDim.x) {
    float s = 0.f;
    for (int grp = 0; grp < G; ++grp) s += red[grp * taps + tap];
    if (tap == KK)
      db_p[t.row * geo.C + t.c] = s;
    else
      dw_p[(t.row * geo.C + t.c) * KK + tap] = s;
  }
}

}  // namespace cmx
