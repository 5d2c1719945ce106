// Fused depthwise block kernels (docs/DESIGN.md, "Forward", "Backward", "CUDA kernels"): one
// source for the GPU (nvcc) and the host emulator (cmx_device.h).
//
// Templates: element type T (float, cmx_half, cmx_bf16) and kernel size KT (3, 5, 7, 9
// unrolled; 0 = generic run-time k up to kMaxK).
//
// A block owns CB channels of one image and a TH x TW spatial tile (for a ConvMixer layer the
// whole 32x32 plane). It stages the input rectangle with its halo into shared memory, one fp32
// plane per channel (zero outside the image: the "same" padding), reading global memory in
// 16-byte chunks along the contiguous dimension (W for NCHW, C for channels_last) when the
// launch's alignment allows. Each thread computes RH x RW outputs of one channel (RW elements
// of T are 16 bytes: one vector store per output row in NCHW) with a register-blocked
// correlation that reads every staged input row once per RH output rows. channels_last
// outputs go back through shared memory so that global stores are 16-byte chunks along C.
// Reductions write per-block partial rows (docs/DESIGN.md, "Partials"); offsets are 64-bit.
#pragma once

#include "cmx_abi.h"
#include "cmx_device.h"

namespace cmx {

constexpr int kMaxK = 31;
constexpr int kMaxThreads = 256;  // per block (the planner keeps CB * groups within it)
constexpr int kMinBlocks = 3;     // __launch_bounds__: <= 85 registers, >= 24 warps/SM by them

// Outputs per thread: RH rows x RW columns with RW * sizeof(T) == 16 bytes (fp32: 4x4,
// 16-bit: 2x8); VEC elements make one 16-byte global access.
template <typename T>
struct Blk {
  static constexpr int RW = 16 / static_cast<int>(sizeof(T));
  static constexpr int RH = 16 / RW;
  static constexpr int VEC = 16 / static_cast<int>(sizeof(T));
};

__host__ __device__ constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }
__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }
// Zero padding before the first tap of a k-tap "same" convolution (PyTorch's; Python's
// semantics.pad_before).
__host__ __device__ constexpr int pad_before(int k) { return (k - 1) / 2; }

enum { kNCHW = 0, kChannelsLast = 1 };

// Launch geometry and strides (named geo in the kernels: g is the activation act(u)).
struct Geom {
  int N, C, H, W, K, PB;
  int TH, TW, CB;                // spatial tile, channels per block
  int GH, GW;                    // groups of RH x RW outputs per channel: ceil(TH/RH), ceil(TW/RW)
  int tiles_w, tiles_per_img, cblocks;
  int parts;                     // blocks per channel block; each takes a contiguous run of
                                 // the N * tiles_per_img (image, tile) items = a partial row
  int act;                       // CMX_ACT_* (cmx_abi.h)
  int layout;                    // kNCHW (W contiguous) or kChannelsLast (C contiguous)
  int vec;                       // 16-byte global accesses along the contiguous dimension
  int prefetch;                  // L2 prefetch of the staged rectangles (16-byte path only)
  int ipb;                       // images per block of apply_mma_kernel (1 for every other)
  float inv_n;                   // 1 / (N*H*W)
  int64_t sN, sC, sH, sW;        // strides of x (and of out/dout/dx, which share x's layout)
};

// The input affine (docs/DESIGN.md, "Folded BN2"): the block input is
// in_scale[c]*x + in_shift[c] (scale == nullptr: the input is x itself). B2 then also
// returns per-block partials of sum(dL/dinput * x) and sum(dL/dinput).
struct InAffine {
  const float* scale;
  const float* shift;
  float* dscale_p;
  float* dshift_p;
};

// ---------------------------------------------------------------- activations (CMX_ACT_*)
// Phi(u), the standard normal CDF, in fp32: the Triton kernels' _cdf (docs/DESIGN.md,
// "Activation"), the same degree-9 polynomial t and the same 2^x, so both backends compute
// GELU alike: Phi(-a) = 2^(a t(a) - 1) for a = |u| (t's argument clamped to [0, 6]),
// Phi(u) = 1 - Phi(-u) for u >= 0 (a Phi below 2^-126, u < -25, flushed to 0). Fourteen
// instructions where erff's two pieces took about thirty. The coefficients are
// kNormalCdfPoly (tests/test_reliability.py checks them against triton_kernels._cdf's).
__device__ __forceinline__ float normal_cdf(float u) {
  constexpr float kNormalCdfPoly[10] = {
      -2.2947066469214406e-08f, 7.153334991016891e-07f, -9.517782018519938e-06f,
      6.858746201032773e-05f, -0.00025471733533777297f, -4.7056732000783086e-05f,
      0.006998583674430847f, -0.052472248673439026f, -0.4592120349407196f,
      -1.1511050462722778f};
  const float a = fabsf(u), c = fminf(a, 6.f);
  float t = kNormalCdfPoly[0];
  CMX_UNROLL
  for (int i = 1; i < 10; ++i) t = fmaf(t, c, kNormalCdfPoly[i]);
  const float e = cmx_exp2(fmaf(a, t, -1.f));
  return u < 0.f ? e : 1.f - e;
}

// phi(u), the standard normal density, as one 2^x: exp(-u^2 / 2) / sqrt(2 pi) =
// 2^(u^2 A + B), A = -1 / (2 ln 2), B = log2(1 / sqrt(2 pi)) (as the Triton kernels).
__device__ __forceinline__ float normal_pdf(float u) {
  return cmx_exp2(fmaf(u * u, -0.72134752044448170f, -1.3257480647361593f));
}

// act(u), and act'(u) into grad, from one evaluation of what the two share (GELU's Phi: its
// derivative is Phi(u) + u phi(u); the tanh form's tanh). du_of needs both: called apart, with
// act(u) under its batch-statistics branch, the compiler evaluated Phi twice wherever it did
// not unswitch the loop on that branch (three 2^x per element of du where two do: B2 on CUDA
// cores and the fused tensor-core B2, sm_90 [C]). act_fwd and act_grad are this function with
// the other result unused (its arithmetic removed as dead code).
__device__ __forceinline__ float act_fwd_grad(float u, int act, float& grad) {
  if (act == CMX_ACT_GELU) {
    const float p = normal_cdf(u);
    grad = fmaf(u, normal_pdf(u), p);
    return u * p;
  }
  if (act == CMX_ACT_GELU_TANH) {
    const float t = tanhf(0.79788456080286536f * (u + 0.044715f * u * u * u));
    const float dt = 0.79788456080286536f * (1.f + 3.f * 0.044715f * u * u);
    grad = 0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * dt;
    return 0.5f * u * (1.f + t);
  }
  grad = u > 0.f ? 1.f : 0.f;
  return u > 0.f ? u : 0.f;
}

__device__ __forceinline__ float act_fwd(float u, int act) {
  float unused;
  return act_fwd_grad(u, act, unused);
}

__device__ __forceinline__ float act_grad(float u, int act) {
  float grad;
  act_fwd_grad(u, act, grad);
  return grad;
}

template <typename T>
__device__ __forceinline__ float ld(const T* p, int64_t i) {
  return cmx_to_float(p[i]);
}

// ---------------------------------------------------------------- index helpers (64-bit)
// The only places element offsets are formed; unit-tested beyond 2^31 through the
// emulation build's cmx_index_probe.
__host__ __device__ __forceinline__ int64_t plane_base(const Geom& geo, int n, int c) {
  return static_cast<int64_t>(n) * geo.sN + static_cast<int64_t>(c) * geo.sC;
}

__host__ __device__ __forceinline__ int64_t offset_of(const Geom& geo, int64_t base, int h,
                                                      int w) {
  return base + static_cast<int64_t>(h) * geo.sH + static_cast<int64_t>(w) * geo.sW;
}

// ---------------------------------------------------------------- work, tiles and lanes
// One-dimensional grid (at most 2^31 - 1 blocks, checked by the planner): block b takes
// channel block b / parts and the part b % parts of the (image, tile) items, in order
// (consecutive tiles of a plane on one block: their halos overlap in L1/L2). Every reduction
// writes one partial row per part, so the partial traffic does not grow with N or the
// number of tiles.
struct Work {
  int c0, cn;            // first channel, channels present (<= CB at the last block)
  int first, last;       // items [first, last)
  int part;              // partial row index
};

__device__ __forceinline__ Work work_of(const Geom& geo) {
  Work w;
  const unsigned b = blockIdx.x;  // 32-bit division: a 64-bit one is a called subroutine
  w.part = static_cast<int>(b % static_cast<unsigned>(geo.parts));
  w.c0 = static_cast<int>(b / static_cast<unsigned>(geo.parts)) * geo.CB;
  w.cn = min(geo.CB, geo.C - w.c0);
  const int64_t items = static_cast<int64_t>(geo.N) * geo.tiles_per_img;
  w.first = static_cast<int>(items * w.part / geo.parts);
  w.last = static_cast<int>(items * (w.part + 1) / geo.parts);
  return w;
}

struct Tile {
  int n, c0, cn;        // image, first channel, channels present
  int h0, w0, th, tw;   // th, tw: valid extent of this (possibly edge) tile
};

__device__ __forceinline__ Tile tile_at(const Geom& geo, const Work& w, int item) {
  Tile t;
  t.n = item / geo.tiles_per_img;
  const int ti = item % geo.tiles_per_img;
  t.c0 = w.c0;
  t.cn = w.cn;
  t.h0 = (ti / geo.tiles_w) * geo.TH;
  t.w0 = (ti % geo.tiles_w) * geo.TW;
  t.th = min(geo.TH, geo.H - t.h0);
  t.tw = min(geo.TW, geo.W - t.w0);
  return t;
}

// This thread's channel in the block and output group; threads are grouped by channel
// (tpc = GH*GW consecutive threads per channel).
struct Lane {
  int cl, grp, gr, gc;
  bool active;  // cl < t.cn (threads of channels beyond C only join the barriers)
  bool first;   // the channel's first thread (writes its partials)
};

__device__ __forceinline__ Lane lane_of(const Geom& geo, const Work& w) {
  const int tpc = geo.GH * geo.GW;
  Lane l;
  l.cl = static_cast<int>(threadIdx.x) / tpc;
  l.grp = static_cast<int>(threadIdx.x) % tpc;
  l.gr = l.grp / geo.GW;
  l.gc = l.grp % geo.GW;
  l.active = l.cl < w.cn;
  l.first = l.grp == 0;
  return l;
}

__device__ __forceinline__ bool inside(const Tile& t, int r, int c) {
  return r < t.th && c < t.tw;
}

// ---------------------------------------------------------------- shared-memory planes
// A rectangle of R rows x S columns per channel (S a multiple of 4: rows are 16-byte
// aligned); channel planes P floats apart, P = 4 (mod 32), so that channels_last staging
// stores of many channels at one position spread over the banks.
// With odd_quads the row stride is an odd number of 16-byte quads: rows r and r + 1..7 then
// start in different banks mod 32 (B2's dW loop reads many rows at once with scalar loads).
__host__ __device__ constexpr int row_stride(int cols, bool odd_quads) {
  return odd_quads && round_up(cols, 4) % 8 == 0 ? round_up(cols, 4) + 4 : round_up(cols, 4);
}
struct Planes {
  int R, S, P;
  __host__ __device__ Planes() : R(0), S(0), P(0) {}
  __host__ __device__ Planes(int rows, int cols, bool odd_quads = false)
      : R(rows), S(row_stride(cols, odd_quads)), P(round_up(rows * S, 32) + 4) {}
  __host__ __device__ int floats(int CB) const { return R > 0 ? CB * P : 0; }
};

// Weights: K rows of round_up(K, 4) floats per channel (16-byte aligned rows).
__host__ __device__ constexpr int weight_stride(int K) { return round_up(K, 4); }
__host__ __device__ constexpr int weight_floats(int CB, int K) {
  return CB * K * weight_stride(K);
}

// Output transpose buffer of channels_last (positions x padded channels).
__host__ __device__ inline int out_channels_stride(int CB) { return round_up(CB + 4, 4); }

// ---------------------------------------------------------------- 16-byte global access
template <typename T>
struct alignas(16) Vec16 {
  T v[Blk<T>::VEC];
};

// A misaligned pointer is undefined behaviour (UBSan reports it in the emulator; the GPU
// faults): the planner enables these only when every address involved is aligned.
template <typename T>
__device__ __forceinline__ Vec16<T> ld16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void st16(T* p, const Vec16<T>& v) {
  *reinterpret_cast<Vec16<T>*>(p) = v;
}

// N consecutive floats (the saved u: fp32 beside a row chunk of x) in N / 4 16-byte loads.
template <int N>
__device__ __forceinline__ void ld16_floats(const float* p, float (&v)[N]) {
  CMX_UNROLL
  for (int q = 0; q < N / 4; ++q) {
    const Vec16<float> f = ld16(p + 4 * q);
    CMX_UNROLL
    for (int e = 0; e < 4; ++e) v[4 * q + e] = f.v[e];
  }
}

// ---------------------------------------------------------------- staging
// A rectangle of image rows r0 .. r0 + R - 1 and columns q0 .. q0 + Q - 1 (it may reach
// outside the image: the padding) of the tile's channels.
struct Rect {
  int r0, q0, R, Q;
};

// L2 prefetch of what stage() reads of x for rectangle `rect` of tile t: one prefetch per
// 128-byte line of each contiguous run (a row of a channel along W in NCHW, the tile's
// channels at one position in channels_last), every address inside the image (16-byte path
// only). The staging loop issues one load per thread at a time and waits for it; issued
// ahead (the next item's while this one computes, or a whole tile before its staging loop),
// the prefetches put the block's bytes in flight at once and those loads then hit L2.
template <typename T>
__device__ void prefetch_rect(const T* __restrict__ x, const Geom& geo, const Tile& t,
                              const Rect& rect) {
  if (!geo.prefetch) return;
  const int h0 = max(rect.r0, 0), h1 = min(rect.r0 + rect.R, geo.H);
  const int w0 = max(rect.q0, 0), w1 = min(rect.q0 + rect.Q, geo.W);
  if (h0 >= h1 || w0 >= w1) return;
  const bool nchw = geo.layout == kNCHW;
  // runs: (channel, row) along W, or (row, column) along C; one thread per run
  const int inner = nchw ? h1 - h0 : w1 - w0;
  const int runs = (nchw ? t.cn : h1 - h0) * inner;
  const int bytes = (nchw ? w1 - w0 : t.cn) * static_cast<int>(sizeof(T));
  const int64_t img = static_cast<int64_t>(t.n) * geo.sN;
  for (int it = static_cast<int>(threadIdx.x); it < runs; it += static_cast<int>(blockDim.x)) {
    const int o = it / inner, i = it % inner;
    const int64_t off = nchw ? offset_of(geo, img + static_cast<int64_t>(t.c0 + o) * geo.sC,
                                         h0 + i, w0)
                             : offset_of(geo, img + t.c0, h0 + o, w0 + i);
    const char* p = reinterpret_cast<const char*>(x + off);
    cmx_prefetch_l2(p);
    // the run's next lines: from the first 128-byte boundary after p
    const int first = 128 - static_cast<int>(reinterpret_cast<uintptr_t>(p) & 127);
    for (int b = first; b < bytes; b += 128) cmx_prefetch_l2(p + b);
  }
}

