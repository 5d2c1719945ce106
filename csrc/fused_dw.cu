// Host side of the kernel library: the C ABI of cmx_abi.h — argument checks, tiling, the
// dtype/kernel-size dispatch and the launches. No torch header: Python passes pointers,
// sizes, strides, the dtype and the stream (convmixer_ext/_cmx_lib.py, cuda_kernels.py).
//   nvcc build (convmixer_ext/_cmx_cuda.so): real launches on the caller's stream;
//   host build (convmixer_ext/_cmx_emu.so):  the same kernels run by the emulator in
//                                            cmx_device.h (CMX_HOST_EMULATION).
#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "cmx_abi.h"
#include "fused_dw_kernels.cuh"

#ifndef CMX_ARCH_LIST
#define CMX_ARCH_LIST "unknown"
#endif
#define CMX_STR2(x) #x
#define CMX_STR(x) CMX_STR2(x)

namespace cmx {
namespace {

// Dynamic shared memory per block: within what every sm_80+ GPU grants with opt-in
// (sm_86/sm_89: 99 KB); above 48 KB a kernel opts in before its first launch.
constexpr int64_t kSmemLimit = 96 * 1024;
constexpr int64_t kSmemDefault = 48 * 1024;
// Per SM on sm_90 (the planner's occupancy estimate): shared memory, its per-block reserve,
// resident blocks and threads.
constexpr int64_t kSmemPerSM = 233472, kSmemReserve = 1024, kMaxBlocksPerSM = 32,
                  kMaxThreadsPerSM = 2048;
constexpr int64_t kMaxBlocks = 2147483647;  // gridDim.x limit (1-D grid)
constexpr int64_t kMaxGridYZ = 65535;       // gridDim.y, gridDim.z limits
constexpr int kTile = 32;                   // spatial tile edge (the whole ConvMixer plane)
constexpr int kThreadsTarget = 128;         // preferred threads per block (NCHW)
constexpr int kMaxCB = 32;                  // channels per block (channel_sum's scratch)
// Reductions split the (image, tile) items of a channel block into just enough parts to give
// about this many blocks (8 per SM of a 132-SM GPU): fewer partial rows to write and sum.
constexpr int64_t kTargetBlocks = 1056;
// The elementwise F2 (apply_u_kernel): blocks of kMaxThreads threads, at most this many (its
// grid-stride loop takes the rest): 8 waves of 8 resident blocks per SM on 132 SMs.
constexpr int64_t kElementwiseBlocks = 8 * kTargetBlocks;

thread_local char g_error[1024] = "";

int32_t fail(int32_t code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(g_error, sizeof(g_error), fmt, ap);
  va_end(ap);
  return code;
}

int32_t check_launch(cmx_error_t e, const char* what) {
  if (e == cmx_success) return CMX_OK;
#ifdef CMX_HOST_EMULATION
  if (e == kCmxAsyncLeft)
    return fail(CMX_E_CUDA, "%s: emulated launch failed: a thread left its block with "
                "cp.async copies never waited for", what);
  return fail(CMX_E_CUDA, "%s: emulated launch failed (%d)", what, e);
#else
  return fail(CMX_E_CUDA, "%s: %s", what, cudaGetErrorString(e));
#endif
}

int elem_size(int dtype) { return dtype == CMX_FLOAT32 ? 4 : 2; }

enum Pass { kF1, kF2, kB1, kB2 };

// The kernel sizes a pass's instantiations unroll (the others run the generic, run-time k
// one): 3, 5, 7, 9; with the saved u (su), F1 (saving it) and B2 unroll the sizes that save
// it by default, 7 and 9, and F2 and B1 (reading it) convolve nothing: one instantiation.
using Unrolled = std::integer_sequence<int, 3, 5, 7, 9>;
using UnrolledSaved = std::integer_sequence<int, 7, 9>;
using NoneUnrolled = std::integer_sequence<int>;

template <int... Ks>
constexpr int kt_in(int K, std::integer_sequence<int, Ks...>) {
  int kt = 0;
  ((kt = K == Ks ? Ks : kt), ...);
  return kt;
}

// The KT template argument of a pass's kernel for kernel size K.
int unrolled(int K, Pass pass, bool su) {
  if (!su) return kt_in(K, Unrolled{});
  return pass == kF1 || pass == kB2 ? kt_in(K, UnrolledSaved{}) : 0;
}

// Shared memory of a pass for a geometry, in bytes; su: F1 saves u (through a tile plane),
// F2, B1 and B2 read it.
int64_t smem_bytes(const Geom& g, int elem, Pass pass, bool affine, bool su) {
  const int RW = 16 / elem, RH = 16 / RW;
  if (pass == kB2)
    return int64_t{BwdSmem(g, RH, RW, unrolled(g.K, pass, su), affine, su).total(g.CB)} * 4;
  const bool conv = pass == kF1 || !su;
  const bool tile = pass == kB1 || su;  // B1: dout; F1: u to store; F2: u read
  const bool out = pass == kF2;
  return int64_t{FwdSmem(g, RH, RW, conv, tile, out).total(g.CB)} * 4;
}

// Everything a launch needs, derived from the shape (and whether its pointers are 16-byte
// aligned, which decides the vector path).
struct Plan {
  Geom geo;
  int64_t rows, blocks;
  int threads;
  size_t smem;
  // F2 / B1 reading u, their kernels that load global memory directly instead of staging
  // tiles: apply_u_kernel (F2, x dense), bwd_reduce_u_kernel (B1, NCHW, 16-byte path)
  bool direct = false;
  // F2 or B2 on tensor cores (apply_mma_kernel, bwd_mma_kernel): 32 x 32 tiles of one
  // channel, a block each, on a 3-D grid (blocks planes x gy tile columns x gz tile rows)
  bool mma = false;
  // B2 on tensor cores in two launches (CMX_TC_ALL, planes of several tiles): du_kernel
  // writes du to outputs.du, then bwd_mma_kernel<T, KT, true> reads it (else one launch,
  // each tile computing du on its halo)
  bool du = false;
  int64_t gy = 1, gz = 1;
};

int32_t check_shape(const cmx_shape* s) {
  if (!s) return fail(CMX_E_INVALID, "shape is NULL");
  if (s->n < 0 || s->c < 1 || s->h < 1 || s->w < 1)
    return fail(CMX_E_INVALID, "x must have N >= 0 and C, H, W >= 1, got [%lld, %lld, %lld, %lld]",
                (long long)s->n, (long long)s->c, (long long)s->h, (long long)s->w);
  if (s->c > INT32_MAX || s->h > INT32_MAX || s->w > INT32_MAX || s->n > INT32_MAX)
    return fail(CMX_E_LIMIT, "x dimensions must be below 2^31, got [%lld, %lld, %lld, %lld]",
                (long long)s->n, (long long)s->c, (long long)s->h, (long long)s->w);
  if (s->dtype != CMX_FLOAT32 && s->dtype != CMX_FLOAT16 && s->dtype != CMX_BFLOAT16)
    return fail(CMX_E_INVALID, "unknown dtype id %d", s->dtype);
  if (s->k < 1 || s->k > kMaxK)
    return fail(CMX_E_INVALID, "kernel size must be in [1, %d], got %d", kMaxK, s->k);
  if (s->act < 0 || s->act >= CMX_NUM_ACTIVATIONS)
    return fail(CMX_E_INVALID, "unknown activation id %d", s->act);
  if (s->tensor_cores < 0 || s->tensor_cores > CMX_TC_ALL_FUSED)
    return fail(CMX_E_INVALID, "tensor_cores must be 0 .. %d, got %d", CMX_TC_ALL_FUSED,
                s->tensor_cores);
  if (s->images_per_block < 0)
    return fail(CMX_E_INVALID, "images_per_block must be >= 0 (0: one image), got %d",
                s->images_per_block);
  return CMX_OK;
}

// The geometry of a pass: layout, vector path, spatial tile and channels per block.
// The spatial tile (hence the partial rows) depends on the shape and strides only, so it is
// the same for every pass whatever the alignment of its tensors: up to 32 x 32, smaller
// where B2 would not fit in shared memory, or where channels_last needs a whole 16-byte
// chunk of channels per block within kMaxThreads. channels_last gives up the chunks (one
// channel per item) rather than shrink the tile below 16 x 16. Channels per block: about
// kThreadsTarget threads, within the shared-memory limit (with the saved u, `su`, where a
// pass needs less shared memory it may take more channels; the tile stays the same).
void choose(const cmx_shape* s, Pass pass, bool aligned, Geom& g) {
  const int elem = elem_size(s->dtype), V = 16 / elem, RW = V, RH = 16 / RW;
  g.N = static_cast<int>(s->n);
  g.C = static_cast<int>(s->c);
  g.H = static_cast<int>(s->h);
  g.W = static_cast<int>(s->w);
  g.K = s->k;
  g.PB = pad_before(s->k);
  g.act = s->act;
  g.ipb = 1;
  g.sN = s->stride[0];
  g.sC = s->stride[1];
  g.sH = s->stride[2];
  g.sW = s->stride[3];
  const int64_t positions = s->n * s->h * s->w;
  g.inv_n = positions > 0 ? 1.f / static_cast<float>(positions) : 0.f;
  // 16-byte path: the contiguous dimension and every other stride multiples of V, the
  // pointers aligned
  const bool cl = g.sC == 1 && g.C > 1 && g.sW != 1;
  g.layout = cl ? kChannelsLast : kNCHW;
  const bool strides_ok = cl ? (g.C % V == 0 && g.sW % V == 0 && g.sH % V == 0 && g.sN % V == 0)
                             : (g.sW == 1 && g.W % V == 0 && g.sH % V == 0 && g.sC % V == 0 &&
                                g.sN % V == 0);
  const bool affine = s->has_in_affine != 0, su = s->saved_u != 0;
  auto set_tile = [&](int th, int tw) {
    g.TH = th;
    g.TW = tw;
    g.GH = cdiv(th, RH);
    g.GW = cdiv(tw, RW);
    return g.GH * g.GW;
  };
  // candidates: (channels per block at least, chunks allowed, smallest tile edge)
  const bool chunked_cl = cl && strides_ok;
  const int tries = chunked_cl ? 2 : 1;
  int min_cb = 1;
  bool chunks = strides_ok;
  for (int attempt = 0; attempt < tries; ++attempt) {
    const bool last = attempt == tries - 1;
    min_cb = (chunked_cl && attempt == 0) ? V : 1;
    chunks = strides_ok && (!cl || attempt == 0);
    const int floor_edge = last ? 1 : 16;
    int th = std::min(g.H, kTile), tw = std::min(g.W, kTile);
    bool fits = false;
    for (;;) {
      const int tpc = set_tile(th, tw);
      g.CB = min_cb;
      g.vec = chunks ? 1 : 0;
      fits = min_cb * tpc <= kMaxThreads &&
             smem_bytes(g, elem, kB2, affine, false) <= kSmemLimit;
      if (fits) break;
      const bool can_h = th > std::max(floor_edge, RH), can_w = tw > std::max(floor_edge, RW);
      if (!can_h && !can_w) break;
      if (can_h && (th >= tw || !can_w))
        th = cdiv(th, 2);
      else
        tw = cdiv(tw, 2);
    }
    if (fits || last) break;
  }
#ifdef CMX_HOST_EMULATION
  if (cmx_emu::planted_misalignment()) aligned = true;  // tests/asan.sh's planted bug
#endif
  g.vec = chunks && aligned ? 1 : 0;
  const int tpc = g.GH * g.GW;
  int cb = std::max(min_cb, std::min(kThreadsTarget / tpc, kMaxCB));
  cb = std::min(cb, round_up(g.C, min_cb));
  cb = std::max(min_cb, std::min(cb, kMaxThreads / tpc) / min_cb * min_cb);
  for (g.CB = cb; g.CB > min_cb && smem_bytes(g, elem, pass, affine, su) > kSmemLimit;)
    g.CB -= min_cb;
  // fewer channels where shared memory then lets more threads reside per SM (large k: a
  // block of two channels at 88 KB leaves room for two, of one at 44 KB for five)
  auto resident = [&](int CB) {
    Geom t = g;
    t.CB = CB;
    const int64_t blocks = std::min<int64_t>(
        {kSmemPerSM / (smem_bytes(t, elem, pass, affine, su) + kSmemReserve), kMaxBlocksPerSM,
         kMaxThreadsPerSM / (CB * tpc)});
    return blocks * CB * tpc;
  };
  while (g.CB > min_cb && resident(g.CB - min_cb) > resident(g.CB)) g.CB -= min_cb;
  if (g.layout == kChannelsLast && g.vec && g.CB % V != 0) g.vec = 0;  // (kept a multiple)
  g.prefetch = s->prefetch != 0 && g.vec ? 1 : 0;
  g.tiles_w = cdiv(g.W, g.TW);
  g.tiles_per_img = cdiv(g.H, g.TH) * g.tiles_w;
  g.cblocks = cdiv(g.C, g.CB);
  const int64_t items = s->n * g.tiles_per_img;
  const int64_t target = s->target_blocks > 0 ? s->target_blocks : kTargetBlocks;
  const int64_t parts = pass == kF2 ? items : (target + g.cblocks - 1) / g.cblocks;
  g.parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(parts, items)));
}

