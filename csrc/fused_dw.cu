// Host side of the fused depthwise block: input checks, tiling, dtype/kernel-size dispatch
// and the op registrations. The op schemas are defined once, in Python
// (convmixer_ext/_extension.py); this file only registers implementations:
//   nvcc build (convmixer_ext._C):      dispatch key CUDA, real launches;
//   host build (convmixer_ext._C_emu):  dispatch key CPU, the same kernels run by the
//                                       emulator in cmx_device.h (CMX_HOST_EMULATION).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#ifdef CMX_HOST_EMULATION
#define CMX_DISPATCH_KEY CPU
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define CMX_DISPATCH_KEY CUDA
#endif

#include "fused_dw_kernels.cuh"

namespace cmx {
namespace {

constexpr size_t kMaxSmemBytes = 48 * 1024;

cudaStream_t current_stream() {
#ifdef CMX_HOST_EMULATION
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream().stream();
#endif
}

#ifdef CMX_HOST_EMULATION
#define CMX_DEVICE_GUARD(t) (void)(t)
#else
#define CMX_DEVICE_GUARD(t) const c10::cuda::CUDAGuard cmx_guard((t).device())
#endif

void check_x(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  TORCH_CHECK(x.dim() == 4, "convmixer_ext: x must be 4-D [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "convmixer_ext: x must be contiguous NCHW or channels_last, got strides ",
              x.strides());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "convmixer_ext: x must be float32, float16 or bfloat16, got ", st);
  const int64_t C = x.size(1);
  TORCH_CHECK(w.dim() == 4 && w.size(0) == C && w.size(1) == 1 && w.size(2) == w.size(3),
              "convmixer_ext: weight must have shape (", C, ", 1, k, k), got ", w.sizes());
  TORCH_CHECK(w.size(2) >= 1 && w.size(2) <= kMaxK, "convmixer_ext: kernel size must be in [1, ",
              kMaxK, "], got ", w.size(2));
  TORCH_CHECK(b.dim() == 1 && b.size(0) == C, "convmixer_ext: bias must have shape (", C,
              "), got ", b.sizes());
  TORCH_CHECK(w.scalar_type() == st && b.scalar_type() == st,
              "convmixer_ext: weight and bias must have the dtype of x (", st, ")");
  TORCH_CHECK(w.device() == x.device() && b.device() == x.device(),
              "convmixer_ext: x, weight and bias must be on the same device");
  TORCH_CHECK(C <= 65535 && x.size(0) <= 65535,
              "convmixer_ext: C and N must be at most 65535, got ", x.sizes());
}

void check_same_layout(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.strides() == x.strides() &&
                  t.scalar_type() == x.scalar_type() && t.device() == x.device(),
              "convmixer_ext: ", name, " must have the shape, strides, dtype and device of x");
}

void check_vec(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && t.scalar_type() == at::kFloat &&
                  t.is_contiguous() && t.device() == x.device(),
              "convmixer_ext: ", name, " must be a contiguous float32 vector of length C=",
              x.size(1), " on x's device");
}

using OptTensor = std::optional<at::Tensor>;

// The folded affine (both vectors or neither); da_p/dc_p are set by k_bwd_main.
Pre make_pre(const OptTensor& pre_a, const OptTensor& pre_c, const at::Tensor& x) {
  TORCH_CHECK(pre_a.has_value() == pre_c.has_value(),
              "convmixer_ext: pre_a and pre_c must both be given or both be None");
  Pre p{nullptr, nullptr, nullptr, nullptr};
  if (pre_a.has_value()) {
    check_vec(*pre_a, x, "pre_a");
    check_vec(*pre_c, x, "pre_c");
    p.a = pre_a->data_ptr<float>();
    p.c = pre_c->data_ptr<float>();
  }
  return p;
}

Geom make_geom(const at::Tensor& x, int64_t K, int64_t act) {
  Geom g;
  g.C = static_cast<int>(x.size(1));
  g.H = static_cast<int>(x.size(2));
  g.W = static_cast<int>(x.size(3));
  g.K = static_cast<int>(K);
  g.PB = static_cast<int>((K - 1) / 2);  // PyTorch "same" (semantics.pad_before)
  const int tdim = K > 15 ? 16 : 32;    // large k: smaller tiles keep the halo in 48 KB
  g.TH = std::min(g.H, tdim);
  g.TW = std::min(g.W, tdim);
  g.tiles_w = (g.W + g.TW - 1) / g.TW;
  g.tiles_per_img = ((g.H + g.TH - 1) / g.TH) * g.tiles_w;
  TORCH_CHECK(act >= 0 && act <= 2, "convmixer_ext: unknown activation id ", act);
  g.act = static_cast<int>(act);
  g.inv_n = 1.f / static_cast<float>(x.size(0) * x.size(2) * x.size(3));
  g.sN = x.stride(0);
  g.sC = x.stride(1);
  g.sH = x.stride(2);
  g.sW = x.stride(3);
  return g;
}

int64_t num_tiles(const at::Tensor& x, const Geom& g) { return x.size(0) * g.tiles_per_img; }