// The first item of a block's part: fetch(its tile) prefetches its rectangles, then a
// barrier, so that every line is in flight before any staging load (each next item's are
// prefetched while the current one computes). Every thread of the block calls it.
template <class Fetch>
__device__ __forceinline__ void prefetch_first_item(bool on, const Geom& geo, const Work& wk,
                                                    Fetch&& fetch) {
  if (!on || wk.first >= wk.last) return;
  fetch(tile_at(geo, wk, wk.first));
  __syncthreads();
}

// s[cl*P + r*S + q] <- the input of channel c0+cl at image row rect.r0 + r, column
// rect.q0 + q (r < rect.R, q < rect.Q), with the affine when `affine`; zero outside the image and for channels
// beyond t.cn (the padding pads the block input, so it stays zero with an affine).
template <typename T>
__device__ void stage(float* s, const Planes& L, const T* __restrict__ x, const Geom& geo,
                      const Tile& t, const Rect& rect, const InAffine& in_aff,
                      bool affine) {
  constexpr int V = Blk<T>::VEC;
  const int nthreads = static_cast<int>(blockDim.x);
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t img = static_cast<int64_t>(t.n) * geo.sN;
  const int r0 = rect.r0, q0 = rect.q0, R = rect.R, Q = rect.Q;
  if (geo.vec && geo.layout == kNCHW) {
    // 16-byte chunks along W; chunk k covers columns [a + k*V, a + k*V + V), a aligned down
    const int a = (q0 >= 0 ? q0 / V : -cdiv(-q0, V)) * V;
    const int nk = cdiv(q0 + Q - a, V);
    const int items = geo.CB * R * nk;
    for (int it = tid; it < items; it += nthreads) {
      const int k = it % nk, rr = (it / nk) % R, cl = it / (nk * R);
      const int h = r0 + rr, w = a + k * V, c = t.c0 + cl;
      float v[V];
      if (cl < t.cn && h >= 0 && h < geo.H && w >= 0 && w < geo.W) {
        const T* src = x + img + static_cast<int64_t>(c) * geo.sC +
                       static_cast<int64_t>(h) * geo.sH + w;
        cmx_note_staged_load(src);
        const Vec16<T> raw = ld16(src);
        const float sc = affine ? in_aff.scale[c] : 1.f, sh = affine ? in_aff.shift[c] : 0.f;
        CMX_UNROLL
        for (int e = 0; e < V; ++e) v[e] = cmx_to_float(raw.v[e]) * sc + sh;
      } else {
        CMX_UNROLL
        for (int e = 0; e < V; ++e) v[e] = 0.f;
      }
      float* row = s + cl * L.P + rr * L.S;
      CMX_UNROLL
      for (int e = 0; e < V; ++e) {
        const int q = w + e - q0;
        if (q >= 0 && q < Q) row[q] = v[e];
      }
    }
  } else if (geo.vec) {
    // channels_last: 16-byte chunks of V channels at one position, scattered to V planes
    const int nk = geo.CB / V;  // the planner makes CB a multiple of V on this path
    const int items = R * Q * nk;
    for (int it = tid; it < items; it += nthreads) {
      const int k = it % nk, pos = it / nk;
      const int rr = pos / Q, q = pos % Q;
      const int h = r0 + rr, w = q0 + q, c = t.c0 + k * V;
      float v[V];
      if (c < geo.C && h >= 0 && h < geo.H && w >= 0 && w < geo.W) {
        const T* src = x + img + static_cast<int64_t>(h) * geo.sH +
                       static_cast<int64_t>(w) * geo.sW + c;
        cmx_note_staged_load(src);
        const Vec16<T> raw = ld16(src);
        CMX_UNROLL
        for (int e = 0; e < V; ++e)
          v[e] = affine ? cmx_to_float(raw.v[e]) * in_aff.scale[c + e] + in_aff.shift[c + e]
                        : cmx_to_float(raw.v[e]);
      } else {
        CMX_UNROLL
        for (int e = 0; e < V; ++e) v[e] = 0.f;
      }
      CMX_UNROLL
      for (int e = 0; e < V; ++e) s[(k * V + e) * L.P + rr * L.S + q] = v[e];
    }
  } else {
    // any strides: one element per item (when the alignment does not allow chunks)
    const int items = geo.CB * R * Q;
    for (int it = tid; it < items; it += nthreads) {
      const int q = it % Q, rr = (it / Q) % R, cl = it / (Q * R);
      const int h = r0 + rr, w = q0 + q, c = t.c0 + cl;
      float v = 0.f;
      if (cl < t.cn && h >= 0 && h < geo.H && w >= 0 && w < geo.W) {
        v = ld(x, offset_of(geo, plane_base(geo, t.n, c), h, w));
        if (affine) v = v * in_aff.scale[c] + in_aff.shift[c];
      }
      s[cl * L.P + rr * L.S + q] = v;
    }
  }
}

// The reverse of stage for the saved u: y[c0 + cl, h0 + r, w0 + q] <- s[cl*P + r*S + q] for
// the tile's positions and channels, float32 with x's element strides. On the 16-byte path,
// chunks of 4 floats along W (NCHW) or along C (channels_last: one float from each of 4
// channel planes); x's 16-byte path makes the tile's extent along that dimension a multiple
// of 4 (W, or C and the channel block, multiples of 4 or 8; the check below only guards).
__device__ inline void unstage(float* __restrict__ y, const float* s, const Planes& L,
                               const Geom& geo, const Tile& t) {
  constexpr int V = Blk<float>::VEC;
  const int nthreads = static_cast<int>(blockDim.x);
  const int tid = static_cast<int>(threadIdx.x);
  const bool nchw = geo.layout == kNCHW;
  // items: (channel, row, chunk of V columns) or (position, chunk of V channels)
  const int nk = geo.vec ? cdiv(nchw ? t.tw : t.cn, V) : (nchw ? t.tw : t.cn);
  const int span = geo.vec ? V : 1;
  const int items = (nchw ? t.cn * t.th : t.th * t.tw) * nk;
  for (int it = tid; it < items; it += nthreads) {
    const int k = it % nk, rest = it / nk;
    const int cl = nchw ? rest / t.th : k * span, r = nchw ? rest % t.th : rest / t.tw;
    const int q = nchw ? k * span : rest % t.tw;
    const int64_t off = offset_of(geo, plane_base(geo, t.n, t.c0 + cl), t.h0 + r, t.w0 + q);
    const float* src = s + cl * L.P + r * L.S + q;
    const int step = nchw ? 1 : L.P;  // from one element of the chunk to the next
    const int n = min(span, (nchw ? t.tw - q : t.cn - cl));
    if (geo.vec && n == V) {
      Vec16<float> v;
      CMX_UNROLL
      for (int e = 0; e < V; ++e) v.v[e] = src[e * step];
      st16(y + off, v);
    } else {
      for (int e = 0; e < n; ++e) y[off + e * (nchw ? geo.sW : geo.sC)] = src[e * step];
    }
  }
}

// Weights of the block's channels: sw[cl*K*KS + i*KS + j], flipped by 180 degrees if asked.
template <typename T>
__device__ void stage_weights(float* sw, const T* __restrict__ w, const Tile& t, int K,
                              bool flip) {
  const int KS = weight_stride(K), KK = K * K;
  for (int it = static_cast<int>(threadIdx.x); it < t.cn * KK;
       it += static_cast<int>(blockDim.x)) {
    const int cl = it / KK, tap = it % KK;
    const int src = flip ? KK - 1 - tap : tap;
    sw[cl * K * KS + (tap / K) * KS + tap % K] = ld(w, static_cast<int64_t>(t.c0 + cl) * KK + src);
  }
}