// x dense in its layout (NCHW-contiguous or channels_last; a dimension of size 1 may have any
// stride) with a row length below 2^31: apply_u_kernel's rows of L contiguous elements.
bool dense_rows(const Geom& g) {
  const int64_t W = g.W, HW = int64_t{g.H} * g.W, C = g.C;
  auto is = [](int64_t size, int64_t stride, int64_t want) { return size == 1 || stride == want; };
  if (g.layout == kChannelsLast)
    return is(g.C, g.sC, 1) && is(g.W, g.sW, C) && is(g.H, g.sH, W * C) && is(g.N, g.sN, HW * C);
  return HW <= INT32_MAX && is(g.W, g.sW, 1) && is(g.H, g.sH, W) && is(g.C, g.sC, HW) &&
         is(g.N, g.sN, HW * C);
}

// Whether a tensor-core kernel takes the shape: asked for at `level` (shape.tensor_cores),
// 16-bit x in NCHW on the 16-byte path (W a multiple of 8: every 16-byte chunk of a halo row
// wholly inside or outside the image), k <= max_k.
bool mma_shape_takes(const cmx_shape* s, const Geom& g, int level, int max_k) {
  return s->tensor_cores >= level && s->dtype != CMX_FLOAT32 && g.layout == kNCHW && g.vec &&
         s->k <= max_k;
}