dim3 grid_of(const at::Tensor& x, const Geom& g) {
  return dim3(static_cast<unsigned>(g.tiles_per_img), static_cast<unsigned>(g.C),
              static_cast<unsigned>(x.size(0)));
}

size_t checked_smem(size_t floats) {
  const size_t bytes = floats * sizeof(float);
  TORCH_CHECK(bytes <= kMaxSmemBytes, "convmixer_ext: tile needs ", bytes,
              " bytes of shared memory (limit ", kMaxSmemBytes, ")");
  return bytes;
}

// f(T{}, std::integral_constant<int, KT>{}) for x's dtype and kernel size K.
template <class F>
void dispatch(const at::Tensor& x, int64_t K, F&& f) {
  auto with_k = [&](auto tag) {
    switch (K) {
      case 3: f(tag, std::integral_constant<int, 3>{}); break;
      case 5: f(tag, std::integral_constant<int, 5>{}); break;
      case 7: f(tag, std::integral_constant<int, 7>{}); break;
      case 9: f(tag, std::integral_constant<int, 9>{}); break;
      default: f(tag, std::integral_constant<int, 0>{}); break;
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: with_k(float{}); break;
    case at::kHalf: with_k(at::Half{}); break;
    case at::kBFloat16: with_k(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "convmixer_ext: unsupported dtype ", x.scalar_type());
  }
}

at::Tensor f32(const at::Tensor& x, int64_t rows, int64_t cols) {
  return at::zeros({rows, cols}, x.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> k_stats(const at::Tensor& x, const at::Tensor& w,
                                                       const at::Tensor& b,
                                                       const OptTensor& pre_a,
                                                       const OptTensor& pre_c, int64_t act) {
  check_x(x, w, b);
  const Pre pre = make_pre(pre_a, pre_c, x);
  CMX_DEVICE_GUARD(x);
  const int64_t K = w.size(2);
  const Geom g = make_geom(x, K, act);
  const int64_t T = num_tiles(x, g);
  at::Tensor mean_p = f32(x, T, g.C), m2_p = f32(x, T, g.C);
  // valid positions per partial row (edge tiles are smaller)
  at::Tensor cnt = at::empty({T}, at::TensorOptions().dtype(at::kFloat));
  float* cp = cnt.data_ptr<float>();
  for (int64_t r = 0; r < T; ++r) {
    const int ti = static_cast<int>(r % g.tiles_per_img);
    const int h0 = (ti / g.tiles_w) * g.TH, w0 = (ti % g.tiles_w) * g.TW;
    cp[r] = static_cast<float>(std::min(g.TH, g.H - h0) * std::min(g.TW, g.W - w0));
  }
  if (T == 0) return {mean_p, m2_p, cnt.to(x.device())};
  const at::Tensor wc = w.contiguous();
  dispatch(x, K, [&](auto tag, auto kc) {
    using T_ = decltype(tag);
    constexpr int KT = decltype(kc)::value;
    const size_t smem = checked_smem(FwdSmem(g.K, KT, g.TH, g.TW).total(g.K, g.TH));
    cmx_launch(stats_kernel<T_, KT>, grid_of(x, g), dim3(kThreads), smem, current_stream(),
               x.data_ptr<T_>(), wc.data_ptr<T_>(), b.data_ptr<T_>(), mean_p.data_ptr<float>(),
               m2_p.data_ptr<float>(), pre, g);
  });
  return {mean_p, m2_p, cnt.to(x.device())};
}

at::Tensor k_apply(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                   const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& gamma,
                   const at::Tensor& beta, const OptTensor& pre_a, const OptTensor& pre_c,
                   int64_t act) {
  check_x(x, w, b);
  const Pre pre = make_pre(pre_a, pre_c, x);
  check_vec(mean, x, "mean");
  check_vec(rstd, x, "rstd");
  check_vec(gamma, x, "gamma");
  check_vec(beta, x, "beta");
  CMX_DEVICE_GUARD(x);
  const int64_t K = w.size(2);
  const Geom g = make_geom(x, K, act);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor wc = w.contiguous();
  dispatch(x, K, [&](auto tag, auto kc) {
    using T_ = decltype(tag);
    constexpr int KT = decltype(kc)::value;
    const size_t smem = checked_smem(FwdSmem(g.K, KT, g.TH, g.TW).total(g.K, g.TH));
    cmx_launch(apply_kernel<T_, KT>, grid_of(x, g), dim3(kThreads), smem, current_stream(),
               x.data_ptr<T_>(), wc.data_ptr<T_>(), b.data_ptr<T_>(), mean.data_ptr<float>(),
               rstd.data_ptr<float>(), gamma.data_ptr<float>(), beta.data_ptr<float>(),
               out.data_ptr<T_>(), pre, g);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> k_bwd_reduce(const at::Tensor& dout, const at::Tensor& x,
                                                const at::Tensor& w, const at::Tensor& b,
                                                const at::Tensor& mean, const at::Tensor& rstd,
                                                const OptTensor& pre_a, const OptTensor& pre_c,
                                                int64_t act) {
  check_x(x, w, b);
  const Pre pre = make_pre(pre_a, pre_c, x);
  check_same_layout(dout, x, "dout");
  check_vec(mean, x, "mean");
  check_vec(rstd, x, "rstd");
  CMX_DEVICE_GUARD(x);
  const int64_t K = w.size(2);
  const Geom g = make_geom(x, K, act);
  const int64_t T = num_tiles(x, g);
  at::Tensor dbeta_p = f32(x, T, g.C), dgamma_p = f32(x, T, g.C);
  if (T == 0) return {dbeta_p, dgamma_p};
  const at::Tensor wc = w.contiguous();
  dispatch(x, K, [&](auto tag, auto kc) {
    using T_ = decltype(tag);
    constexpr int KT = decltype(kc)::value;
    const size_t smem = checked_smem(FwdSmem(g.K, KT, g.TH, g.TW).total(g.K, g.TH));
    cmx_launch(bwd_reduce_kernel<T_, KT>, grid_of(x, g), dim3(kThreads), smem,
               current_stream(), dout.data_ptr<T_>(), x.data_ptr<T_>(), wc.data_ptr<T_>(),
               b.data_ptr<T_>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
               dbeta_p.data_ptr<float>(), dgamma_p.data_ptr<float>(), pre, g);
  });
  return {dbeta_p, dgamma_p};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> k_bwd_main(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& gamma,
    const at::Tensor& dbeta, const at::Tensor& dgamma, bool batch_stats,
    const OptTensor& pre_a, const OptTensor& pre_c, int64_t act) {
  check_x(x, w, b);
  Pre pre = make_pre(pre_a, pre_c, x);
  check_same_layout(dout, x, "dout");
  check_vec(mean, x, "mean");
  check_vec(rstd, x, "rstd");
  check_vec(gamma, x, "gamma");
  check_vec(dbeta, x, "dbeta");
  check_vec(dgamma, x, "dgamma");
  CMX_DEVICE_GUARD(x);
  const int64_t K = w.size(2);
  const Geom g = make_geom(x, K, act);
  const int64_t T = num_tiles(x, g);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw_p = at::zeros({T, g.C, K * K}, x.options().dtype(at::kFloat));
  at::Tensor db_p = f32(x, T, g.C);
  at::Tensor da_p = f32(x, pre.a ? T : 0, g.C), dc_p = f32(x, pre.a ? T : 0, g.C);
  if (pre.a) {
    pre.da_p = da_p.data_ptr<float>();
    pre.dc_p = dc_p.data_ptr<float>();
  }
  if (T == 0) return {dx, dw_p, db_p, da_p, dc_p};
  const at::Tensor wc = w.contiguous();
  dispatch(x, K, [&](auto tag, auto kc) {
    using T_ = decltype(tag);
    constexpr int KT = decltype(kc)::value;
    const size_t smem = checked_smem(BwdSmem(g.K, KT, g.TH, g.TW).total(g.K));
    cmx_launch(bwd_main_kernel<T_, KT>, grid_of(x, g), dim3(kThreads), smem, current_stream(),
               dout.data_ptr<T_>(), x.data_ptr<T_>(), wc.data_ptr<T_>(), b.data_ptr<T_>(),
               mean.data_ptr<float>(), rstd.data_ptr<float>(), gamma.data_ptr<float>(),
               dbeta.data_ptr<float>(), dgamma.data_ptr<float>(), batch_stats,
               dx.data_ptr<T_>(), dw_p.data_ptr<float>(), db_p.data_ptr<float>(), pre, g);
  });
  return {dx, dw_p, db_p, da_p, dc_p};
}

#ifdef CMX_HOST_EMULATION
// Test hook (emulation build only): the kernels' offset of element (n, c, h, w) for the given
// strides, through the very helpers the kernels use.
int64_t k_index_probe(at::IntArrayRef strides, int64_t n, int64_t c, int64_t h, int64_t w) {
  TORCH_CHECK(strides.size() == 4, "k_index_probe: 4 strides expected");
  Geom g{};
  g.sN = strides[0];
  g.sC = strides[1];
  g.sH = strides[2];
  g.sW = strides[3];
  return offset_of(g, plane_base(g, static_cast<int>(n), static_cast<int>(c)),
                   static_cast<int>(h), static_cast<int>(w));
}
#endif

}  // namespace
}  // namespace cmx

TORCH_LIBRARY_IMPL(convmixer_ext, CMX_DISPATCH_KEY, m) {
  m.impl("k_stats", &cmx::k_stats);
  m.impl("k_apply", &cmx::k_apply);
  m.impl("k_bwd_reduce", &cmx::k_bwd_reduce);
  m.impl("k_bwd_main", &cmx::k_bwd_main);
}

#ifdef CMX_HOST_EMULATION
TORCH_LIBRARY_IMPL(convmixer_ext, CompositeExplicitAutograd, m) {
  m.impl("k_index_probe", &cmx::k_index_probe);
}
#endif