// ---------------------------------------------------------------- register-blocked correlation
// acc[ro][o] += sum_{i,j} s[(r + ro + i) * S + c + o + j] * w[i*KS + j] for ro < RH, o < RW:
// every input row r + rho is read once (16-byte shared loads) and used for every output row
// ro = rho - i it reaches. r, c multiples of RH, RW; s, S, c 16-byte aligned.
template <int KT, int RH, int RW>
__device__ __forceinline__ void correlate(const float* __restrict__ s, int S,
                                          const float* __restrict__ w, int K, int r, int c,
                                          float (&acc)[RH][RW]) {
  if constexpr (KT > 0) {
    constexpr int KS = weight_stride(KT);
    constexpr int NV = round_up(RW + KT - 1, 4);
    // rows one at a time: a fully unrolled row loop keeps every row's loads in flight and
    // needs ~130 registers; per row there are up to RH*KT*RW FMAs, so the loop costs little
    CMX_NO_UNROLL
    for (int rho = 0; rho < RH + KT - 1; ++rho) {
      float v[NV];
      const float* sr = s + (r + rho) * S + c;
      CMX_UNROLL
      for (int e = 0; e < NV; e += 4) {
        const float4 q = *reinterpret_cast<const float4*>(sr + e);
        v[e] = q.x;
        v[e + 1] = q.y;
        v[e + 2] = q.z;
        v[e + 3] = q.w;
      }
      CMX_UNROLL
      for (int ro = 0; ro < RH; ++ro) {
        const int i = rho - ro;
        if (i < 0 || i >= KT) continue;
        CMX_UNROLL
        for (int e = 0; e < KS; e += 4) {  // 4 weights at a time: few live registers
          const float4 q = *reinterpret_cast<const float4*>(w + i * KS + e);
          const float wv[4] = {q.x, q.y, q.z, q.w};
          CMX_UNROLL
          for (int j = e; j < e + 4 && j < KT; ++j) {
            CMX_UNROLL
            for (int o = 0; o < RW; ++o) acc[ro][o] += v[o + j] * wv[j - e];
          }
        }
      }
    }
  } else {
    // run-time k: the row's taps 4 at a time, as above — one 16-byte load of 4 weights per
    // output row and RW + 3 input values (16-byte loads) per 4 taps; the last 4 may pass K
    // (weights and inputs there are read, not used: every plane ends >= 4 floats of slack)
    const int KS = weight_stride(K);
    constexpr int NV = round_up(RW + 3, 4);
    for (int rho = 0; rho < RH + K - 1; ++rho) {
      const float* sr = s + (r + rho) * S + c;
      for (int e = 0; e < K; e += 4) {
        float v[NV];
        CMX_UNROLL
        for (int q = 0; q < NV; q += 4) {
          const float4 f = *reinterpret_cast<const float4*>(sr + e + q);
          v[q] = f.x;
          v[q + 1] = f.y;
          v[q + 2] = f.z;
          v[q + 3] = f.w;
        }
        const int jn = K - e;  // taps of this group inside the row (>= 4 but in the last)
        CMX_UNROLL
        for (int ro = 0; ro < RH; ++ro) {
          const int i = rho - ro;
          if (i < 0 || i >= K) continue;
          const float4 f = *reinterpret_cast<const float4*>(w + i * KS + e);
          const float wv[4] = {f.x, f.y, f.z, f.w};
          CMX_UNROLL
          for (int j = 0; j < 4; ++j) {
            if (j >= jn) break;
            CMX_UNROLL
            for (int o = 0; o < RW; ++o) acc[ro][o] += v[o + j] * wv[j];
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- block reductions
// Per-channel sums over the block: every thread puts its value in red, then the channel's
// sum is taken by thread cl in a fixed order (deterministic) and broadcast through red2.
// Every thread of the block must call it.
__device__ __forceinline__ float channel_sum(float v, const Geom& geo, const Lane& l, float* red,
                                             float* red2) {
  const int tpc = geo.GH * geo.GW;
  red[threadIdx.x] = v;
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < geo.CB) {
    const float* p = red + threadIdx.x * tpc;
    float s = 0.f;
    for (int i = 0; i < tpc; ++i) s += p[i];
    red2[threadIdx.x] = s;
  }
  __syncthreads();
  const float r = red2[l.cl];
  __syncthreads();  // red / red2 are reused by the next call
  return r;
}

// ---------------------------------------------------------------- output stores
// Stores this thread's outputs val[ro][o] (channel c0 + cl, tile rows gr*RH + ro, columns
// gc*RW + o). NCHW: one 16-byte store per output row where aligned. channels_last: through
// the shared buffer sout (every thread of the block calls it; sout may alias staged data:
// a barrier first), then 16-byte chunks along C.
template <typename T>
__device__ void store_group(T* __restrict__ y, const Geom& geo, const Tile& t, const Lane& l,
                            const float (&val)[Blk<T>::RH][Blk<T>::RW], float* sout) {
  constexpr int RH = Blk<T>::RH, RW = Blk<T>::RW, V = Blk<T>::VEC;
  if (geo.layout == kNCHW) {
    if (!l.active) return;
    const int64_t base = plane_base(geo, t.n, t.c0 + l.cl);
    CMX_UNROLL
    for (int ro = 0; ro < RH; ++ro) {
      const int r = l.gr * RH + ro, c = l.gc * RW;
      if (r >= t.th) continue;
      const int64_t off = offset_of(geo, base, t.h0 + r, t.w0 + c);
      if (geo.vec && c + RW <= t.tw) {
        Vec16<T> v;
        CMX_UNROLL
        for (int o = 0; o < RW; ++o) v.v[o] = cmx_from_float(val[ro][o], T{});
        st16(y + off, v);
      } else {
        for (int o = 0; o < RW && c + o < t.tw; ++o)
          y[off + o * geo.sW] = cmx_from_float(val[ro][o], T{});
      }
    }
    return;
  }
  const int CBp = out_channels_stride(geo.CB);
  __syncthreads();
  if (l.active) {
    CMX_UNROLL
    for (int ro = 0; ro < RH; ++ro)
      CMX_UNROLL
      for (int o = 0; o < RW; ++o) {
        const int r = l.gr * RH + ro, c = l.gc * RW + o;
        if (inside(t, r, c)) sout[(r * geo.TW + c) * CBp + l.cl] = val[ro][o];
      }
  }
  __syncthreads();
  const int nk = geo.vec ? geo.CB / V : geo.CB;
  const int items = t.th * t.tw * nk;
  for (int it = static_cast<int>(threadIdx.x); it < items; it += static_cast<int>(blockDim.x)) {
    const int k = it % nk, pos = it / nk;
    const int r = pos / t.tw, c = pos % t.tw;
    const int64_t off = offset_of(geo, plane_base(geo, t.n, t.c0), t.h0 + r, t.w0 + c);
    const float* src = sout + (r * geo.TW + c) * CBp;
    if (geo.vec) {
      if (t.c0 + k * V >= geo.C) continue;
      Vec16<T> v;
      CMX_UNROLL
      for (int e = 0; e < V; ++e) v.v[e] = cmx_from_float(src[k * V + e], T{});
      st16(y + off + k * V, v);
    } else if (k < t.cn) {
      y[off + k * geo.sC] = cmx_from_float(src[k], T{});
    }
  }
}

// ---------------------------------------------------------------- forward-type kernels
// Shared layout of F1, F2 and B1 (floats, every region 16-byte aligned): the weights, the
// input planes with halo, the tile planes (B1: dout; with the saved u, u: F1 writes it
// there to store it, F2 reads it there), the reduction scratch; the output transpose buffer
// of channels_last F2 aliases the input planes (dead by then). A pass that reads the saved
// u convolves nothing: no weights, and its input planes are the tile's (no halo: F2's
// residual x, B1's u).
struct FwdSmem {
  Planes in, tile;
  int wf, red, out;
  __host__ __device__ FwdSmem(const Geom& g, int RH, int RW, bool conv, bool with_tile,
                              bool with_out)
      : in(g.GH * RH + (conv ? g.K - 1 : 0), g.GW * RW + (conv ? g.K - 1 : 0)),
        tile(with_tile ? Planes(g.GH * RH, g.GW * RW) : Planes()),
        wf(conv ? weight_floats(g.CB, g.K) : 0),
        red(kMaxThreads + 32),
        out(with_out && g.layout == kChannelsLast ? g.TH * g.TW * out_channels_stride(g.CB)
                                                  : 0) {}
  __host__ __device__ int x() const { return wf; }
  __host__ __device__ int dout(int CB) const { return x() + in.floats(CB); }
  __host__ __device__ int scratch(int CB) const { return dout(CB) + tile.floats(CB); }
  __host__ __device__ int sout() const { return x(); }
  __host__ __device__ int total(int CB) const {
    const int a = scratch(CB) + red, b = sout() + out;
    return a > b ? a : b;
  }
};

// u = conv(input) + b for this thread's RH x RW outputs (the staged input planes `s`, with
// halo, and weights); SU: u read from the staged saved u (tile planes `s`, no halo).
template <typename T, int KT, bool SU>
__device__ __forceinline__ void conv_group(const float* s, const Planes& P, const float* sw,
                                           const Geom& geo, const Lane& l, float bias,
                                           float (&acc)[Blk<T>::RH][Blk<T>::RW]) {
  constexpr int RH = Blk<T>::RH, RW = Blk<T>::RW;
  if constexpr (SU) {
    const float* su = s + l.cl * P.P + l.gr * RH * P.S + l.gc * RW;
    CMX_UNROLL
    for (int ro = 0; ro < RH; ++ro)
      CMX_UNROLL
      for (int o = 0; o < RW; ++o) acc[ro][o] = su[ro * P.S + o];
  } else {
    const int K = KT > 0 ? KT : geo.K;
    CMX_UNROLL
    for (int ro = 0; ro < RH; ++ro)
      CMX_UNROLL
      for (int o = 0; o < RW; ++o) acc[ro][o] = bias;
    correlate<KT, RH, RW>(s + l.cl * P.P, P.S, sw + l.cl * K * weight_stride(K), K, l.gr * RH,
                          l.gc * RW, acc);
  }
}

// ---------------------------------------------------------------- F1: statistics
// Per-part, per-channel mean and centred M2 of g = act(conv(input) + b) over the part's
// tiles (each tile's centred sums merged in order by Chan's formula: stable for large mean
// offsets; every thread of a channel merges the same values), and the part's count.
// SU: the convolution output u = conv(input) + b is also saved to u_out in float32 (x's
// element strides) for F2, B1 and B2 to read instead of convolving again.
template <typename T, int KT, bool SU>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    stats_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                 float* __restrict__ mean_p, float* __restrict__ m2_p,
                 float* __restrict__ count_p, float* __restrict__ u_out, InAffine in_aff,
                 Geom geo) {
  constexpr int RH = Blk<T>::RH, RW = Blk<T>::RW;
  CMX_DYN_SMEM(smem);
  const Work wk = work_of(geo);
  const Lane l = lane_of(geo, wk);
  const int K = KT > 0 ? KT : geo.K;
  const FwdSmem L(geo, RH, RW, true, SU, false);
  float *sw = smem, *sx = smem + L.x(), *su = smem + L.dout(geo.CB),
        *red = smem + L.scratch(geo.CB), *red2 = red + kMaxThreads;
  auto rx = [&](const Tile& tt) {
    return Rect{tt.h0 - geo.PB, tt.w0 - geo.PB, L.in.R, L.in.S};
  };
  float n_run = 0.f, mean_run = 0.f, m2_run = 0.f;
  // L2 prefetch (not SU: F1 saving u runs at its 80-register cap, where the prefetches'
  // addresses spill; from k = 7 up, where it saves u, it is bound by the convolution)
  const bool prefetch = !SU && geo.prefetch;
  auto fetch = [&](const Tile& tt) { prefetch_rect(x, geo, tt, rx(tt)); };
  prefetch_first_item(prefetch, geo, wk, fetch);
  for (int item = wk.first; item < wk.last; ++item) {
    const Tile t = tile_at(geo, wk, item);
    if (item == wk.first) stage_weights(sw, w, t, K, false);
    stage(sx, L.in, x, geo, t, rx(t), in_aff, in_aff.scale != nullptr);
    __syncthreads();
    float g[RH][RW];
    float sum = 0.f;
    if (l.active) {
      conv_group<T, KT, false>(sx, L.in, sw, geo, l, ld(b, t.c0 + l.cl), g);
      // SU: u to the tile plane; the block stores it once all threads have
      float* p = su + l.cl * L.tile.P + l.gr * RH * L.tile.S + l.gc * RW;
      CMX_UNROLL
      for (int ro = 0; ro < RH; ++ro)
        CMX_UNROLL
        for (int o = 0; o < RW; ++o) {
          if (SU) p[ro * L.tile.S + o] = g[ro][o];
          g[ro][o] = act_fwd(g[ro][o], geo.act);
          if (inside(t, l.gr * RH + ro, l.gc * RW + o)) sum += g[ro][o];
        }
    }
    // the next item's input, while this one reduces
    if (prefetch && item + 1 < wk.last) fetch(tile_at(geo, wk, item + 1));
    const float cnt = static_cast<float>(t.th * t.tw);
    const float mean = channel_sum(sum, geo, l, red, red2) / cnt;  // (its barriers also
    float m2 = 0.f;                                               //  retire the staging)
    if (SU) unstage(u_out, su, L.tile, geo, t);  // (the next tile's writes follow m2's
                                                  //  barriers)
    if (l.active) {
      CMX_UNROLL
      for (int ro = 0; ro < RH; ++ro)
        CMX_UNROLL
        for (int o = 0; o < RW; ++o)
          if (inside(t, l.gr * RH + ro, l.gc * RW + o)) {
            const float d = g[ro][o] - mean;
            m2 += d * d;
          }
    }
    m2 = channel_sum(m2, geo, l, red, red2);
    const float n_new = n_run + cnt, delta = mean - mean_run;
    mean_run += delta * (cnt / n_new);
    m2_run += m2 + delta * delta * (n_run * cnt / n_new);
    n_run = n_new;
  }
  if (l.active && l.first) {
    mean_p[static_cast<int64_t>(wk.part) * geo.C + wk.c0 + l.cl] = mean_run;
    m2_p[static_cast<int64_t>(wk.part) * geo.C + wk.c0 + l.cl] = m2_run;
    if (wk.c0 + l.cl == 0) count_p[wk.part] = n_run;  // counts on the device: no host copy
  }
}

// ---------------------------------------------------------------- F2 / eval: apply
// F2's output from the block input and u = conv(input) + b of channel c: input + a*act(u) +
// shift, a = gamma*rstd, shift = beta - a*mean. One expression for the tiled and the
// element-by-element kernel, so that their results agree bitwise.
struct BnApply {
  float a, shift;
};

__device__ __forceinline__ BnApply bn_apply_of(const float* __restrict__ gamma,
                                               const float* __restrict__ rstd,
                                               const float* __restrict__ beta,
                                               const float* __restrict__ mean, int c) {
  const float a = gamma[c] * rstd[c];
  return {a, beta[c] - a * mean[c]};
}

__device__ __forceinline__ float bn_apply(float input, float u, const BnApply& bn, int act) {
  return input + bn.a * act_fwd(u, act) + bn.shift;
}

// out = input + a*g + shift with a = gamma*rstd, shift = beta - a*mean. SU: g from the saved
// u (F1's, float32 with x's strides) instead of the convolution.
template <typename T, int KT, bool SU>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    apply_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                 const float* __restrict__ u, const float* __restrict__ mean,
                 const float* __restrict__ rstd, const float* __restrict__ gamma,
                 const float* __restrict__ beta, T* __restrict__ out, InAffine in_aff,
                 Geom geo) {
  constexpr int RH = Blk<T>::RH, RW = Blk<T>::RW;
  CMX_DYN_SMEM(smem);
  const Work wk = work_of(geo);
  const Lane l = lane_of(geo, wk);
  const int K = KT > 0 ? KT : geo.K;
  const int pb = SU ? 0 : geo.PB;  // the halo of the staged input
  const FwdSmem L(geo, RH, RW, !SU, SU, true);
  float *sw = smem, *sx = smem + L.x(), *su = smem + L.dout(geo.CB), *sout = smem + L.sout();
  const InAffine none{nullptr, nullptr, nullptr, nullptr};
  const Tile t = tile_at(geo, wk, wk.first);  // F2 blocks take one item each (the planner)
  const Rect rx{t.h0 - pb, t.w0 - pb, L.in.R, L.in.S}, ru{t.h0, t.w0, L.tile.R, L.tile.S};
  prefetch_rect(x, geo, t, rx);
  if (SU) prefetch_rect(u, geo, t, ru);
  if (geo.prefetch) __syncthreads();  // every line in flight before any staging load
  if (!SU) stage_weights(sw, w, t, K, false);
  stage(sx, L.in, x, geo, t, rx, in_aff, in_aff.scale != nullptr);
  if (SU) stage(su, L.tile, u, geo, t, ru, none, false);
  __syncthreads();
  float y[RH][RW];
  if (l.active) {
    const int c = t.c0 + l.cl;
    const BnApply bn = bn_apply_of(gamma, rstd, beta, mean, c);
    conv_group<T, KT, SU>(SU ? su : sx, SU ? L.tile : L.in, sw, geo, l, SU ? 0.f : ld(b, c), y);
    const float* xin = sx + l.cl * L.in.P + pb * L.in.S + pb;
    CMX_UNROLL
    for (int ro = 0; ro < RH; ++ro)
      CMX_UNROLL
      for (int o = 0; o < RW; ++o) {
        const int r = l.gr * RH + ro, q = l.gc * RW + o;
        y[ro][o] = bn_apply(xin[r * L.in.S + q], y[ro][o], bn, geo.act);
      }
  }
  store_group<T>(out, geo, t, l, y, sout);
}

// ---------------------------------------------------------------- F2 reading the saved u
// apply_kernel's SU result element by element: with u saved there is nothing to convolve,
// so no tile, halo, shared memory or barrier (staging u and x into channel planes and
// channels_last's transposed store cost the tiled kernel 4x its bytes' time on an H200).
// x, u and out are dense in one layout (the planner checks), seen as rows of L contiguous
// elements: NCHW, a plane per row (N*C rows of H*W, channel = row mod C); channels_last, a
// position per row (N*H*W rows of C, channel = column). Each step of a grid-stride loop
// takes one chunk of a row: V elements (16 bytes of x) when geo.vec, else one. The row,
// column and channel advance by additions: the loop divides nothing.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    apply_u_kernel(const T* __restrict__ x, const float* __restrict__ u,
                   const float* __restrict__ mean, const float* __restrict__ rstd,
                   const float* __restrict__ gamma, const float* __restrict__ beta,
                   T* __restrict__ out, InAffine in_aff, Geom geo) {
  constexpr int V = Blk<T>::VEC;
  const bool cl = geo.layout == kChannelsLast, affine = in_aff.scale != nullptr;
  const int64_t rows = static_cast<int64_t>(geo.N) * (cl ? static_cast<int64_t>(geo.H) * geo.W
                                                         : geo.C);
  const int L = cl ? geo.C : geo.H * geo.W;  // (the planner: below 2^31)
  const int vw = geo.vec ? V : 1, chunks = L / vw;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t row = start / chunks;
  int col = static_cast<int>(start % chunks);
  const int64_t drow = step / chunks;
  const int dcol = static_cast<int>(step % chunks);
  int ch = cl ? 0 : static_cast<int>(row % geo.C);  // NCHW: the row's channel
  const int dch = cl ? 0 : static_cast<int>(drow % geo.C);
  for (; row < rows;) {
    const int64_t off = row * L + static_cast<int64_t>(col) * vw;
    float xv[V], uv[V];
    if (geo.vec) {
      const Vec16<T> raw = ld16(x + off);
      CMX_UNROLL
      for (int e = 0; e < V; ++e) xv[e] = cmx_to_float(raw.v[e]);
      ld16_floats(u + off, uv);
    } else {
      xv[0] = ld(x, off);
      uv[0] = u[off];
    }
    float y[V];
    CMX_UNROLL
    for (int e = 0; e < V; ++e) {
      if (e >= vw) break;
      const int c = cl ? col * vw + e : ch;
      // the input as stage() forms it, then apply_kernel's expression: bitwise its result
      const float sc = affine ? in_aff.scale[c] : 1.f, sh = affine ? in_aff.shift[c] : 0.f;
      y[e] = bn_apply(xv[e] * sc + sh, uv[e], bn_apply_of(gamma, rstd, beta, mean, c),
                      geo.act);
    }
    if (geo.vec) {
      Vec16<T> v;
      CMX_UNROLL
      for (int e = 0; e < V; ++e) v.v[e] = cmx_from_float(y[e], T{});
      st16(out + off, v);
    } else {
      out[off] = cmx_from_float(y[0], T{});
    }
    col += dcol;
    row += drow;
    ch += dch;
    if (col >= chunks) {
      col -= chunks;
      ++row;
      ++ch;
    }
    if (ch >= geo.C) ch -= geo.C;
  }
}

// ---------------------------------------------------------------- F2 / eval on tensor cores
// apply_kernel's result (no saved u) with the convolution on tensor cores, for 16-bit x in
// NCHW on the 16-byte path and k <= kMmaMaxK (docs/DESIGN.md, "CUDA tensor cores"). For
// kernel row i and 8 output columns c0 .. c0 + 7 the convolution is one m16n8k16 MMA per 16
// output rows and 16 input columns: u[r, c0 + n] += sum_q X_i[r, q] T_i[q, n], X_i[r, q] =
// halo[r + i][c0 + e + q] and the banded Toeplitz T_i[q, n] = W[i, q - s - n] (0 outside
// 0 <= q - s - n < K). A block takes one 32 x 32 tile of one channel in one image: its halo
// (32 + K - 1 rows, staged once with 16-byte loads, zero outside the image) serves every
// kernel row, whose operands are register loads from shared memory at a row offset. The
// products of 16-bit values are exact in the fp32 accumulators: the result is apply_kernel's
// up to summation order. With the input affine a*x + c the MMAs take x and the in-image mask
// M (exact 0 / 1): u = a (X * W) + c (M * W) + b, no rounding of a*x + c to 16 bits.
constexpr int kMmaTile = 32;    // output rows and columns of a block
constexpr int kMmaWarps = 2;    // a warp per 16 output rows, all 32 columns (4 MMA columns)
constexpr int kMmaMaxK = 17;    // the halo starts 8 columns (16 bytes) left of the tile
constexpr int kMmaLead = 8;
// F1's and B2's tensor-core kernels: up to 128 registers (2 warps a block: 8 blocks of 64
// threads fill an SM's registers; shared memory limits them to about that anyway)
constexpr int kMmaMaxRegs = 128;

// Shared-memory rows of `chunks` 16-byte chunks: `stride` elements apart, an odd number of
// 4-word groups (the 8 rows of an operand load fall in different banks).
__host__ __device__ constexpr int mma_stride(int chunks) {
  return chunks * 8 + ((chunks * 4) % 8 == 0 ? 8 : 0);
}

// The channel's weights for the MMAs' B fragments, in shared memory (stage_mma_weights):
// kernel row i at i * mma_wrow(KS), tap j at column j + 8 (KS k-steps reach taps -8 .. 16 KS
// - 1: zeros outside [0, K), so that the loads need no guard).
__host__ __device__ constexpr int mma_wrow(int ks) { return 16 * ks + 8; }

// The shapes of one kernel size (host and device): the windows start e columns into the halo
// (even: 4-byte aligned operand pairs) and T_i's band s columns after that; ks MMAs of 16
// input columns cover the 8 + K - 1 + s a window needs; each halo row is `chunks` 16-byte
// chunks, mma_stride(chunks) elements apart.
struct MmaShape {
  int K, PB, e, s, ks, chunks, stride, rows;
  // pb: the correlation's padding before (B2's dx: the flipped kernel's, k - 1 - pad_before)
  __host__ __device__ constexpr MmaShape(int k, int pb = -1)
      : K(k), PB(pb < 0 ? pad_before(k) : pb), e(0), s(0), ks(0), chunks(0), stride(0),
        rows(kMmaTile + k - 1) {
    const int lead = kMmaLead - PB;  // the first tap's column in the halo, output column 0
    e = lead & ~1;
    s = lead & 1;
    ks = cdiv(7 + s + K, 16);
    chunks = cdiv(e + kMmaTile - 8 + 16 * ks, 8);
    stride = mma_stride(chunks);
  }
  // shared memory in elements: the halo (and the mask plane), then the staged weights (rows
  // for two k-steps, what a generic-k instantiation stages)
  __host__ __device__ constexpr int halo() const { return rows * stride; }
  __host__ __device__ constexpr int weights_at(bool affine) const {
    return (affine ? 2 : 1) * halo();
  }
  __host__ __device__ constexpr int elements(bool affine) const {
    return weights_at(affine) + K * mma_wrow(2);
  }
  // the end of that layout, 16-byte aligned: where what a kernel adds to it starts
  __host__ __device__ constexpr int aligned_end(bool affine) const {
    return round_up(elements(affine), 8);
  }
  // apply_mma_kernel taking several images: then the second halo buffer, and the elements
  // in all
  __host__ __device__ constexpr int second_halo_at(bool affine) const {
    return aligned_end(affine);
  }
  __host__ __device__ constexpr int pipelined_elements(bool affine) const {
    return second_halo_at(affine) + halo();
  }
  // F1's (stats_mma_kernel): then 4 floats of block sums, at this float offset
  __host__ __device__ constexpr int sums_at(bool affine) const {
    return aligned_end(affine) / 2;
  }
  __host__ __device__ constexpr int stats_bytes(bool affine) const {
    return (sums_at(affine) + 4) * 4;
  }
};

// 16 bytes moved as they are (a halo chunk).
struct alignas(16) Raw16 {
  uint32_t w[4];
};

// Two 16-bit values as one register, a in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(T a, T b) {
  return static_cast<uint32_t>(cmx_bits(a)) | (static_cast<uint32_t>(cmx_bits(b)) << 16);
}

// The two 16-bit values of a register (cmx_ld_pair's order) in fp32.
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t v, float (&f)[2]) {
  T a, b;
  const uint16_t lo = static_cast<uint16_t>(v & 0xffffu), hi = static_cast<uint16_t>(v >> 16);
  std::memcpy(&a, &lo, 2);
  std::memcpy(&b, &hi, 2);
  f[0] = cmx_to_float(a);
  f[1] = cmx_to_float(b);
}