// Whether F2 takes apply_mma_kernel: asked for (CMX_TC_F2), a kernel whose halo fits 8
// columns either side (k <= kMmaMaxK) and nothing saved (F2 reading u convolves nothing).
bool mma_takes(const cmx_shape* s, const Geom& g) {
  return mma_shape_takes(s, g, CMX_TC_F2, kMmaMaxK) && s->saved_u == 0;
}

// Whether B2 takes bwd_mma_kernel: asked for all passes (CMX_TC_ALL or CMX_TC_ALL_FUSED),
// reading the saved u (du comes from u), k <= kMmaB2MaxK.
bool mma_b2_takes(const cmx_shape* s, const Geom& g) {
  return mma_shape_takes(s, g, CMX_TC_ALL, kMmaB2MaxK) && s->saved_u != 0;
}

// Whether F1 takes stats_mma_kernel: asked for all passes (CMX_TC_ALL), saving u (training's
// F1 where B2 then reads it; F1 without saving keeps stats_kernel).
bool mma_f1_takes(const cmx_shape* s, const Geom& g) {
  return mma_shape_takes(s, g, CMX_TC_ALL, kMmaMaxK) && s->saved_u != 0;
}

// The plan of a tensor-core kernel: a block of kMmaWarps warps per 32 x 32 tile of a plane
// (of g.ipb images' planes one after another: F2); `partials`: a partial row per image and
// tile (F1, B2), else none (F2).
int32_t mma_plan(const cmx_shape* s, const Geom& g, size_t smem, bool partials, Plan& p) {
  p.mma = true;
  p.threads = kMmaWarps * 32;
  p.blocks = (s->n + g.ipb - 1) / g.ipb * g.C;
  p.gy = cdiv(g.W, kMmaTile);
  p.gz = cdiv(g.H, kMmaTile);
  p.rows = partials ? s->n * p.gy * p.gz : 0;
  p.smem = smem;
  if (p.blocks > kMaxBlocks || p.gy > kMaxGridYZ || p.gz > kMaxGridYZ)
    return fail(CMX_E_LIMIT,
                "x of shape [%lld, %lld, %lld, %lld] needs a grid of %lld x %lld x %lld "
                "blocks, beyond the CUDA limits of %lld x %lld x %lld",
                (long long)s->n, (long long)s->c, (long long)s->h, (long long)s->w,
                (long long)p.blocks, (long long)p.gy, (long long)p.gz, (long long)kMaxBlocks,
                (long long)kMaxGridYZ, (long long)kMaxGridYZ);
  return CMX_OK;
}

