// Host side of the kernel library: the C ABI of cmx_abi.h — argument checks, tiling, the
// dtype/kernel-size dispatch and the launches. No torch header: Python passes pointers,
// sizes, strides, the dtype and the stream (convmixer_ext/_cmx_lib.py, cuda_kernels.py).
//   nvcc build (convmixer_ext/_cmx_cuda.so): real launches on the caller's stream;
//   host build (convmixer_ext/_cmx_emu.so):  the same kernels run by the emulator in
//                                            cmx_device.h (CMX_HOST_EMULATION).
#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <type_traits>

#include "cmx_abi.h"
#include "fused_dw_kernels.cuh"

#ifndef CMX_ARCH_LIST
#define CMX_ARCH_LIST "unknown"
#endif
#define CMX_STR2(x) #x
#define CMX_STR(x) CMX_STR2(x)

namespace cmx {
namespace {

constexpr int64_t kMaxSmemBytes = 48 * 1024;  // without opting in to more per block
constexpr int64_t kMaxBlocks = 2147483647;    // gridDim.x limit (1-D grid)

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
  return fail(CMX_E_CUDA, "%s: emulated launch failed (%d)", what, e);
#else
  return fail(CMX_E_CUDA, "%s: %s", what, cudaGetErrorString(e));
#endif
}

// Everything a launch needs, derived from the shape alone.
struct Plan {
  Geom geo;
  int64_t rows, blocks;
  size_t smem_fwd, smem_bwd;
};

size_t fwd_smem(const Geom& geo, int KT) {
  return FwdSmem(geo.K, KT, geo.TH, geo.TW).total(geo.K, geo.TH) * sizeof(float);
}
size_t bwd_smem(const Geom& geo, int KT) {
  return BwdSmem(geo.K, KT, geo.TH, geo.TW).total(geo.K) * sizeof(float);
}

// The unrolled kernel sizes; others run the generic (run-time k) instantiation.
int unrolled(int K) { return (K == 3 || K == 5 || K == 7 || K == 9) ? K : 0; }

int32_t make_plan(const cmx_shape* s, Plan& p) {
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
  Geom& g = p.geo;
  g.C = static_cast<int>(s->c);
  g.H = static_cast<int>(s->h);
  g.W = static_cast<int>(s->w);
  g.K = s->k;
  g.PB = (s->k - 1) / 2;  // PyTorch "same" (semantics.pad_before)
  const int tdim = s->k > 15 ? 16 : 32;  // large k: smaller tiles keep the halo in 48 KB
  g.TH = std::min(g.H, tdim);
  g.TW = std::min(g.W, tdim);
  g.tiles_w = (g.W + g.TW - 1) / g.TW;
  g.tiles_per_img = ((g.H + g.TH - 1) / g.TH) * g.tiles_w;
  g.act = s->act;
  const int64_t positions = s->n * s->h * s->w;
  g.inv_n = positions > 0 ? 1.f / static_cast<float>(positions) : 0.f;
  g.sN = s->stride[0];
  g.sC = s->stride[1];
  g.sH = s->stride[2];
  g.sW = s->stride[3];
  p.rows = s->n * g.tiles_per_img;
  p.blocks = p.rows * s->c;
  if (p.blocks > kMaxBlocks)
    return fail(CMX_E_LIMIT,
                "x of shape [%lld, %lld, %lld, %lld] needs %lld blocks, more than the CUDA grid "
                "limit of %lld",
                (long long)s->n, (long long)s->c, (long long)s->h, (long long)s->w,
                (long long)p.blocks, (long long)kMaxBlocks);
  const int KT = unrolled(g.K);
  p.smem_fwd = fwd_smem(g, KT);
  p.smem_bwd = bwd_smem(g, KT);
  if (static_cast<int64_t>(std::max(p.smem_fwd, p.smem_bwd)) > kMaxSmemBytes)
    return fail(CMX_E_LIMIT, "a tile needs %zu bytes of shared memory (limit %lld)",
                std::max(p.smem_fwd, p.smem_bwd), (long long)kMaxSmemBytes);
  return CMX_OK;
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

// f(T{}, std::integral_constant<int, KT>{}) for the shape's dtype and kernel size.
template <class F>
void dispatch(const cmx_shape* s, F&& f) {
  auto with_k = [&](auto tag) {
    switch (unrolled(s->k)) {
      case 3: f(tag, std::integral_constant<int, 3>{}); break;
      case 5: f(tag, std::integral_constant<int, 5>{}); break;
      case 7: f(tag, std::integral_constant<int, 7>{}); break;
      case 9: f(tag, std::integral_constant<int, 9>{}); break;
      default: f(tag, std::integral_constant<int, 0>{}); break;
    }
  };
  switch (s->dtype) {
    case CMX_FLOAT32: with_k(float{}); break;
    case CMX_FLOAT16: with_k(cmx_half{}); break;
    default: with_k(cmx_bf16{}); break;  // make_plan accepted only these three
  }
}

template <class T>
const T* as(const void* p) {
  return static_cast<const T*>(p);
}

cudaStream_t stream_of(const cmx_inputs* in) { return reinterpret_cast<cudaStream_t>(in->stream); }

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
  const cudaError_t e = cudaFuncGetAttributes(&attr, stats_kernel<float, 3>);
  cudaGetLastError();
  cudaSetDevice(prev);
  if (e != cudaSuccess)
    return fail(CMX_E_NO_DEVICE, "no kernel image for device %d in this build (%s; built for %s)",
                device, cudaGetErrorString(e), CMX_ARCH_LIST);
  return CMX_OK;
#endif
}

CMX_API int32_t cmx_make_plan(const cmx_shape* shape, cmx_plan* plan) {
  Plan p;
  if (int32_t e = make_plan(shape, p)) return e;
  if (!plan) return fail(CMX_E_INVALID, "plan is NULL");
  plan->partial_rows = p.rows;
  plan->blocks = p.blocks;
  plan->tile_h = p.geo.TH;
  plan->tile_w = p.geo.TW;
  plan->threads = kThreads;
  plan->smem_fwd = static_cast<int32_t>(p.smem_fwd);
  plan->smem_bwd = static_cast<int32_t>(p.smem_bwd);
  return CMX_OK;
}

CMX_API int32_t cmx_stats(const cmx_shape* s, const cmx_inputs* in, const cmx_outputs* out) {
  Plan p;
  if (int32_t e = make_plan(s, p)) return e;
  if (p.blocks == 0) return CMX_OK;
  for (auto [ptr, name] : {std::pair<const void*, const char*>{in->x, "x"}, {in->weight, "weight"},
                           {in->bias, "bias"}, {out->mean_p, "mean_p"}, {out->m2_p, "m2_p"},
                           {out->count_p, "count_p"}})
    if (int32_t e = need(ptr, name)) return e;
  if (int32_t e = check_in_affine(s, in)) return e;
  cmx_error_t err = cmx_success;
  dispatch(s, [&](auto tag, auto kc) {
    using T = decltype(tag);
    constexpr int KT = decltype(kc)::value;
    err = cmx_launch(stats_kernel<T, KT>, dim3(static_cast<unsigned>(p.blocks)), dim3(kThreads),
                     p.smem_fwd, stream_of(in), as<T>(in->x), as<T>(in->weight), as<T>(in->bias),
                     out->mean_p, out->m2_p, out->count_p, in_affine_of(s, in, nullptr), p.geo);
  });
  return check_launch(err, "stats_kernel");
}

CMX_API int32_t cmx_apply(const cmx_shape* s, const cmx_inputs* in, const cmx_outputs* out) {
  Plan p;
  if (int32_t e = make_plan(s, p)) return e;
  if (p.blocks == 0) return CMX_OK;
  for (auto [ptr, name] : {std::pair<const void*, const char*>{in->x, "x"}, {in->weight, "weight"},
                           {in->bias, "bias"}, {in->mean, "mean"}, {in->rstd, "rstd"},
                           {in->gamma, "gamma"}, {in->beta, "beta"}, {out->y, "out"}})
    if (int32_t e = need(ptr, name)) return e;
  if (int32_t e = check_in_affine(s, in)) return e;
  cmx_error_t err = cmx_success;
  dispatch(s, [&](auto tag, auto kc) {
    using T = decltype(tag);
    constexpr int KT = decltype(kc)::value;
    err = cmx_launch(apply_kernel<T, KT>, dim3(static_cast<unsigned>(p.blocks)), dim3(kThreads),
                     p.smem_fwd, stream_of(in), as<T>(in->x), as<T>(in->weight), as<T>(in->bias),
                     in->mean, in->rstd, in->gamma, in->beta, static_cast<T*>(out->y),
                     in_affine_of(s, in, nullptr), p.geo);
  });
  return check_launch(err, "apply_kernel");
}

CMX_API int32_t cmx_bwd_reduce(const cmx_shape* s, const cmx_inputs* in,
                               const cmx_outputs* out) {
  Plan p;
  if (int32_t e = make_plan(s, p)) return e;
  if (p.blocks == 0) return CMX_OK;
  for (auto [ptr, name] : {std::pair<const void*, const char*>{in->x, "x"}, {in->dout, "dout"},
                           {in->weight, "weight"}, {in->bias, "bias"}, {in->mean, "mean"},
                           {in->rstd, "rstd"}, {out->dbeta_p, "dbeta_p"},
                           {out->dgamma_p, "dgamma_p"}})
    if (int32_t e = need(ptr, name)) return e;
  if (int32_t e = check_in_affine(s, in)) return e;
  cmx_error_t err = cmx_success;
  dispatch(s, [&](auto tag, auto kc) {
    using T = decltype(tag);
    constexpr int KT = decltype(kc)::value;
    err = cmx_launch(bwd_reduce_kernel<T, KT>, dim3(static_cast<unsigned>(p.blocks)),
                     dim3(kThreads), p.smem_fwd, stream_of(in), as<T>(in->dout), as<T>(in->x),
                     as<T>(in->weight), as<T>(in->bias), in->mean, in->rstd, out->dbeta_p,
                     out->dgamma_p, in_affine_of(s, in, nullptr), p.geo);
  });
  return check_launch(err, "bwd_reduce_kernel");
}

CMX_API int32_t cmx_bwd_main(const cmx_shape* s, const cmx_inputs* in, const cmx_outputs* out) {
  Plan p;
  if (int32_t e = make_plan(s, p)) return e;
  if (p.blocks == 0) return CMX_OK;
  for (auto [ptr, name] : {std::pair<const void*, const char*>{in->x, "x"}, {in->dout, "dout"},
                           {in->weight, "weight"}, {in->bias, "bias"}, {in->mean, "mean"},
                           {in->rstd, "rstd"}, {in->gamma, "gamma"}, {out->y, "dx"},
                           {out->dw_p, "dw_p"}, {out->db_p, "db_p"}})
    if (int32_t e = need(ptr, name)) return e;
  if (in->batch_stats)
    for (auto [ptr, name] : {std::pair<const void*, const char*>{in->dbeta, "dbeta"},
                             {in->dgamma, "dgamma"}})
      if (int32_t e = need(ptr, name)) return e;
  if (int32_t e = check_in_affine(s, in)) return e;
  if (s->has_in_affine)
    for (auto [ptr, name] : {std::pair<const void*, const char*>{out->dscale_p, "dscale_p"},
                             {out->dshift_p, "dshift_p"}})
      if (int32_t e = need(ptr, name)) return e;
  cmx_error_t err = cmx_success;
  dispatch(s, [&](auto tag, auto kc) {
    using T = decltype(tag);
    constexpr int KT = decltype(kc)::value;
    err = cmx_launch(bwd_main_kernel<T, KT>, dim3(static_cast<unsigned>(p.blocks)),
                     dim3(kThreads), p.smem_bwd, stream_of(in), as<T>(in->dout), as<T>(in->x),
                     as<T>(in->weight), as<T>(in->bias), in->mean, in->rstd, in->gamma,
                     in->dbeta, in->dgamma, in->batch_stats != 0, static_cast<T*>(out->y),
                     out->dw_p, out->db_p, in_affine_of(s, in, out), p.geo);
  });
  return check_launch(err, "bwd_main_kernel");
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

}  // extern "C"