// stage_mma_weights: A strided loop of the block (a barrier must follow before they are
// read); FLIP: the rotated kernel W[K-1-i, K-1-j].

template <typename T, bool FLIP>
__device__ __forceinline__ void stage_mma_weights(T* sw, const T* wc, int K, int ks) {
  const int row = mma_wrow(ks);
  for (int e = static_cast<int>(threadIdx.x); e < K * row; e += static_cast<int>(blockDim.x)) {
    const int i = e / row, j = e % row - 8;
    sw[e] = j >= 0 && j < K ? wc[FLIP ? (K - 1 - i) * K + K - 1 - j : i * K + j]
                            : cmx_from_float(0.f, T{});
  }
}

// The correlation's MMAs of one warp over halo planes in shared memory, row by row of the
// kernel (apply_mma_kernel's convolution; B2's dx, the rotated kernel over du's terms): for
// kernel row i, k-step kk and 8 output columns nb, A = rows g and g + 8 of the warp's 16
// (from row 16 warp) at the window's columns 8 nb + 2t (+1) and + 8, i rows down: register
// loads at a row offset; B = T_i's fragment, the same for every output column: this lane's
// T_i[16 kk + 2t (+1), g] and T_i[16 kk + 2t + 8 (+1), g] = W[i, j] for j = 16 kk + 2t - s -
// g + {0, 1, 8, 9} (0 outside [0, K)), from the staged weights sw (stage_mma_weights) at
// offsets fixed for the lane. Plane p (of NP: plane0, plane1) accumulates into acc0 (p % NA
// == 0) or acc1; both start at zero here.
template <typename T, int KT, int KS, int NP, int NA>
__device__ __forceinline__ void mma_correlate(const T* plane0, const T* plane1, const T* sw,
                                              const MmaShape& S, int warp,
                                              float (&acc0)[4][4], float (&acc1)[4][4]) {
  const int K = KT > 0 ? KT : S.K;  // (a constant trip count where KT is one)
  const int lane = static_cast<int>(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  constexpr int WROW = mma_wrow(KS);
  const T* const wl = sw + 2 * t - S.s - g + 8;
  CMX_UNROLL
  for (int nb = 0; nb < 4; ++nb)
    CMX_UNROLL
    for (int q = 0; q < 4; ++q) acc0[nb][q] = acc1[nb][q] = 0.f;
  const int row0 = (16 * warp + g) * S.stride + S.e + 2 * t;
  CMX_UNROLL
  for (int i = 0; i < K; ++i) {
    CMX_UNROLL
    for (int kk = 0; kk < KS; ++kk) {
      if (kk >= S.ks) break;
      const T* wi = wl + i * WROW + 16 * kk;
      const uint32_t bf[2] = {pack2(wi[0], wi[1]), pack2(wi[8], wi[9])};
      const int o = row0 + i * S.stride + 16 * kk;
      auto mmas = [&](const T* plane, float (&acc)[4][4]) {
        uint32_t lo[5], hi[5];
        CMX_UNROLL
        for (int q = 0; q < 5; ++q) {
          lo[q] = cmx_ld_pair(plane + o + 8 * q);
          hi[q] = cmx_ld_pair(plane + o + 8 * S.stride + 8 * q);
        }
        CMX_UNROLL
        for (int nb = 0; nb < 4; ++nb) {
          const uint32_t af[4] = {lo[nb], hi[nb], lo[nb + 1], hi[nb + 1]};
          cmx_mma_16816(acc[nb], af, bf, T{});
        }
      };
      mmas(plane0, acc0);
      if constexpr (NP == 2) {
        if constexpr (NA == 2)
          mmas(plane1, acc1);
        else
          mmas(plane1, acc0);
      }
    }
  }
}

// The sum of v over the warp, in a fixed order (a butterfly of shuffles: every lane gets it).
// Every thread of the block calls it (the emulator's shuffle is the block's).
__device__ __forceinline__ float warp_sum(float v) {
  CMX_UNROLL
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A tensor-core kernel's block: its 3-D grid's x the plane (image n, channel c), y and z the
// tile's column and row (origin h0, w0), and its partial row, image n's tile of gridDim.y *
// gridDim.z (the planner's rows: N x tiles).
struct MmaBlock {
  int c, n, h0, w0;
  int64_t base, row;
  __device__ __forceinline__ explicit MmaBlock(const Geom& geo) {
    const unsigned plane = blockIdx.x;
    c = static_cast<int>(plane % static_cast<unsigned>(geo.C));
    n = static_cast<int>(plane / static_cast<unsigned>(geo.C));
    w0 = static_cast<int>(blockIdx.y) * kMmaTile;
    h0 = static_cast<int>(blockIdx.z) * kMmaTile;
    base = plane_base(geo, n, c);
    row = (static_cast<int64_t>(n) * gridDim.z + blockIdx.z) * gridDim.y + blockIdx.y;
  }
};

// x's halo of a tile (h0, w0) in shared memory: `rows` rows from h0 - pb, `chunks` 16-byte
// chunks from column w0 - 8, `stride` elements a row, each chunk wholly inside or outside the
// image (W and w0 multiples of 8), copied as raw bytes (zeros outside); AFF: the in-image
// mask plane beside it. A thread takes chunk m of rows r0, r0 + 8, ... (chunks <= 8), its
// addresses advancing by additions. A barrier must follow before it is read; ASYNC (the
// plain input only): the chunks are cp.async copies, which a commit and a wait must land
// first.
template <typename T, bool AFF, bool ASYNC = false>
__device__ __forceinline__ void stage_mma_halo(T* halo, T* mask, const T* __restrict__ x,
                                               const Geom& geo, int64_t base, int h0, int w0,
                                               int pb, int rows, int chunks, int stride) {
  static_assert(!(AFF && ASYNC), "the mask plane is staged by plain stores");
  constexpr int V = Blk<T>::VEC;
  const uint32_t one = pack2(cmx_from_float(1.f, T{}), cmx_from_float(1.f, T{}));
  const int tid = static_cast<int>(threadIdx.x), m = tid % 8, r0 = tid / 8;
  const int gw = w0 - kMmaLead + m * V;
  if (m >= chunks) return;
  const bool col_in = gw >= 0 && gw < geo.W;
  int64_t off = offset_of(geo, base, h0 - pb + r0, gw);
  const int64_t step = 8 * geo.sH;
  for (int r = r0; r < rows; r += 8, off += step) {
    const int gh = h0 - pb + r;
    const bool in = col_in && gh >= 0 && gh < geo.H;
    if constexpr (ASYNC) {
      cmx_cp_async16(halo + r * stride + m * V, x + (in ? off : 0), in);
    } else {
      Raw16 v{{0u, 0u, 0u, 0u}};
      if (in) v = *reinterpret_cast<const Raw16*>(x + off);
      *reinterpret_cast<Raw16*>(halo + r * stride + m * V) = v;
    }
    if (AFF) {
      const uint32_t mv = in ? one : 0u;
      *reinterpret_cast<Raw16*>(mask + r * stride + m * V) = Raw16{{mv, mv, mv, mv}};
    }
  }
}

// The forward's convolution on tensor cores for one block of one image (F2's and F1's
// kernels): the halo (and AFF's mask plane) and the weights staged at `halo`, a barrier, then
// the warp's MMAs into acc (AFF: the mask's into accm); the halo stays for the epilogue.
template <typename T, int KT, bool AFF>
__device__ __forceinline__ void mma_forward(T* halo, const T* __restrict__ x,
                                            const T* __restrict__ w, const Geom& geo,
                                            const MmaShape& S, const MmaBlock& blk,
                                            float (&acc)[4][4], float (&accm)[4][4]) {
  const int K = KT > 0 ? KT : S.K;
  T* mask = halo + S.halo();
  stage_mma_halo<T, AFF>(halo, mask, x, geo, blk.base, blk.h0, blk.w0, S.PB, S.rows, S.chunks,
                         S.stride);
  constexpr int KS = KT > 0 ? MmaShape(KT).ks : 2;  // k-steps (at most 2: kMmaMaxK)
  T* sw = halo + S.weights_at(AFF);
  stage_mma_weights<T, false>(sw, w + static_cast<int64_t>(blk.c) * K * K, K, KS);
  __syncthreads();
  mma_correlate<T, KT, KS, AFF ? 2 : 1, AFF ? 2 : 1>(halo, mask, sw, S,
                                                     static_cast<int>(threadIdx.x) / 32, acc,
                                                     accm);
}

// apply_mma_kernel's epilogue for one image: accumulator pairs (rows g, g + 8; columns
// 8 nb + 2t, + 1) with the residual from the halo's centre; two outputs per 4-byte store (an
// output column pair lies wholly inside or outside the image).
template <typename T, bool AFF>
__device__ __forceinline__ void apply_mma_epilogue(
    const T* halo, const float (&acc)[4][4], const float (&accm)[4][4],
    const T* __restrict__ b, const float* __restrict__ mean, const float* __restrict__ rstd,
    const float* __restrict__ gamma, const float* __restrict__ beta, T* __restrict__ out,
    const InAffine& in_aff, const Geom& geo, const MmaShape& S, int c, int64_t base, int h0,
    int w0) {
  constexpr bool affine = AFF;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, g = (tid % 32) / 4, t = tid % 4;
  const BnApply bn = bn_apply_of(gamma, rstd, beta, mean, c);
  const float bias = ld(b, c);
  const float as = affine ? in_aff.scale[c] : 1.f, ac = affine ? in_aff.shift[c] : 0.f;
  CMX_UNROLL
  for (int hr = 0; hr < 2; ++hr) {
    const int r = 16 * warp + g + 8 * hr;
    if (h0 + r >= geo.H) continue;
    const T* xin = halo + (r + S.PB) * S.stride + kMmaLead + 2 * t;
    T* orow = out + offset_of(geo, base, h0 + r, w0 + 2 * t);
    CMX_UNROLL
    for (int nb = 0; nb < 4; ++nb) {
      if (w0 + 8 * nb >= geo.W) break;
      float xv[2];
      unpack2<T>(cmx_ld_pair(xin + 8 * nb), xv);
      T y[2];
      CMX_UNROLL
      for (int e = 0; e < 2; ++e) {
        float u = acc[nb][2 * hr + e];
        u = (affine ? as * u + ac * accm[nb][2 * hr + e] : u) + bias;
        const float input = affine ? xv[e] * as + ac : xv[e];
        y[e] = cmx_from_float(bn_apply(input, u, bn, geo.act), T{});
      }
      *reinterpret_cast<uint32_t*>(orow + 8 * nb) = pack2(y[0], y[1]);
    }
  }
}

// AFF: with the input affine (its mask MMAs and accumulators: an instantiation of its own,
// so that the plain one keeps its registers). PIPE (plain input only: geo.ipb > 1): a block
// takes its tile in geo.ipb images one after another (its grid x's plane index counts groups
// of images), the channel's weights staged once; while it convolves one image, the next
// one's halo is on its way into a second buffer (cp.async; shared memory:
// MmaShape::pipelined_elements). An instantiation of its own: with the loop over images the
// one-image kernel took 8-24 more registers (sm_80, sm_90 [C]), and it is not yet timed.
template <typename T, int KT, bool AFF, bool PIPE = false>
__global__ void __launch_bounds__(kMmaWarps * 32)
    apply_mma_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                     const float* __restrict__ mean, const float* __restrict__ rstd,
                     const float* __restrict__ gamma, const float* __restrict__ beta,
                     T* __restrict__ out, InAffine in_aff, Geom geo) {
  static_assert(!(PIPE && AFF), "several images per block: the plain input only");
  const MmaShape S(KT > 0 ? KT : geo.K);
  CMX_DYN_SMEM(smem);
  T* const halo0 = reinterpret_cast<T*>(smem);
  const MmaBlock blk(geo);
  float acc[4][4], accm[4][4];  // accm: the mask's (affine)
  if constexpr (!PIPE) {
    mma_forward<T, KT, AFF>(halo0, x, w, geo, S, blk, acc, accm);
    apply_mma_epilogue<T, AFF>(halo0, acc, accm, b, mean, rstd, gamma, beta, out, in_aff, geo,
                               S, blk.c, blk.base, blk.h0, blk.w0);
  } else {
    const int K = KT > 0 ? KT : S.K;
    constexpr int KS = KT > 0 ? MmaShape(KT).ks : 2;  // k-steps (at most 2: kMmaMaxK)
    T* const halo1 = halo0 + S.second_halo_at(false);
    T* const sw = halo0 + S.weights_at(false);
    const int c = blk.c, n0 = blk.n * geo.ipb, n1 = min(geo.N, n0 + geo.ipb);
    stage_mma_halo<T, false, true>(halo0, nullptr, x, geo, plane_base(geo, n0, c), blk.h0,
                                   blk.w0, S.PB, S.rows, S.chunks, S.stride);
    cmx_cp_async_commit();
    stage_mma_weights<T, false>(sw, w + static_cast<int64_t>(c) * K * K, K, KS);
    CMX_NO_UNROLL
    for (int n = n0; n < n1; ++n) {
      const bool odd = (n - n0) % 2;
      T* const halo = odd ? halo1 : halo0;
      if (n + 1 < n1) {  // the next image's halo into the other buffer; this one's landed
        stage_mma_halo<T, false, true>(odd ? halo0 : halo1, nullptr, x, geo,
                                       plane_base(geo, n + 1, c), blk.h0, blk.w0, S.PB,
                                       S.rows, S.chunks, S.stride);
        cmx_cp_async_commit();
        cmx_cp_async_wait<1>();
      } else {
        cmx_cp_async_wait<0>();
      }
      __syncthreads();
      mma_correlate<T, KT, KS, 1, 1>(halo, halo, sw, S, static_cast<int>(threadIdx.x) / 32,
                                     acc, accm);
      apply_mma_epilogue<T, false>(halo, acc, accm, b, mean, rstd, gamma, beta, out, in_aff,
                                   geo, S, c, plane_base(geo, n, c), blk.h0, blk.w0);
      if (n + 2 < n1) __syncthreads();  // this buffer is read no more: the next copies land
    }
  }
}

// ---------------------------------------------------------------- F1 on tensor cores
// stats_kernel's results saving u (SU), with the convolution on tensor cores (asked for with
// B2's, CMX_TC_ALL: the training passes' kernels, not yet timed on a GPU): apply_mma_kernel's
// halo and MMAs (AFF: the input affine's mask MMAs), then per block (one 32 x 32 tile of one
// channel of one image: a partial row of its own) u + b saved in fp32 and the mean and
// centred M2 of g = act(u) over the tile's outputs inside the image (block sums by warp
// shuffles in a fixed order), merged across rows by the usual Chan formula in Python.
template <typename T, int KT, bool AFF>
__global__ void __maxnreg__(kMmaMaxRegs)  // (as bwd_mma_kernel: without, a stack frame)
    stats_mma_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                     float* __restrict__ mean_p, float* __restrict__ m2_p,
                     float* __restrict__ count_p, float* __restrict__ u_out, InAffine in_aff,
                     Geom geo) {
  const MmaShape S(KT > 0 ? KT : geo.K);
  constexpr bool affine = AFF;
  CMX_DYN_SMEM(smem);
  T* halo = reinterpret_cast<T*>(smem);
  float* red = smem + S.sums_at(affine);
  const MmaBlock blk(geo);
  const int c = blk.c, h0 = blk.h0, w0 = blk.w0;
  const int64_t base = blk.base;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  float acc[4][4], accm[4][4];
  mma_forward<T, KT, AFF>(halo, x, w, geo, S, blk, acc, accm);
  // u = acc + b (affine: a acc + c accm + b) to u_out, pairs (rows g, g + 8 of the warp's 16;
  // columns 8 nb + 2t, + 1: wholly inside or outside the image); g = act(u) summed
  const float bias = ld(b, c);
  const float as = affine ? in_aff.scale[c] : 1.f, ac = affine ? in_aff.shift[c] : 0.f;
  float gv[2][4][2];
  bool in[2][4];
  float sum = 0.f;
  CMX_UNROLL
  for (int hr = 0; hr < 2; ++hr) {
    const int r = 16 * warp + g + 8 * hr;
    float* urow = u_out + offset_of(geo, base, h0 + r, w0 + 2 * t);
    CMX_UNROLL
    for (int nb = 0; nb < 4; ++nb) {
      in[hr][nb] = h0 + r < geo.H && w0 + 8 * nb < geo.W;
      CMX_UNROLL
      for (int e = 0; e < 2; ++e) {
        const float a = acc[nb][2 * hr + e];
        const float u = (affine ? as * a + ac * accm[nb][2 * hr + e] : a) + bias;
        if (in[hr][nb]) urow[8 * nb + e] = u;
        gv[hr][nb][e] = act_fwd(u, geo.act);
        if (in[hr][nb]) sum += gv[hr][nb][e];
      }
    }
  }
  const int th = geo.H - h0 < kMmaTile ? geo.H - h0 : kMmaTile;
  const int tw = geo.W - w0 < kMmaTile ? geo.W - w0 : kMmaTile;
  const float cnt = static_cast<float>(th * tw);
  sum = warp_sum(sum);
  if (lane == 0) red[warp] = sum;
  __syncthreads();
  const float mean = (red[0] + red[1]) / cnt;
  float m2 = 0.f;
  CMX_UNROLL
  for (int hr = 0; hr < 2; ++hr)
    CMX_UNROLL
    for (int nb = 0; nb < 4; ++nb)
      CMX_UNROLL
      for (int e = 0; e < 2; ++e)
        if (in[hr][nb]) {
          const float d = gv[hr][nb][e] - mean;
          m2 += d * d;
        }
  m2 = warp_sum(m2);
  if (lane == 0) red[2 + warp] = m2;
  __syncthreads();
  if (tid == 0) {
    mean_p[blk.row * geo.C + c] = mean;
    m2_p[blk.row * geo.C + c] = red[2] + red[3];
    if (c == 0) count_p[blk.row] = cnt;  // (every channel's tile has the same count)
  }
}