int32_t make_plan(const cmx_shape* s, Pass pass, bool aligned, Plan& p) {
  if (int32_t e = check_shape(s)) return e;
  Geom& g = p.geo;
  choose(s, pass, aligned, g);
  if (pass == kF2 && s->saved_u != 0 && dense_rows(g)) {
    const int V = 16 / elem_size(s->dtype);
    const int64_t L = g.layout == kChannelsLast ? g.C : int64_t{g.H} * g.W;
    g.vec = aligned && L % V == 0 ? 1 : 0;
    g.prefetch = 0;  // nothing is staged
    const int64_t chunks = s->n * g.C * g.H * g.W / (g.vec ? V : 1);
    p.direct = true;
    p.rows = 0;
    p.threads = kMaxThreads;
    // (the test knob target_blocks caps it too: a few blocks then loop over many chunks)
    p.blocks = std::min<int64_t>((chunks + kMaxThreads - 1) / kMaxThreads,
                                 s->target_blocks > 0 ? s->target_blocks : kElementwiseBlocks);
    p.smem = 0;
    return CMX_OK;
  }
  // (the tensor-core kernels' grids place the tiles: geo's tiling is not read)
  const bool affine = s->has_in_affine != 0;
  if (pass == kF2 && mma_takes(s, g)) {
    // several images a block: the plain input's kernel only (apply_mma_kernel's PIPE)
    g.ipb = affine ? 1
                   : static_cast<int>(std::clamp<int64_t>(s->images_per_block, 1,
                                                          std::max<int64_t>(s->n, 1)));
    const MmaShape S(g.K);
    return mma_plan(s, g,
                    static_cast<size_t>(g.ipb > 1 ? S.pipelined_elements(affine)
                                                  : S.elements(affine)) * 2,
                    false, p);
  }
  if (pass == kF1 && mma_f1_takes(s, g))
    return mma_plan(s, g, static_cast<size_t>(MmaShape(g.K).stats_bytes(affine)), true, p);
  if (pass == kB2 && mma_b2_takes(s, g)) {
    const int32_t e = mma_plan(
        s, g, static_cast<size_t>(MmaB2Layout(g.K, affine).bytes(s->dtype == CMX_FLOAT16)),
        true, p);
    // du's own pass where a plane has several tiles, whose halos overlap (each would
    // recompute its neighbours' du); a plane of one tile computes each du once either way
    p.du = s->tensor_cores != CMX_TC_ALL_FUSED && p.gy * p.gz > 1;
    return e;
  }
  p.rows = s->n > 0 ? g.parts : 0;
  p.blocks = p.rows * g.cblocks;
  p.threads = g.CB * g.GH * g.GW;
  p.smem = static_cast<size_t>(smem_bytes(g, elem_size(s->dtype), pass,
                                          s->has_in_affine != 0, s->saved_u != 0));
  if (pass == kB1 && s->saved_u != 0 && g.layout == kNCHW && g.vec) {
    p.direct = true;  // its shared memory: channel_sum's scratch alone
    p.smem = (kMaxThreads + 32) * sizeof(float);
  }
  if (s->n * g.tiles_per_img > INT32_MAX)
    return fail(CMX_E_LIMIT, "x of shape [%lld, %lld, %lld, %lld] has more than 2^31 tiles",
                (long long)s->n, (long long)s->c, (long long)s->h, (long long)s->w);
  if (p.blocks > kMaxBlocks)
    return fail(CMX_E_LIMIT,
                "x of shape [%lld, %lld, %lld, %lld] needs %lld blocks, more than the CUDA grid "
                "limit of %lld",
                (long long)s->n, (long long)s->c, (long long)s->h, (long long)s->w,
                (long long)p.blocks, (long long)kMaxBlocks);
  if (static_cast<int64_t>(p.smem) > kSmemLimit || p.threads > kMaxThreads)
    return fail(CMX_E_LIMIT, "a tile needs %zu bytes of shared memory (limit %lld)", p.smem,
                (long long)kSmemLimit);
  return CMX_OK;
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* q : ptrs)
    if (q && (reinterpret_cast<uintptr_t>(q) & 15u) != 0) return false;
  return true;
}