// ---------------------------------------------------------------- B1: dbeta / dgamma partials
// The block's channel sums of its threads' s1 = sum(dout), s2 = sum(dout * xhat), written to
// its partial row (every thread of the block calls it: channel_sum's barriers).
__device__ __forceinline__ void write_b1_partials(float s1, float s2, const Geom& geo,
                                                  const Work& wk, const Lane& l, float* red,
                                                  float* red2, float* __restrict__ dbeta_p,
                                                  float* __restrict__ dgamma_p) {
  s1 = channel_sum(s1, geo, l, red, red2);
  s2 = channel_sum(s2, geo, l, red, red2);
  if (l.active && l.first) {
    dbeta_p[static_cast<int64_t>(wk.part) * geo.C + wk.c0 + l.cl] = s1;
    dgamma_p[static_cast<int64_t>(wk.part) * geo.C + wk.c0 + l.cl] = s2;
  }
}

// SU: u from the saved u (staged in the input planes, no halo; x is not read).
template <typename T, int KT, bool SU>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks - 1)
    bwd_reduce_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                      const T* __restrict__ w, const T* __restrict__ b,
                      const float* __restrict__ u, const float* __restrict__ mean,
                      const float* __restrict__ rstd, float* __restrict__ dbeta_p,
                      float* __restrict__ dgamma_p, InAffine in_aff, Geom geo) {
  constexpr int RH = Blk<T>::RH, RW = Blk<T>::RW;
  CMX_DYN_SMEM(smem);
  const Work wk = work_of(geo);
  const Lane l = lane_of(geo, wk);
  const int K = KT > 0 ? KT : geo.K;
  const FwdSmem L(geo, RH, RW, !SU, true, false);
  float *sw = smem, *sx = smem + L.x(), *sd = smem + L.dout(geo.CB),
        *red = smem + L.scratch(geo.CB), *red2 = red + kMaxThreads;
  const InAffine none{nullptr, nullptr, nullptr, nullptr};
  const int pb = SU ? 0 : geo.PB;  // the halo of the staged input (u: none)
  auto rin = [&](const Tile& tt) { return Rect{tt.h0 - pb, tt.w0 - pb, L.in.R, L.in.S}; };
  auto rd = [&](const Tile& tt) { return Rect{tt.h0, tt.w0, L.tile.R, L.tile.S}; };
  auto fetch = [&](const Tile& tt) {
    if (SU)
      prefetch_rect(u, geo, tt, rin(tt));
    else
      prefetch_rect(x, geo, tt, rin(tt));
    prefetch_rect(dout, geo, tt, rd(tt));
  };
  float s1 = 0.f, s2 = 0.f;  // this thread's sums over the part, in order
  prefetch_first_item(geo.prefetch, geo, wk, fetch);
  for (int item = wk.first; item < wk.last; ++item) {
    const Tile t = tile_at(geo, wk, item);
    if (SU) {
      stage(sx, L.in, u, geo, t, rin(t), none, false);
    } else {
      if (item == wk.first) stage_weights(sw, w, t, K, false);
      stage(sx, L.in, x, geo, t, rin(t), in_aff, in_aff.scale != nullptr);
    }
    stage(sd, L.tile, dout, geo, t, rd(t), none, false);
    if (item + 1 < wk.last) fetch(tile_at(geo, wk, item + 1));  // while this one computes
    __syncthreads();
    if (l.active) {
      const int c = t.c0 + l.cl;
      const float m = mean[c], rs = rstd[c];
      float uv[RH][RW];
      conv_group<T, KT, SU>(sx, L.in, sw, geo, l, SU ? 0.f : ld(b, c), uv);
      const float* d = sd + l.cl * L.tile.P;
      CMX_UNROLL
      for (int ro = 0; ro < RH; ++ro)
        CMX_UNROLL
        for (int o = 0; o < RW; ++o) {
          const int r = l.gr * RH + ro, q = l.gc * RW + o;
          if (inside(t, r, q)) {
            const float dv = d[r * L.tile.S + q];
            s1 += dv;
            s2 += dv * (act_fwd(uv[ro][o], geo.act) - m) * rs;
          }
        }
    }
    __syncthreads();  // the next tile's staging overwrites sx and sd
  }
  write_b1_partials(s1, s2, geo, wk, l, red, red2, dbeta_p, dgamma_p);
}

// B1 reading the saved u in NCHW on the 16-byte path (bwd_reduce_kernel's grid and partial
// rows, shared memory for channel_sum alone): nothing to convolve, and a thread's RH x RW outputs are RH 16-byte runs along W, so
// it loads u and dout from global memory directly (a warp's loads of a row are contiguous),
// all of an item's at once: no staging, no barrier and no L2 prefetch per item. Same values
// and the same order of the sums as the staged kernel: its results bitwise. A kernel of its
// own so that the staged one (channels_last) keeps its registers.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks - 1)
    bwd_reduce_u_kernel(const T* __restrict__ dout, const float* __restrict__ u,
                        const float* __restrict__ mean, const float* __restrict__ rstd,
                        float* __restrict__ dbeta_p, float* __restrict__ dgamma_p, Geom geo) {
  constexpr int RH = Blk<T>::RH, RW = Blk<T>::RW;
  CMX_DYN_SMEM(smem);
  const Work wk = work_of(geo);
  const Lane l = lane_of(geo, wk);
  float *red = smem, *red2 = red + kMaxThreads;  // (its only shared memory: the planner)
  float s1 = 0.f, s2 = 0.f;  // this thread's sums over the part, in order
  for (int item = wk.first; item < wk.last; ++item) {
    const Tile t = tile_at(geo, wk, item);
    const int q = l.gc * RW;
    if (!l.active || t.w0 + q >= geo.W) continue;
    const int c = t.c0 + l.cl;
    const float m = mean[c], rs = rstd[c];
    const int64_t base = plane_base(geo, t.n, c);
    CMX_UNROLL
    for (int ro = 0; ro < RH; ++ro) {
      const int r = l.gr * RH + ro;
      if (t.h0 + r >= geo.H) break;
      const int64_t off = offset_of(geo, base, t.h0 + r, t.w0 + q);
      const Vec16<T> dv = ld16(dout + off);
      float uv[RW];
      ld16_floats(u + off, uv);
      CMX_UNROLL
      for (int o = 0; o < RW; ++o)
        if (inside(t, r, q + o)) {
          const float d = cmx_to_float(dv.v[o]);
          s1 += d;
          s2 += d * (act_fwd(uv[o], geo.act) - m) * rs;
        }
    }
  }
  write_b1_partials(s1, s2, geo, wk, l, red, red2, dbeta_p, dgamma_p);
}

// ---------------------------------------------------------------- B2: dx, dW / db partials
// du is needed on an extended region of EGH*RH x EGW*RW positions starting PA before the tile
// (PA = padding after): the transposed convolution reaches that far. u there needs the input
// a further (PB before, PA after) around it.
//
// dW / db: the work of a channel is split into tasks, each a unit (one tap row i and DJ tap
// columns from j0: a register-blocked correlation of du rows with input rows) times a slice
// of the tile's row chunks (items s, s+S, s+2S, ...: S slices where the channel's threads
// outnumber the units; see dw_slices). A task adds its sums over each tile to its own slot
// in shared memory: no barrier and no cross-thread sum per tile; the slots are summed in a
// fixed order once, when the block's part ends. With the saved u the input window of a
// unit starts 16-byte aligned (the input planes begin at the tile's halo): 16-byte loads,
// and at a run-time k 16 tap columns per unit for 8 (fewer loads per FMA).
__host__ __device__ constexpr int dw_cols(int KT, bool su) { return KT > 0 ? KT : su ? 16 : 8; }

// The slices S: the one that minimises a thread's share of the channel's dW work,
// ceil(U*S / tpc) / S units (tasks are dealt to the tpc threads round robin), among
// S <= 2*tpc/U; the smallest on ties (fewer slots). E.g. 16 threads, 9 units: S = 3 (2/3 of
// a unit each; S = 1 would leave 7 threads idle and the other 9 a whole unit each).
__host__ __device__ constexpr int dw_slices(int U, int tpc) {
  int best = 1;
  for (int s = 2; s * U <= 2 * tpc; ++s)
    if (cdiv(U * s, tpc) * best < cdiv(U * best, tpc) * s) best = s;
  return best;
}

// The input columns dW's 16-byte window loads reach with the saved u (from the tile's halo:
// chunk origins up to TWp - RW, unit origins up to (ceil(K / DJ) - 1) * DJ, windows of
// round_up(RW + DJ - 1, 4)), and at least the halo itself.
__host__ __device__ constexpr int dw_window_cols(int TWp, int RW, int K, int DJ) {
  const int reach = TWp - RW + (cdiv(K, DJ) - 1) * DJ + round_up(RW + DJ - 1, 4);
  return round_up(reach > TWp + K - 1 ? reach : TWp + K - 1, 4);
}

struct DwTasks {
  int JB, U, S;  // column blocks per tap row, units (K * JB), slices
  __host__ __device__ DwTasks(int K, int KT, int tpc, bool su)
      : JB(cdiv(K, dw_cols(KT, su))), U(K * JB), S(dw_slices(U, tpc)) {}
  __host__ __device__ int tasks() const { return U * S; }
};

// Shared layout of B2 (floats): weights, flipped weights, the dW/db slots of every task
// (kept across tiles), the input planes (doubly extended region), the du planes (extended
// region); then the regions that are dead once dx is computed — dout (extended region) and
// the raw x of the tile (with the input affine) — which the channels_last output buffer
// reuses, and the reduction scratch of the part's end.
// With the saved u (su): no weights but the flipped ones; the du planes take the saved u
// first (turned into du in place); the input planes cover only the tile's halo that dW
// reads, staged once dx is done, over dout's planes (dead by then).
struct BwdSmem {
  int EGH, EGW;  // groups of RH x RW covering the extended region
  int inq;       // input columns staged (the input plane's rows are longer: odd quads)
  Planes in, ext, raw;
  int wf, slots, red, out;
  bool su;
  __host__ __device__ BwdSmem(const Geom& g, int RH, int RW, int KT, bool affine, bool su_)
      : EGH(cdiv(g.GH * RH + g.K - 1, RH)),
        EGW(cdiv(g.GW * RW + g.K - 1, RW)),
        inq(su_ ? dw_window_cols(g.GW * RW, RW, g.K, dw_cols(KT, true))
                : round_up(EGW * RW + g.K - 1 + RW + (KT > 0 ? 0 : 8), 4)),
        in((su_ ? g.GH : EGH) * RH + g.K - 1, inq, true),
        ext(EGH * RH, EGW * RW),
        raw(affine ? Planes(g.GH * RH, g.GW * RW) : Planes()),
        wf(weight_floats(g.CB, g.K)),
        slots(round_up(g.CB * DwTasks(g.K, KT, g.GH * g.GW, su_).tasks() *
                           (dw_cols(KT, su_) + 1), 4)),
        red(kMaxThreads + 32),
        out(g.layout == kChannelsLast ? g.TH * g.TW * out_channels_stride(g.CB) : 0),
        su(su_) {}
  __host__ __device__ int wflip() const { return su ? 0 : wf; }
  __host__ __device__ int sums() const { return wflip() + wf; }
  __host__ __device__ int x(int CB) const { return su ? dout(CB) : sums() + slots; }
  __host__ __device__ int du(int CB) const {
    return su ? sums() + slots : x(CB) + in.floats(CB);
  }
  __host__ __device__ int dout(int CB) const { return du(CB) + ext.floats(CB); }
  __host__ __device__ int rawx(int CB) const {
    const int e = ext.floats(CB), i = in.floats(CB);
    return dout(CB) + (su && i > e ? i : e);
  }
  __host__ __device__ int scratch(int CB) const { return dout(CB); }  // reuse the dead regions
  __host__ __device__ int sout(int CB) const { return dout(CB); }
  __host__ __device__ int total(int CB) const {
    int m = rawx(CB) + raw.floats(CB);
    if (scratch(CB) + red > m) m = scratch(CB) + red;
    if (sout(CB) + out > m) m = sout(CB) + out;
    return m;
  }
};

// du = dL/du of the block (docs/DESIGN.md, "Backward"): gamma rstd (dout - [dbeta / n] -
// [(act(u) - mean) rstd dgamma / n]) act'(u), the bracketed terms with batch statistics.
struct DuCoef {
  float scale, mean, rstd, mb, mg;
  bool batch;
};

__device__ __forceinline__ DuCoef du_coef_of(const float* __restrict__ gamma,
                                             const float* __restrict__ rstd,
                                             const float* __restrict__ mean,
                                             const float* __restrict__ dbeta,
                                             const float* __restrict__ dgamma, bool batch_stats,
                                             float inv_n, int c) {
  const float rs = rstd[c];
  return DuCoef{gamma[c] * rs, mean[c], rs, batch_stats ? dbeta[c] * inv_n : 0.f,
                batch_stats ? dgamma[c] * inv_n : 0.f, batch_stats};
}

__device__ __forceinline__ float du_of(float dv, float u, const DuCoef& k, int act) {
  float grad;
  const float g = act_fwd_grad(u, act, grad);
  if (k.batch) dv = dv - k.mb - (g - k.mean) * k.rstd * k.mg;
  return k.scale * dv * grad;
}

// B2 holds the most live values (the extended du correlation's and dx's accumulators): with
// 16-bit x it is held to 128 registers (no spill), 4 blocks of 4 warps per SM where shared
// memory allows; fp32 to 168 on sm_90 (3 blocks; at 128 it gets stack frames);
// it does about 3.5x the FMAs per byte of F2, so fewer resident warps keep it busy
// (docs/DESIGN.md).
template <typename T>
constexpr int b2_max_registers() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return sizeof(T) == 2 ? 128 : 255;  // (sm_80: fp32 at 168 gets a stack frame at run-time k)
#else
  return sizeof(T) == 2 ? 128 : 168;