int32_t need(const void* ptr, const char* name) {
  return ptr ? CMX_OK : fail(CMX_E_INVALID, "%s is NULL", name);
}

InAffine in_affine_of(const cmx_shape* s, const cmx_inputs* in, const cmx_outputs* out) {
  InAffine a{nullptr, nullptr, nullptr, nullptr};
  if (s->has_in_affine) {
    a.scale = in->in_scale;
    a.shift = in->in_shift;
    if (out) {
      a.dscale_p = out->dscale_p;
      a.dshift_p = out->dshift_p;
    }
  }
  return a;
}

int32_t check_in_affine(const cmx_shape* s, const cmx_inputs* in) {
  if (!s->has_in_affine) return CMX_OK;
  if (int32_t e = need(in->in_scale, "in_scale")) return e;
  return need(in->in_shift, "in_shift");
}

// f(T{}, std::integral_constant<int, KT>{}) for the shape's dtype and KT = kt, one of the
// unrolled sizes Ks or 0 (only those are instantiated).
template <class Tag, class F>
void with_kt(int, Tag tag, F& f, std::integer_sequence<int>) {
  f(tag, std::integral_constant<int, 0>{});
}
template <class Tag, class F, int K0, int... Ks>
void with_kt(int kt, Tag tag, F& f, std::integer_sequence<int, K0, Ks...>) {
  if (kt == K0)
    f(tag, std::integral_constant<int, K0>{});
  else
    with_kt(kt, tag, f, std::integer_sequence<int, Ks...>{});
}

template <class Seq, class F>
void dispatch(const cmx_shape* s, int kt, F&& f) {
  auto with_k = [&](auto tag) { with_kt(kt, tag, f, Seq{}); };
  switch (s->dtype) {
    case CMX_FLOAT32: with_k(float{}); break;
    case CMX_FLOAT16: with_k(cmx_half{}); break;
    default: with_k(cmx_bf16{}); break;  // check_shape accepted only these three
  }
}

// Launches kernel over the plan on the caller's stream; above 48 KB of shared memory the
// kernel opts in first (a host-side attribute: no stream work, no synchronisation).
template <class Kernel, class... Args>
cmx_error_t launch(Kernel kernel, const Plan& p, const cmx_inputs* in, Args... args) {
#ifndef CMX_HOST_EMULATION
  if (static_cast<int64_t>(p.smem) > kSmemDefault) {
    const cudaError_t opt_in = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem));
    if (opt_in != cudaSuccess) return opt_in;
  }
#endif
  return cmx_launch(kernel,
                    dim3(static_cast<unsigned>(p.blocks), static_cast<unsigned>(p.gy),
                         static_cast<unsigned>(p.gz)),
                    dim3(static_cast<unsigned>(p.threads)), p.smem,
                    reinterpret_cast<cudaStream_t>(in->stream), args...);
}

template <class T>
const T* as(const void* p) {
  return static_cast<const T*>(p);
}

// One pass: the plan (16-byte path when every pointer given is aligned, and u when the
// shape says saved_u), the required pointers (and u, F1's output or the later passes' input),
// the input affine, then launch_for(T{}, integral_constant<KT>, bool_constant<SU>, plan)
// for the shape's dtype, kernel size and saved_u; the launch error as a message.
using Required = std::initializer_list<std::pair<const void*, const char*>>;

template <Pass P, class LaunchFor>
int32_t run_pass(const cmx_shape* s, const cmx_inputs* in, const void* u,
                 std::initializer_list<const void*> aligned_ptrs, Required required,
                 const char* what, LaunchFor&& launch_for, const void* du = nullptr) {
  Plan p;
  const bool su = s && s->saved_u != 0;
  if (int32_t e = make_plan(s, P, s && s->aligned && aligned16(aligned_ptrs) &&
                                      (!su || aligned16({u})), p))
    return e;
  if (p.blocks == 0) return CMX_OK;
  for (auto [ptr, name] : required)
    if (int32_t e = need(ptr, name)) return e;
  if (su)
    if (int32_t e = need(u, "u")) return e;
  if (p.du)  // (a misaligned du left the 16-byte path, and the tensor cores with it)
    if (int32_t e = need(du, "du")) return e;
  if (int32_t e = check_in_affine(s, in)) return e;
  cmx_error_t err = cmx_success;
  const int kt = unrolled(s->k, P, su);
  if (su) {
    using Seq = std::conditional_t<P == kF1 || P == kB2, UnrolledSaved, NoneUnrolled>;
    dispatch<Seq>(s, kt, [&](auto tag, auto kc) { err = launch_for(tag, kc, std::true_type{}, p); });
  } else {
    dispatch<Unrolled>(s, kt,
                       [&](auto tag, auto kc) { err = launch_for(tag, kc, std::false_type{}, p); });
  }
  return check_launch(err, what);
}