#endif
}
// SU: u on the extended region is read from the saved u (F1's) instead of convolving the
// doubly extended input.
template <typename T, int KT, bool SU>
__global__ void __launch_bounds__(kMaxThreads) __maxnreg__(b2_max_registers<T>())
    bwd_main_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                    const T* __restrict__ w, const T* __restrict__ b,
                    const float* __restrict__ u_saved, const float* __restrict__ mean,
                    const float* __restrict__ rstd,
                    const float* __restrict__ gamma, const float* __restrict__ dbeta,
                    const float* __restrict__ dgamma, bool batch_stats, T* __restrict__ dx,
                    float* __restrict__ dw_p, float* __restrict__ db_p, InAffine in_aff,
                    Geom geo) {
  constexpr int RH = Blk<T>::RH, RW = Blk<T>::RW;
  constexpr int DJ = dw_cols(KT, SU);
  constexpr int NVW = SU ? round_up(RW + DJ - 1, 4) : RW + DJ - 1;  // dW's input window
  CMX_DYN_SMEM(smem);
  const Work wk = work_of(geo);
  const Lane l = lane_of(geo, wk);
  const int K = KT > 0 ? KT : geo.K;
  const int KS = weight_stride(K), KK = K * K;
  const int PA = K - 1 - geo.PB;  // padding after
  const bool affine = in_aff.scale != nullptr;
  const BwdSmem L(geo, RH, RW, KT, affine, SU);
  float *sw = smem, *swf = smem + L.wflip(), *sums = smem + L.sums(), *sx = smem + L.x(geo.CB),
        *sd = smem + L.dout(geo.CB), *sdu = smem + L.du(geo.CB), *sraw = smem + L.rawx(geo.CB),
        *red = smem + L.scratch(geo.CB), *red2 = red + kMaxThreads,
        *sout = smem + L.sout(geo.CB);
  const InAffine none{nullptr, nullptr, nullptr, nullptr};
  const int tpc = geo.GH * geo.GW;
  const DwTasks dt(K, KT, tpc, SU);
  const int per = DJ + 1, cslots = dt.tasks() * per;  // floats per task, per channel
  for (int it = static_cast<int>(threadIdx.x); it < L.slots; it += static_cast<int>(blockDim.x))
    sums[it] = 0.f;
  // the rectangles: u and dout on the extended region (PA before the tile); the input with
  // its halo around that (SU: around the tile only); the raw x of the tile (affine: inside
  // the input's)
  const int xo = SU ? 0 : PA;  // the tile's origin in the input planes, less PB
  auto rext = [&](const Tile& tt) { return Rect{tt.h0 - PA, tt.w0 - PA, L.ext.R, L.ext.S}; };
  auto rin = [&](const Tile& tt) {
    return Rect{tt.h0 - xo - geo.PB, tt.w0 - xo - geo.PB, L.in.R, L.inq};
  };
  auto rraw = [&](const Tile& tt) { return Rect{tt.h0, tt.w0, L.raw.R, L.raw.S}; };
  auto fetch = [&](const Tile& tt) {  // (rin covers rraw)
    if (SU) prefetch_rect(u_saved, geo, tt, rext(tt));
    prefetch_rect(x, geo, tt, rin(tt));  // (SU: staged once dx is done)
    prefetch_rect(dout, geo, tt, rext(tt));
  };
  float sdscale = 0.f, sdshift = 0.f;  // this thread's sums over the part, in order
  prefetch_first_item(geo.prefetch, geo, wk, fetch);
  for (int item = wk.first; item < wk.last; ++item) {
    const Tile t = tile_at(geo, wk, item);
    const int eh0 = t.h0 - PA, ew0 = t.w0 - PA;  // extended region origin
    if (item == wk.first) {
      if (!SU) stage_weights(sw, w, t, K, false);  // (SU: no convolution of the input)
      stage_weights(swf, w, t, K, true);
    }
    if (SU)
      stage(sdu, L.ext, u_saved, geo, t, rext(t), none, false);
    else
      stage(sx, L.in, x, geo, t, rin(t), in_aff, affine);
    stage(sd, L.ext, dout, geo, t, rext(t), none, false);
    if (affine) stage(sraw, L.raw, x, geo, t, rraw(t), none, false);
    __syncthreads();
    // 1) du on the extended region (zero outside the image: those terms do not exist)
    if (l.active) {
      const int c = t.c0 + l.cl;
      const DuCoef kd = du_coef_of(gamma, rstd, mean, dbeta, dgamma, batch_stats, geo.inv_n, c);
      [[maybe_unused]] const float bias = ld(b, c);
      const float* d = sd + l.cl * L.ext.P;
      float* du = sdu + l.cl * L.ext.P;
      for (int g = l.grp; g < L.EGH * L.EGW; g += tpc) {
        const int r = (g / L.EGW) * RH, q = (g % L.EGW) * RW;
        float u[RH][RW];
        if constexpr (SU) {  // the saved u, staged where du goes (each slot read, then written)
          CMX_UNROLL
          for (int ro = 0; ro < RH; ++ro)
            CMX_UNROLL
            for (int o = 0; o < RW; ++o) u[ro][o] = du[(r + ro) * L.ext.S + q + o];
        } else {
          CMX_UNROLL
          for (int ro = 0; ro < RH; ++ro)
            CMX_UNROLL
            for (int o = 0; o < RW; ++o) u[ro][o] = bias;
          correlate<KT, RH, RW>(sx + l.cl * L.in.P, L.in.S, sw + l.cl * K * KS, K, r, q, u);
        }
        CMX_UNROLL
        for (int ro = 0; ro < RH; ++ro)
          CMX_UNROLL
          for (int o = 0; o < RW; ++o) {
            const int h = eh0 + r + ro, wc = ew0 + q + o;
            const int at = (r + ro) * L.ext.S + q + o;
            du[at] = h >= 0 && h < geo.H && wc >= 0 && wc < geo.W
                         ? du_of(d[at], u[ro][o], kd, geo.act)
                         : 0.f;
          }
      }
    }
    __syncthreads();
    // 2) dx = dout + correlation of du with the flipped kernel (the gradient of the block
    //    input; with the input affine, x's gradient is in_scale times that)
    float dxv[RH][RW];
    if (l.active) {
      const int c = t.c0 + l.cl;
      CMX_UNROLL
      for (int ro = 0; ro < RH; ++ro)
        CMX_UNROLL
        for (int o = 0; o < RW; ++o) dxv[ro][o] = 0.f;
      correlate<KT, RH, RW>(sdu + l.cl * L.ext.P, L.ext.S, swf + l.cl * K * KS, K, l.gr * RH,
                            l.gc * RW, dxv);
      const float* d = sd + l.cl * L.ext.P + PA * L.ext.S + PA;
      const float* xr = sraw + l.cl * L.raw.P;
      const float sc = affine ? in_aff.scale[c] : 1.f;
      CMX_UNROLL
      for (int ro = 0; ro < RH; ++ro)
        CMX_UNROLL
        for (int o = 0; o < RW; ++o) {
          const int r = l.gr * RH + ro, q = l.gc * RW + o;
          float din = 0.f;
          if (inside(t, r, q)) {
            din = d[r * L.ext.S + q] + dxv[ro][o];
            if (affine) {
              sdscale += din * xr[r * L.raw.S + q];
              sdshift += din;
            }
          }
          dxv[ro][o] = din * sc;
        }
    }
    store_group<T>(dx, geo, t, l, dxv, sout);
    if (item + 1 < wk.last) fetch(tile_at(geo, wk, item + 1));  // while dW computes
    if (SU) {  // the input planes (the tile and dW's halo) over dout's, dead now
      __syncthreads();
      stage(sx, L.in, x, geo, t, rin(t), in_aff, affine);
      __syncthreads();
    }
    // 3) dW[i][j] += sum_q du[q] x[q + (i, j) - PB] and db += sum_q du[q] over the tile, task
    //    by task (DwTasks): a thread's tasks are its own, their sums go to their own slots
    if (l.active) {
      const int chunks = cdiv(t.tw, RW), items = t.th * chunks;
      const float* du = sdu + l.cl * L.ext.P + PA * L.ext.S + PA;
      for (int task = l.grp; task < dt.tasks(); task += tpc) {
        const int u = task % dt.U, s0 = task / dt.U;
        const int i = u / dt.JB, j0 = (u % dt.JB) * DJ;
        const float* xin = sx + l.cl * L.in.P + (xo + i) * L.in.S + xo + j0;
        float acc[DJ];
        float dbs = 0.f;
        CMX_UNROLL
        for (int jj = 0; jj < DJ; ++jj) acc[jj] = 0.f;
        // items column by column (item = c * th + r): the slices of a warp then read
        // neighbouring rows, which the odd-quad row stride puts in different banks
        int r = s0 % t.th, c = s0 / t.th;  // item s0 + n*S: row r, chunk c
        for (int itm = s0; itm < items; itm += dt.S) {
          const int q = c * RW;
          float d[RW];
          CMX_UNROLL
          for (int o = 0; o < RW; ++o) d[o] = q + o < t.tw ? du[r * L.ext.S + q + o] : 0.f;
          if (u == 0) {
            CMX_UNROLL
            for (int o = 0; o < RW; ++o) dbs += d[o];
          }
          const float* xr = xin + r * L.in.S + q;
          float v[NVW];
          if constexpr (SU) {  // 16-byte aligned: the planes, S, q and j0 are
            CMX_UNROLL
            for (int e = 0; e < NVW; e += 4) {
              const Vec16<float> f = ld16(xr + e);
              CMX_UNROLL
              for (int f4 = 0; f4 < 4; ++f4) v[e + f4] = f.v[f4];
            }
          } else {
            CMX_UNROLL
            for (int e = 0; e < NVW; ++e) v[e] = xr[e];
          }
          CMX_UNROLL
          for (int jj = 0; jj < DJ; ++jj)
            CMX_UNROLL
            for (int o = 0; o < RW; ++o) acc[jj] += d[o] * v[o + jj];
          for (r += dt.S; r >= t.th; r -= t.th) ++c;
        }
        float* slot = sums + l.cl * cslots + task * per;
        CMX_UNROLL
        for (int jj = 0; jj < DJ; ++jj) slot[jj] += acc[jj];
        slot[DJ] += dbs;
      }
    }
    __syncthreads();  // the next tile's staging overwrites what this one read
  }
  // the part's sums: dW, db, and the input affine's gradients
  const int64_t prow = static_cast<int64_t>(wk.part) * geo.C + wk.c0;
  __syncthreads();  // (a part without items: the slots' zeros, written by other threads)
  for (int e2 = static_cast<int>(threadIdx.x); e2 < wk.cn * (KK + 1);
       e2 += static_cast<int>(blockDim.x)) {
    const int cl = e2 / (KK + 1), e = e2 % (KK + 1);
    // tap (i, j): unit i*JB + j/DJ, column j%DJ of its slot; db: unit 0's last float
    const int u = e == KK ? 0 : e / K * dt.JB + e % K / DJ, at = e == KK ? DJ : e % K % DJ;
    const float* sl = sums + cl * cslots + u * per + at;
    float v = 0.f;
    for (int s0 = 0; s0 < dt.S; ++s0) v += sl[s0 * dt.U * per];
    if (e == KK)
      db_p[prow + cl] = v;
    else
      dw_p[(prow + cl) * KK + e] = v;
  }
  if (affine) {  // uniform over the grid: every thread of the block takes it
    sdscale = channel_sum(sdscale, geo, l, red, red2);
    sdshift = channel_sum(sdshift, geo, l, red, red2);
    if (l.active && l.first) {
      in_aff.dscale_p[prow + l.cl] = sdscale;
      in_aff.dshift_p[prow + l.cl] = sdshift;
    }
  }
}

// ---------------------------------------------------------------- B2 on tensor cores
// bwd_main_kernel's results with the saved u (SU), with dx and dW on tensor cores, for 16-bit
// x in NCHW on the 16-byte path, k <= kMmaB2MaxK, with or without the input affine (AFF,
// below; docs/DESIGN.md, "CUDA tensor cores"). A block takes one 32 x 32 tile of one channel
// in one image, 2 warps:
//  1. du on dx's halo (32 + K - 1 rows from PA = K - 1 - PB above the tile, 16-byte chunks
//     from 8 columns left of it; zero outside the image), from the saved u and dout (DU:
//     read, du_kernel's, computed once per element), as two 16-bit terms in two planes,
//     hi = rn(s du) and lo = rn(s du - hi): s = 1 in bfloat16; float16, whose range is
//     not fp32's, takes the power of two that brings the halo's
//     largest |du| into [1, 2), undone on the fp32 results (the Triton kernels' split and
//     scale, docs/DESIGN.md, "Numerics of B2"). The tile's db from the fp32 values. Beside
//     them x's forward halo (PB above the tile) and a copy of it one column on.
//  2. dx = dout + the correlation of du with the rotated kernel (padding before PA):
//     apply_mma_kernel's MMAs (mma_correlate) over both terms' planes.
//  3. dW, per row rr of x's halo: dW^T[j, i] += sum_c X[rr][c + j] du[rr - i][c] over the
//     tile's 32 columns c (two k-steps). A (16 taps j x 16 columns) is a Hankel matrix of the
//     halo row: its fragments are register loads at columns g + 2t + ..., a[1] = a[2], the
//     odd columns' from the copy one column on (every operand pair 4-byte aligned); B (16
//     columns x 8 taps i) is du's terms at tile row rr - i (0 outside the tile). The
//     accumulators are dW's taps themselves: no band to extract. The warps take alternate
//     rows; their sums meet in shared memory, in a fixed order.
// Shared memory, in 16-bit elements: du's hi and lo planes (MmaShape with PA), x's halo and
// its copy (xchunks 16-byte chunks a row: the A pairs reach column 54 - PB), the
// rotated kernel's weights; then floats: float16's fp32 du on the halo, and 4 for the
// block's sums.
constexpr int kMmaB2MaxK = 16;  // dW's taps j: the 16 rows of one MMA tile

struct MmaB2Layout {
  MmaShape D;          // du's halo: dx's correlation, the rotated kernel, PA before
  int NT;              // dW's MMA tiles along its taps i, 8 each
  int xchunks, xstride, xrows;
  bool aff;            // with the input affine: the in-image mask's plane and its copy too
  __host__ __device__ constexpr MmaB2Layout(int k, bool affine = false)
      : D(k, k - 1 - pad_before(k)), NT(cdiv(k, 8)), xchunks(cdiv(55 - pad_before(k), 8)),
        xstride(0), xrows(kMmaTile + k - 1), aff(affine) {
    xstride = mma_stride(xchunks);
  }
  __host__ __device__ constexpr int lo() const { return D.halo(); }
  __host__ __device__ constexpr int x0() const { return 2 * D.halo(); }
  __host__ __device__ constexpr int x1() const { return x0() + xrows * xstride; }
  // (aff) the mask's plane and its copy one column on
  __host__ __device__ constexpr int m0() const { return x1() + xrows * xstride; }
  __host__ __device__ constexpr int m1() const { return m0() + xrows * xstride; }
  // the rotated kernel's staged weights (stage_mma_weights)
  __host__ __device__ constexpr int wts() const { return x1() + (aff ? 3 : 1) * xrows * xstride; }
  // float offsets, 16-byte aligned
  __host__ __device__ constexpr int scratch() const {
    return round_up(wts() + D.K * mma_wrow(2), 8) / 2;
  }
  // the block's sums: db and float16's |du| maximum per warp (aff: then the input affine's
  // two sums per warp)
  __host__ __device__ constexpr int red(bool half) const {
    return scratch() + (half ? D.halo() : 0);
  }
  __host__ __device__ constexpr int bytes(bool half) const {
    return (red(half) + (aff ? 8 : 4)) * 4;
  }
};

// (s, 1/s): the power of two s that takes mag (>= 0) into [1, 2) ([0, 1) below the smallest
// normal number); applying and undoing it is exact (triton_kernels._pow2_scale).
__device__ __forceinline__ void pow2_scale(float mag, float& s, float& inv) {
  uint32_t b;
  std::memcpy(&b, &mag, 4);
  uint32_t e = (b >> 23) & 0xffu;
  e = e < 1u ? 1u : (e > 253u ? 253u : e);
  const uint32_t sb = (254u - e) << 23, ib = e << 23;
  std::memcpy(&s, &sb, 4);
  std::memcpy(&inv, &ib, 4);
}

// A chunk of 8 values v, times s, as its two 16-bit terms at `at` of the hi and lo planes.
template <typename T>
__device__ __forceinline__ void store_terms(T* hi, T* lo, int at, const float (&v)[8], float s) {
  Vec16<T> h, l;
  CMX_UNROLL
  for (int e = 0; e < 8; ++e) {
    const float a = v[e] * s;
    h.v[e] = cmx_from_float(a, T{});
    l.v[e] = cmx_from_float(a - cmx_to_float(h.v[e]), T{});
  }
  st16(hi + at, h);
  st16(lo + at, l);
}

// B2's du pass (CMX_TC_ALL; bwd_mma_kernel<T, KT, true> then reads it): du = du_of(dout, u)
// once per element, in fp32 at u's offsets, where the fused kernel (DU false) recomputes it
// on every tile's halo, (32 + k - 1) x 48 values for 32 x 32 outputs (1.9x at k = 9), at
// about 60 instructions each. bwd_mma_kernel's grid and block: a 32 x 32 tile of one
// channel in one image, the 64 threads taking its 16-byte chunks (4 a row) in turn.
template <typename T>
__global__ void __launch_bounds__(kMmaWarps * 32)
    du_kernel(const T* __restrict__ dout, const float* __restrict__ u_saved,
              const float* __restrict__ mean, const float* __restrict__ rstd,
              const float* __restrict__ gamma, const float* __restrict__ dbeta,
              const float* __restrict__ dgamma, bool batch_stats, float* __restrict__ du_out,
              Geom geo) {
  constexpr int V = Blk<T>::VEC;  // 8
  constexpr int kRowChunks = kMmaTile / V;
  const MmaBlock blk(geo);
  const DuCoef kd = du_coef_of(gamma, rstd, mean, dbeta, dgamma, batch_stats, geo.inv_n, blk.c);
  for (int q = static_cast<int>(threadIdx.x); q < kMmaTile * kRowChunks;
       q += static_cast<int>(blockDim.x)) {
    const int h = blk.h0 + q / kRowChunks, w = blk.w0 + (q % kRowChunks) * V;
    if (h >= geo.H || w >= geo.W) continue;  // (W a multiple of 8: whole chunks)
    const int64_t off = offset_of(geo, blk.base, h, w);
    const Vec16<T> dv = ld16(dout + off);
    float u[V];
    ld16_floats<V>(u_saved + off, u);
    Vec16<float> d[V / 4];
    CMX_UNROLL
    for (int e = 0; e < V; ++e) d[e / 4].v[e % 4] = du_of(cmx_to_float(dv.v[e]), u[e], kd, geo.act);
    CMX_UNROLL
    for (int q4 = 0; q4 < V / 4; ++q4) st16(du_out + off + 4 * q4, d[q4]);
  }
}