#ifdef CMX_HOST_EMULATION
// One warp's MMA on fragment registers given per lane (cmx_mma_probe).
template <typename T>
void mma_probe_kernel(const uint32_t* regs, float* d) {
  const unsigned lane = threadIdx.x;
  const uint32_t a[4] = {regs[lane * 6], regs[lane * 6 + 1], regs[lane * 6 + 2],
                         regs[lane * 6 + 3]};
  const uint32_t b[2] = {regs[lane * 6 + 4], regs[lane * 6 + 5]};
  float acc[4] = {d[lane * 4], d[lane * 4 + 1], d[lane * 4 + 2], d[lane * 4 + 3]};
  cmx_mma_16816(acc, a, b, T{});
  for (int e = 0; e < 4; ++e) d[lane * 4 + e] = acc[e];
}
#endif

}  // namespace
}  // namespace cmx

using namespace cmx;

extern "C" {

CMX_API int32_t cmx_abi_version(void) { return CMX_ABI_VERSION; }

CMX_API const char* cmx_last_error(void) { return g_error; }

CMX_API const char* cmx_build_info(void) {
#ifdef CMX_HOST_EMULATION
  return "kind=emulation";
#else
  return "kind=cuda;archs=" CMX_ARCH_LIST ";cuda=" CMX_STR(__CUDACC_VER_MAJOR__) "." CMX_STR(
      __CUDACC_VER_MINOR__);
#endif
}

CMX_API int32_t cmx_max_kernel_size(void) { return kMaxK; }

CMX_API const char* cmx_activation_name(int32_t act) {
  switch (act) {
    case CMX_ACT_GELU: return "gelu";
    case CMX_ACT_GELU_TANH: return "gelu_tanh";
    case CMX_ACT_RELU: return "relu";
    default: return nullptr;
  }
}

CMX_API int32_t cmx_device_count(void) {
#ifdef CMX_HOST_EMULATION
  return 0;
#else
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver ||
      e == cudaErrorInitializationError) {
    cudaGetLastError();
    return -fail(CMX_E_NO_DEVICE, "no CUDA device (%s)", cudaGetErrorString(e));
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    return -fail(CMX_E_CUDA, "cudaGetDeviceCount: %s", cudaGetErrorString(e));
  }
  return n;
#endif
}

CMX_API int32_t cmx_check_device(int32_t device) {
#ifdef CMX_HOST_EMULATION
  (void)device;
  return fail(CMX_E_NO_DEVICE, "the emulation build runs on the host, not on a CUDA device");
#else
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) return fail(CMX_E_NO_DEVICE, "no CUDA device");
  if (cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return fail(CMX_E_NO_DEVICE, "cannot select CUDA device %d", device);
  }
  cudaFuncAttributes attr;
  const cudaError_t e = cudaFuncGetAttributes(&attr, stats_kernel<float, 3, false>);
  cudaGetLastError();
  cudaSetDevice(prev);
  if (e != cudaSuccess)
    return fail(CMX_E_NO_DEVICE, "no kernel image for device %d in this build (%s; built for %s)",
                device, cudaGetErrorString(e), CMX_ARCH_LIST);
  return CMX_OK;
#endif
}

CMX_API int32_t cmx_make_plan(const cmx_shape* shape, cmx_plan* plan) {
  Plan ps[4];
  const bool aligned = shape && shape->aligned;
  for (int i = 0; i < 4; ++i)
    if (int32_t e = make_plan(shape, static_cast<Pass>(i), aligned, ps[i])) return e;
  if (!plan) return fail(CMX_E_INVALID, "plan is NULL");
  plan->tile_h = ps[0].geo.TH;  // one spatial tiling for every pass
  plan->tile_w = ps[0].geo.TW;
  plan->vec = ps[0].geo.vec;
  plan->direct = 0;
  plan->mma = 0;
  plan->du = ps[kB2].du ? 1 : 0;
  for (int i = 0; i < 4; ++i) {
    plan->partial_rows[i] = i == kF2 ? 0 : ps[i].rows;
    plan->blocks[i] = ps[i].blocks * ps[i].gy * ps[i].gz;
    plan->threads[i] = ps[i].threads;
    plan->channels_per_block[i] = ps[i].geo.CB;
    plan->smem[i] = static_cast<int32_t>(ps[i].smem);
    plan->direct |= ps[i].direct ? 1 << i : 0;
    plan->mma |= ps[i].mma ? 1 << i : 0;
  }
  return CMX_OK;
}