// (__maxnreg__(kMmaMaxRegs) rather than __launch_bounds__(64), which cannot go with it:
// under that bound ptxas took 72 registers on sm_80 and kept pointers on the stack across
// du's unrolled activations). DU: du read from du_in (du_kernel's) instead of computed.
// AFF: with the input affine a x + c (the block input; zero outside the image): dx = a
// (dout + the correlation), the tile's sums of that times x and of it (dscale, dshift), and
// dW = a (du * X) + c (du * M), M the in-image mask, its MMAs beside x's (no rounding of
// a x + c to 16 bits, as F2's).
template <typename T, int KT, bool DU, bool AFF>
__global__ void __maxnreg__(kMmaMaxRegs)
    bwd_mma_kernel(const T* __restrict__ dout, const T* __restrict__ x, const T* __restrict__ w,
                   const float* __restrict__ u_saved, const float* __restrict__ du_in,
                   const float* __restrict__ mean, const float* __restrict__ rstd,
                   const float* __restrict__ gamma, const float* __restrict__ dbeta,
                   const float* __restrict__ dgamma, bool batch_stats, T* __restrict__ dx,
                   float* __restrict__ dw_p, float* __restrict__ db_p, InAffine in_aff,
                   Geom geo) {
  constexpr int V = Blk<T>::VEC;  // 8
  constexpr bool half = std::is_same_v<T, cmx_half>;
  const MmaB2Layout L(KT > 0 ? KT : geo.K, AFF);
  const MmaShape& D = L.D;
  const int K = D.K, PA = D.PB, PB = K - 1 - PA;
  CMX_DYN_SMEM(smem);
  T* const dhi = reinterpret_cast<T*>(smem);
  T* const dlo = dhi + L.lo();
  T* const xh0 = dhi + L.x0();
  T* const xh1 = dhi + L.x1();
  T* const mk0 = dhi + L.m0();  // (AFF)
  T* const mk1 = dhi + L.m1();
  T* const sw = dhi + L.wts();
  float* const dsc = smem + L.scratch();
  float* const red = smem + L.red(half);
  const MmaBlock blk(geo);
  const int c = blk.c, h0 = blk.h0, w0 = blk.w0;
  const int64_t base = blk.base;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  // a thread's 16-byte chunk column m (from w0 - 8) and rows r0, r0 + 8, ... (chunks <= 8)
  const int m = tid % 8, r0 = tid / 8;
  constexpr int KS = KT > 0 ? MmaB2Layout(KT).D.ks : 2;
  stage_mma_weights<T, true>(sw, w + static_cast<int64_t>(c) * K * K, K, KS);
  // 1. x's halo, rows h0 - PB .. (AFF: and the mask's)
  stage_mma_halo<T, AFF>(xh0, mk0, x, geo, base, h0, w0, PB, L.xrows, L.xchunks, L.xstride);
  //    du on dx's halo, rows h0 - PA ..: its terms (bfloat16), or (float16) its fp32 values
  //    until the halo's largest |du| is known; db over the tile's chunks (1 to 4). The
  //    image's part of the halo is rows [r_lo, r_hi) and chunks [c_lo, c_hi) (W, w0 multiples of 8:
  //    whole chunks); zeros go everywhere else, then that part's chunks are numbered across
  //    the block, so that every lane of a warp takes one (a lane per chunk column, as the
  //    staging loops take them, left 2 to 4 of a warp's 8 idle at du's activation, most of
  //    what B2 issues: half a warp's width on an image of one tile)
  const DuCoef kd = du_coef_of(gamma, rstd, mean, dbeta, dgamma, batch_stats, geo.inv_n, c);
  const int r_lo = PA - h0 > 0 ? PA - h0 : 0, r_hi = min(D.rows, geo.H - h0 + PA);
  const int c_lo = w0 == 0 ? 1 : 0, c_hi = min(D.chunks, (geo.W - w0) / V + 1);
  if (m < D.chunks)
    for (int r = r0; r < D.rows; r += 8)
      if (r < r_lo || r >= r_hi || m < c_lo || m >= c_hi) {
        if constexpr (half) {
          CMX_UNROLL
          for (int e = 0; e < V; ++e) dsc[r * D.stride + m * V + e] = 0.f;
        } else {
          const float zero[V] = {};
          store_terms(dhi, dlo, r * D.stride + m * V, zero, 1.f);
        }
      }
  float dbs = 0.f, mx = 0.f;
  {
    constexpr int kThreads = kMmaWarps * 32;
    const int mw = c_hi - c_lo;  // (>= 1, r_hi > r_lo: the tile's first chunk is in the image)
    const int dr = kThreads / mw, dm = kThreads % mw;
    int qr = tid / mw, qm = tid % mw;  // chunk q = tid, tid + 64, ..: r_lo + qr, c_lo + qm
    for (int q = tid; q < (r_hi - r_lo) * mw; q += kThreads) {
      const int r = r_lo + qr, mc = c_lo + qm;
      const int64_t off = offset_of(geo, base, h0 - PA + r, w0 - kMmaLead + mc * V);
      float du[V];
      if constexpr (DU) {
        ld16_floats<V>(du_in + off, du);
      } else {
        const Vec16<T> dv = ld16(dout + off);
        float u[V];
        ld16_floats<V>(u_saved + off, u);
        CMX_UNROLL
        for (int e = 0; e < V; ++e) du[e] = du_of(cmx_to_float(dv.v[e]), u[e], kd, geo.act);
      }
      if (mc >= 1 && mc <= kMmaTile / V && r >= PA && r < PA + kMmaTile)
        CMX_UNROLL
        for (int e = 0; e < V; ++e) dbs += du[e];
      if constexpr (half) {
        CMX_UNROLL
        for (int e = 0; e < V; ++e) {
          mx = fmaxf(mx, fabsf(du[e]));
          dsc[r * D.stride + mc * V + e] = du[e];
        }
      } else {
        store_terms(dhi, dlo, r * D.stride + mc * V, du, 1.f);
      }
      qm += dm;
      qr += dr;
      if (qm >= mw) {
        qm -= mw;
        ++qr;
      }
    }
  }
  dbs = warp_sum(dbs);
  if constexpr (half)
    CMX_UNROLL
    for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) {
    red[warp] = dbs;
    red[2 + warp] = mx;
  }
  __syncthreads();
  float s = 1.f, inv_s = 1.f;
  if constexpr (half) {
    pow2_scale(fmaxf(red[2], red[3]), s, inv_s);
    if (m < D.chunks)
      for (int r = r0; r < D.rows; r += 8) {
        float v[V];
        CMX_UNROLL
        for (int e = 0; e < V; ++e) v[e] = dsc[r * D.stride + m * V + e];
        store_terms(dhi, dlo, r * D.stride + m * V, v, s);
      }
  }
  //    x's halo one column on (its last column is never read); AFF: the mask's too
  if (m < L.xchunks)
    for (int r = r0; r < L.xrows; r += 8)
      CMX_UNROLL
      for (int e = 0; e < V; ++e) {
        const int q = r * L.xstride + m * V + e;
        const bool in_row = m * V + e + 1 < L.xchunks * V;
        xh1[q] = in_row ? xh0[q + 1] : cmx_from_float(0.f, T{});
        if constexpr (AFF) mk1[q] = in_row ? mk0[q + 1] : cmx_from_float(0.f, T{});
      }
  __syncthreads();
  const float as = AFF ? in_aff.scale[c] : 1.f, ac = AFF ? in_aff.shift[c] : 0.f;
  // 2. dx: accumulator pairs (rows g, g + 8 of the warp's 16; columns 8 nb + 2t, + 1) plus
  //    dout, two outputs per 4-byte access (a column pair lies wholly inside or outside);
  //    AFF: that is the block input's gradient din, dx = a din, and the tile sums din x
  //    (x from the halo's centre) and din
  {
    float acc[4][4], unused[4][4];
    mma_correlate<T, KT, KS, 2, 1>(dhi, dlo, sw, D, warp, acc, unused);
    float sds = 0.f, sdh = 0.f;
    CMX_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      const int r = 16 * warp + g + 8 * hr;
      if (h0 + r >= geo.H) continue;
      const int64_t orow = offset_of(geo, base, h0 + r, w0 + 2 * t);
      CMX_UNROLL
      for (int nb = 0; nb < 4; ++nb) {
        if (w0 + 8 * nb >= geo.W) break;
        float dv[2];
        unpack2<T>(cmx_ld_pair(dout + orow + 8 * nb), dv);
        const float din0 = dv[0] + acc[nb][2 * hr] * inv_s;
        const float din1 = dv[1] + acc[nb][2 * hr + 1] * inv_s;
        if constexpr (AFF) {
          float xv[2];
          unpack2<T>(cmx_ld_pair(xh0 + (r + PB) * L.xstride + kMmaLead + 2 * t + 8 * nb), xv);
          sds += din0 * xv[0] + din1 * xv[1];
          sdh += din0 + din1;
        }
        *reinterpret_cast<uint32_t*>(dx + orow + 8 * nb) =
            pack2(cmx_from_float(din0 * as, T{}), cmx_from_float(din1 * as, T{}));
      }
    }
    if constexpr (AFF) {
      sds = warp_sum(sds);
      sdh = warp_sum(sdh);
      if (lane == 0) {
        red[4 + warp] = sds;
        red[6 + warp] = sdh;
      }
    }
  }
  // 3. dW: A from x's halo row rr at columns c + j + 8 - PB (this lane's pairs from column
  //    col0 on, or from the copy one column on where col0 is odd); B from du's terms at plane
  //    row rr - i + PA, columns 8 + c. Every thread runs every row pair (the MMAs are the
  //    warp's together: the emulator's, the block's); a warp's rows past the halo add zeros.
  //    AFF: the same MMAs with A from the mask's planes, into awm
  constexpr int NTX = KT > 0 ? cdiv(KT, 8) : 2;
  constexpr int NM = AFF ? NTX : 1;
  float aw[NTX][4], awm[NM][4];
  CMX_UNROLL
  for (int nt = 0; nt < NTX; ++nt)
    CMX_UNROLL
    for (int q = 0; q < 4; ++q) aw[nt][q] = awm[nt % NM][q] = 0.f;
  const int col0 = g + 2 * t + kMmaLead - PB;
  const T* const xa = (col0 & 1) ? xh1 + col0 - 1 : xh0 + col0;
  const T* const ma = (col0 & 1) ? mk1 + col0 - 1 : mk0 + col0;  // (AFF)
  for (int rp = 0; rp < cdiv(L.xrows, kMmaWarps); ++rp) {
    // a pair of halo rows wholly outside the image (the padding: x and the mask zero) adds
    // nothing; the test is the block's, as the emulator's MMAs are the block's together
    const int gh = h0 - PB + kMmaWarps * rp;
    if (gh + kMmaWarps - 1 < 0 || gh >= geo.H) continue;
    const int rr = kMmaWarps * rp + warp;
    const bool row_ok = rr < L.xrows;
    CMX_UNROLL
    for (int kk = 0; kk < 2; ++kk) {
      const T* p = xa + rr * L.xstride + 16 * kk;
      const uint32_t a1 = row_ok ? cmx_ld_pair(p + 8) : 0u;
      const uint32_t a[4] = {row_ok ? cmx_ld_pair(p) : 0u, a1, a1,
                             row_ok ? cmx_ld_pair(p + 16) : 0u};
      uint32_t am[4] = {0u, 0u, 0u, 0u};
      if constexpr (AFF) {
        const T* pm = ma + rr * L.xstride + 16 * kk;
        am[0] = row_ok ? cmx_ld_pair(pm) : 0u;
        am[1] = am[2] = row_ok ? cmx_ld_pair(pm + 8) : 0u;
        am[3] = row_ok ? cmx_ld_pair(pm + 16) : 0u;
      }
      CMX_UNROLL
      for (int nt = 0; nt < NTX; ++nt) {
        if (nt >= L.NT) break;
        const int r = rr - 8 * nt - g;  // du's tile row
        const bool ok = row_ok && r >= 0 && r < kMmaTile;
        const int o = (r + PA) * D.stride + kMmaLead + 2 * t + 16 * kk;
        CMX_UNROLL
        for (int term = 0; term < 2; ++term) {
          const T* du = term == 0 ? dhi : dlo;
          const uint32_t bf[2] = {ok ? cmx_ld_pair(du + o) : 0u,
                                  ok ? cmx_ld_pair(du + o + 8) : 0u};
          cmx_mma_16816(aw[nt], a, bf, T{});
          if constexpr (AFF) cmx_mma_16816(awm[nt % NM], am, bf, T{});
        }
      }
    }
  }
  __syncthreads();  // the x planes are free: warp 1's sums go there, warp 0 adds its own
  float* const ex = smem + L.x0() / 2;
  float* const exm = ex + NTX * 4 * 32;  // (AFF)
  if (warp == 1)
    CMX_UNROLL
    for (int nt = 0; nt < NTX; ++nt)
      CMX_UNROLL
      for (int q = 0; q < 4; ++q) {
        ex[(nt * 4 + q) * 32 + lane] = aw[nt][q];
        if constexpr (AFF) exm[(nt * 4 + q) * 32 + lane] = awm[nt % NM][q];
      }
  __syncthreads();
  if (warp == 0) {
    const int64_t prow = blk.row * geo.C + c;
    float* const out = dw_p + prow * K * K;
    CMX_UNROLL
    for (int nt = 0; nt < NTX; ++nt)
      CMX_UNROLL
      for (int q = 0; q < 4; ++q) {
        const int j = g + 8 * (q / 2), i = 8 * nt + 2 * t + q % 2;
        const int at = (nt * 4 + q) * 32 + lane;
        float v = aw[nt][q] + ex[at];
        if constexpr (AFF) v = as * v + ac * (awm[nt % NM][q] + exm[at]);
        if (i < K && j < K) out[i * K + j] = v * inv_s;
      }
    if (tid == 0) {
      db_p[prow] = red[0] + red[1];
      if constexpr (AFF) {
        in_aff.dscale_p[prow] = red[4] + red[5];
        in_aff.dshift_p[prow] = red[6] + red[7];
      }
    }
  }
}

}  // namespace cmx