CMX_API int32_t cmx_stats(const cmx_shape* s, const cmx_inputs* in, const cmx_outputs* out) {
  if (!in || !out) return fail(CMX_E_INVALID, "inputs or outputs is NULL");
  return run_pass<kF1>(s, in, out->u, {in->x},
                       {{in->x, "x"}, {in->weight, "weight"}, {in->bias, "bias"},
                        {out->mean_p, "mean_p"}, {out->m2_p, "m2_p"}, {out->count_p, "count_p"}},
                       "stats_kernel", [&](auto tag, auto kc, auto su, const Plan& p) {
                         using T = decltype(tag);
                         constexpr int KT = decltype(kc)::value;
                         if constexpr (!std::is_same_v<T, float> && decltype(su)::value)
                           if (p.mma)
                             return launch(s->has_in_affine ? stats_mma_kernel<T, KT, true>
                                                            : stats_mma_kernel<T, KT, false>,
                                           p, in, as<T>(in->x), as<T>(in->weight),
                                           as<T>(in->bias), out->mean_p, out->m2_p,
                                           out->count_p, out->u, in_affine_of(s, in, nullptr),
                                           p.geo);
                         return launch(stats_kernel<T, decltype(kc)::value, decltype(su)::value>,
                                       p, in,
                                       as<T>(in->x), as<T>(in->weight), as<T>(in->bias),
                                       out->mean_p, out->m2_p, out->count_p, out->u,
                                       in_affine_of(s, in, nullptr), p.geo);
                       });
}

CMX_API int32_t cmx_apply(const cmx_shape* s, const cmx_inputs* in, const cmx_outputs* out) {
  if (!in || !out) return fail(CMX_E_INVALID, "inputs or outputs is NULL");
  return run_pass<kF2>(
      s, in, in->u, {in->x, out->y},
      {{in->x, "x"}, {in->weight, "weight"}, {in->bias, "bias"}, {in->mean, "mean"},
       {in->rstd, "rstd"}, {in->gamma, "gamma"}, {in->beta, "beta"}, {out->y, "out"}},
      "apply_kernel", [&](auto tag, auto kc, auto su, const Plan& p) {
        using T = decltype(tag);
        if constexpr (decltype(su)::value)
          if (p.direct)
            return launch(apply_u_kernel<T>, p, in, as<T>(in->x), in->u, in->mean, in->rstd,
                          in->gamma, in->beta, static_cast<T*>(out->y),
                          in_affine_of(s, in, nullptr), p.geo);
        if constexpr (!std::is_same_v<T, float> && !decltype(su)::value)
          if (p.mma) {
            constexpr int KT = decltype(kc)::value;
            auto kernel = s->has_in_affine ? apply_mma_kernel<T, KT, true>
                          : p.geo.ipb > 1  ? apply_mma_kernel<T, KT, false, true>
                                           : apply_mma_kernel<T, KT, false>;
            return launch(kernel, p, in, as<T>(in->x), as<T>(in->weight), as<T>(in->bias),
                          in->mean, in->rstd, in->gamma, in->beta, static_cast<T*>(out->y),
                          in_affine_of(s, in, nullptr), p.geo);
          }
        return launch(apply_kernel<T, decltype(kc)::value, decltype(su)::value>, p, in,
                      as<T>(in->x), as<T>(in->weight), as<T>(in->bias), in->u, in->mean,
                      in->rstd, in->gamma, in->beta, static_cast<T*>(out->y),
                      in_affine_of(s, in, nullptr), p.geo);
      });
}

CMX_API int32_t cmx_bwd_reduce(const cmx_shape* s, const cmx_inputs* in,
                               const cmx_outputs* out) {
  if (!in || !out) return fail(CMX_E_INVALID, "inputs or outputs is NULL");
  return run_pass<kB1>(
      s, in, in->u, {in->x, in->dout},
      {{in->x, "x"}, {in->dout, "dout"}, {in->weight, "weight"}, {in->bias, "bias"},
       {in->mean, "mean"}, {in->rstd, "rstd"}, {out->dbeta_p, "dbeta_p"},
       {out->dgamma_p, "dgamma_p"}},
      "bwd_reduce_kernel", [&](auto tag, auto kc, auto su, const Plan& p) {
        using T = decltype(tag);
        if constexpr (decltype(su)::value)
          if (p.direct)
            return launch(bwd_reduce_u_kernel<T>, p, in, as<T>(in->dout), in->u, in->mean,
                          in->rstd, out->dbeta_p, out->dgamma_p, p.geo);
        return launch(bwd_reduce_kernel<T, decltype(kc)::value, decltype(su)::value>, p, in,
                      as<T>(in->dout), as<T>(in->x), as<T>(in->weight), as<T>(in->bias), in->u,
                      in->mean, in->rstd, out->dbeta_p, out->dgamma_p,
                      in_affine_of(s, in, nullptr), p.geo);
      });
}

CMX_API int32_t cmx_bwd_main(const cmx_shape* s, const cmx_inputs* in, const cmx_outputs* out) {
  if (!in || !out) return fail(CMX_E_INVALID, "inputs or outputs is NULL");
  if (s && s->n > 0) {  // (an empty batch launches nothing and needs no pointers)
    if (in->batch_stats)
      for (auto [ptr, name] : {std::pair<const void*, const char*>{in->dbeta, "dbeta"},
                               {in->dgamma, "dgamma"}})
        if (int32_t e = need(ptr, name)) return e;
    if (s->has_in_affine)
      for (auto [ptr, name] : {std::pair<const void*, const char*>{out->dscale_p, "dscale_p"},
                               {out->dshift_p, "dshift_p"}})
        if (int32_t e = need(ptr, name)) return e;
  }
  return run_pass<kB2>(
      s, in, in->u, {in->x, in->dout, out->y, out->du},
      {{in->x, "x"}, {in->dout, "dout"}, {in->weight, "weight"}, {in->bias, "bias"},
       {in->mean, "mean"}, {in->rstd, "rstd"}, {in->gamma, "gamma"}, {out->y, "dx"},
       {out->dw_p, "dw_p"}, {out->db_p, "db_p"}},
      "bwd_main_kernel", [&](auto tag, auto kc, auto su, const Plan& p) {
        using T = decltype(tag);
        if constexpr (!std::is_same_v<T, float> && decltype(su)::value)
          if (p.mma) {
            constexpr int KT = decltype(kc)::value;
            const bool bs = in->batch_stats != 0;
            if (p.du) {  // du_kernel: the same grid and blocks, no shared memory
              Plan pd = p;
              pd.smem = 0;
              if (cmx_error_t e = launch(du_kernel<T>, pd, in, as<T>(in->dout), in->u,
                                         in->mean, in->rstd, in->gamma, in->dbeta, in->dgamma,
                                         bs, out->du, p.geo))
                return e;
            }
            const bool aff = s->has_in_affine != 0;
            auto kernel = p.du ? (aff ? bwd_mma_kernel<T, KT, true, true>
                                      : bwd_mma_kernel<T, KT, true, false>)
                               : (aff ? bwd_mma_kernel<T, KT, false, true>
                                      : bwd_mma_kernel<T, KT, false, false>);
            return launch(kernel, p, in, as<T>(in->dout), as<T>(in->x), as<T>(in->weight),
                          in->u, p.du ? out->du : nullptr, in->mean, in->rstd, in->gamma,
                          in->dbeta, in->dgamma, bs, static_cast<T*>(out->y), out->dw_p,
                          out->db_p, in_affine_of(s, in, out), p.geo);
          }
        return launch(bwd_main_kernel<T, decltype(kc)::value, decltype(su)::value>, p, in,
                      as<T>(in->dout), as<T>(in->x), as<T>(in->weight), as<T>(in->bias), in->u,
                      in->mean, in->rstd, in->gamma, in->dbeta, in->dgamma,
                      in->batch_stats != 0, static_cast<T*>(out->y), out->dw_p, out->db_p,
                      in_affine_of(s, in, out), p.geo);
      },
      out->du);
}

CMX_API int64_t cmx_index_probe(const int64_t* strides, int64_t n, int64_t c, int64_t h,
                                int64_t w) {
  Geom geo{};
  geo.sN = strides[0];
  geo.sC = strides[1];
  geo.sH = strides[2];
  geo.sW = strides[3];
  return offset_of(geo, plane_base(geo, static_cast<int>(n), static_cast<int>(c)),
                   static_cast<int>(h), static_cast<int>(w));
}

CMX_API int32_t cmx_mma_probe(int32_t dtype, const uint32_t* regs, float* d) {
#ifdef CMX_HOST_EMULATION
  if (!regs || !d) return fail(CMX_E_INVALID, "regs or d is NULL");
  cmx_error_t e = cmx_success;
  if (dtype == CMX_FLOAT16)
    e = cmx_launch(mma_probe_kernel<cmx_half>, dim3(1), dim3(32), 0, nullptr, regs, d);
  else if (dtype == CMX_BFLOAT16)
    e = cmx_launch(mma_probe_kernel<cmx_bf16>, dim3(1), dim3(32), 0, nullptr, regs, d);
  else
    return fail(CMX_E_INVALID, "the MMA takes float16 or bfloat16, got dtype id %d", dtype);
  return check_launch(e, "mma_probe_kernel");
#else
  (void)dtype;
  (void)regs;
  (void)d;
  return fail(CMX_E_INVALID, "the MMA probe exists in the emulation build only");
#endif
}

CMX_API int32_t cmx_prefetch_audit(int32_t on, int64_t* counts) {
#ifdef CMX_HOST_EMULATION
  auto& a = cmx_emu::g_audit;
  std::lock_guard<std::mutex> lock(a.m);
  if (on) {
    a.prefetched.clear();
    a.loaded.clear();
    a.prefetches = a.missed = 0;
    a.on = true;
    return CMX_OK;
  }
  if (!counts) return fail(CMX_E_INVALID, "counts is NULL");
  a.on = false;
  int64_t unused = 0;
  for (const auto& key : a.prefetched) unused += a.loaded.count(key) == 0;
  counts[0] = a.prefetches;
  counts[1] = a.missed;
  counts[2] = unused;
  return CMX_OK;
#else
  (void)on;
  (void)counts;
  return fail(CMX_E_INVALID, "the prefetch audit exists in the emulation build only");
#endif
}

}  // extern "C"
