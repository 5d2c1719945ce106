// Portability layer: the same kernel source compiles with nvcc (real CUDA) and with a host
// C++20 compiler (CMX_HOST_EMULATION), where it runs on the CPU under a small emulator:
//
//  - every CUDA thread of a block is a std::thread; the grid's blocks run one after another
//    on the same set of threads (a pool kept for the whole launch);
//  - __syncthreads() is a std::barrier among the block's threads;
//  - __shared__ variables are function-local statics (one block at a time, so one copy is
//    enough); dynamic shared memory is a buffer owned by the launcher;
//  - __shfl_xor_sync is an exchange through a per-block buffer between two block-wide
//    barriers, so every thread of the block must reach it together (true where the
//    kernels use it: block-level reductions called by all threads);
//  - the tensor-core MMA (cmx_mma_16816) is the same kind of exchange: every lane posts its
//    A and B fragment registers, and each computes its accumulator elements from its warp's
//    fragments as the PTX ISA lays them out (mma.m16n8k16 .row.col, 16-bit inputs, fp32
//    accumulators), products exact and summed in fp32;
//  - cp.async copies (cmx_cp_async16) wait in their thread's committed groups until a
//    cmx_cp_async_wait lets them land, so a read before the wait sees the old bytes, and a
//    block left with copies pending fails the launch (the latest a GPU may land them; one
//    landing early, into a buffer other threads still read, is a race this cannot show);
//  - launches are serialised by a mutex (statics are process-wide);
//  - an L2 prefetch reads one byte of its address (so the address sanitizer checks it) and,
//    while an audit runs (cmx_prefetch_audit), is recorded per block with every staged
//    16-byte load: a load whose 128-byte line the block did not prefetch before, or a
//    prefetched line the block never loads, is counted.
//
// What emulation proves: arithmetic, indexing, shared-memory use and barrier placement (a
// missing barrier shows up as wrong results, a barrier not reached by every thread as a
// hang). What it cannot: timing, the GPU memory model (races that a barrier-per-phase
// schedule hides), warp-level divergence effects.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef CMX_HOST_EMULATION

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

using std::max;
using std::min;

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;  // written by the launcher before any thread starts
inline dim3 gridDim;

namespace cmx_emu {
inline std::barrier<>* g_barrier = nullptr;
inline std::vector<float> g_dyn_smem;
inline std::vector<float> g_shfl;  // one slot per thread of the block
inline std::vector<uint32_t> g_mma;  // cmx_mma_16816: 6 fragment registers per thread
inline std::mutex g_launch_mutex;

// cp.async (cmx_cp_async16): each thread's copies wait in its groups until a wait lets them
// land, as on the GPU, where a read before the wait may see the old bytes: here it always
// does, so a missing wait shows up as wrong results. Copies still pending when the thread
// leaves its block fail the launch (g_async_left).
struct AsyncCopy {
  void* dst;
  const void* src;
  bool valid;  // false: 16 zero bytes
};
inline thread_local std::vector<AsyncCopy> t_async_open;
inline thread_local std::vector<std::vector<AsyncCopy>> t_async_groups;
inline std::atomic<bool> g_async_left{false};

// The prefetch audit: (block, 128-byte line) pairs prefetched and loaded, and the loads that
// found their line not prefetched yet.
struct PrefetchAudit {
  std::atomic<bool> on{false};
  std::mutex m;
  std::set<std::pair<unsigned, uintptr_t>> prefetched, loaded;
  int64_t prefetches = 0, missed = 0;
};
inline PrefetchAudit g_audit;

// The sanitizer tier's planted bug (tests/asan.sh): with CMX_TEST_PLANT_MISALIGNMENT=1 in the
// environment the planner takes the 16-byte path on misaligned pointers too, which the
// undefined-behaviour sanitizer must report. Emulation builds only; read once.
inline bool planted_misalignment() {
  static const bool on = [] {
    const char* v = std::getenv("CMX_TEST_PLANT_MISALIGNMENT");
    return v && v[0] == '1' && v[1] == 0;
  }();
  return on;
}
}  // namespace cmx_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __maxnreg__(...)
#define __shared__ static
#define CMX_UNROLL
#define CMX_NO_UNROLL

inline void __syncthreads() { cmx_emu::g_barrier->arrive_and_wait(); }

inline unsigned cmx_linear_tid() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// v of lane (lane ^ lane_mask) of the same 32-thread warp.
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask, int width = 32) {
  const unsigned t = cmx_linear_tid();
  cmx_emu::g_shfl[t] = v;
  __syncthreads();
  const unsigned src = (t & ~static_cast<unsigned>(width - 1)) |
                       ((t & static_cast<unsigned>(width - 1)) ^ static_cast<unsigned>(lane_mask));
  const float r = cmx_emu::g_shfl[src];
  __syncthreads();
  return r;
}

#define CMX_DYN_SMEM(name) float* name = cmx_emu::g_dyn_smem.data()

inline void cmx_prefetch_l2(const void* p) {
  (void)*static_cast<const volatile unsigned char*>(p);
  auto& a = cmx_emu::g_audit;
  if (!a.on.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lock(a.m);
  ++a.prefetches;
  a.prefetched.emplace(blockIdx.x, reinterpret_cast<uintptr_t>(p) >> 7);
}

inline void cmx_note_staged_load(const void* p) {
  auto& a = cmx_emu::g_audit;
  if (!a.on.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lock(a.m);
  const std::pair<unsigned, uintptr_t> key(blockIdx.x, reinterpret_cast<uintptr_t>(p) >> 7);
  if (!a.prefetched.count(key)) ++a.missed;
  a.loaded.insert(key);
}

// A 16-byte global -> shared copy that does not wait (valid == false: 16 zero bytes); it lands
// at a cmx_cp_async_wait<n>() that leaves at most n later committed groups in flight.
inline void cmx_cp_async16(void* dst, const void* src, bool valid) {
  cmx_emu::t_async_open.push_back({dst, src, valid});
}
inline void cmx_cp_async_commit() {
  cmx_emu::t_async_groups.push_back(std::move(cmx_emu::t_async_open));
  cmx_emu::t_async_open.clear();
}
template <int N>
inline void cmx_cp_async_wait() {
  auto& groups = cmx_emu::t_async_groups;
  while (groups.size() > static_cast<size_t>(N)) {
    for (const auto& c : groups.front()) {
      if (c.valid)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    groups.erase(groups.begin());
  }
}

struct alignas(16) float4 {
  float x, y, z, w;
};

// 16-bit float storage types with IEEE round-to-nearest-even conversions (the same results
// as PyTorch's Half and BFloat16; NaN stays NaN).
struct cmx_half {
  uint16_t bits;
};
struct cmx_bf16 {
  uint16_t bits;
};

inline float cmx_bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t cmx_float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float cmx_to_float(cmx_half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  float mag;
  if (e == 0)
    mag = std::ldexp(static_cast<float>(m), -24);
  else if (e == 31)
    mag = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else
    mag = std::ldexp(static_cast<float>(m | 0x400u), static_cast<int>(e) - 25);
  return cmx_bits_to_float(cmx_float_to_bits(mag) | sign);
}

inline cmx_half cmx_from_float(float f, cmx_half) {
  const uint32_t x = cmx_float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return {static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (ax >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (ax < 0x38800000u) {  // half subnormal (unit 2^-24): round |f| * 2^24 to nearest even
    const float units = std::nearbyint(cmx_bits_to_float(ax) * 16777216.0f);
    return {static_cast<uint16_t>(sign | static_cast<uint32_t>(units))};
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias the exponent (-112), round to nearest even
  return {static_cast<uint16_t>(sign | (ax >> 13))};
}

inline float cmx_to_float(cmx_bf16 h) { return cmx_bits_to_float(static_cast<uint32_t>(h.bits) << 16); }

inline cmx_bf16 cmx_from_float(float f, cmx_bf16) {
  const uint32_t x = cmx_float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((x >> 16) | 0x40u)};  // NaN
  return {static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

inline uint16_t cmx_bits(cmx_half h) { return h.bits; }
inline uint16_t cmx_bits(cmx_bf16 h) { return h.bits; }

// Two 16-bit elements at p (4-byte aligned) as one register, the first in the low half.
template <typename T>
inline uint32_t cmx_ld_pair(const T* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// d += A B for one warp's 16 x 16 A (row-major) and 16 x 8 B (column-major) of 16-bit T,
// in the fragment layout of PTX's mma.sync.m16n8k16 (lane = 4 g + t): a[0] = A[g][2t, 2t+1],
// a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9];
// b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]; d = D[g][2t, 2t+1], D[g+8][2t, 2t+1]
// (the lower-indexed element of a pair in the low 16 bits). Every thread of the block
// reaches it together (two barriers, as __shfl_xor_sync).
template <typename T>
inline void cmx_mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], T) {
  const unsigned tid = cmx_linear_tid();
  uint32_t* slot = &cmx_emu::g_mma[size_t{tid} * 6];
  for (int i = 0; i < 4; ++i) slot[i] = a[i];
  slot[4] = b[0];
  slot[5] = b[1];
  __syncthreads();
  const unsigned warp0 = tid & ~31u, g = (tid & 31u) >> 2, t = tid & 3u;
  auto half = [](uint32_t reg, int k) {
    T h;
    h.bits = static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xffffu);
    return cmx_to_float(h);
  };
  auto A = [&](int r, int k) {  // lane 4 (r mod 8) + (k mod 8) / 2, register r / 8 + 2 (k / 8)
    const unsigned lane = warp0 + 4 * (r % 8) + (k % 8) / 2;
    return half(cmx_emu::g_mma[size_t{lane} * 6 + r / 8 + 2 * (k / 8)], k);
  };
  auto B = [&](int k, int n) {  // lane 4 n + (k mod 8) / 2, register 4 + k / 8
    const unsigned lane = warp0 + 4 * n + (k % 8) / 2;
    return half(cmx_emu::g_mma[size_t{lane} * 6 + 4 + k / 8], k);
  };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int r = static_cast<int>(g) + 8 * (e / 2), n = static_cast<int>(2 * t) + e % 2;
    float s = d[e];
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    out[e] = s;
  }
  __syncthreads();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// 2^x with results below the normal range flushed to zero (the GPU's ex2.approx.ftz).
inline float cmx_exp2(float v) {
  const float r = std::exp2(v);
  return r < std::numeric_limits<float>::min() ? 0.f : r;
}

using cmx_error_t = int;
constexpr cmx_error_t cmx_success = 0;
constexpr cmx_error_t kCmxAsyncLeft = 2;  // a thread left its block with cp.async copies pending

// Runs kernel(args...) over the grid: one host thread per CUDA thread, blocks in order,
// a barrier after each block so no thread starts the next block while another is
// still in this one (shared memory is reused).
template <class Kernel, class... Args>
cmx_error_t cmx_launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                       Args... args) {
  std::lock_guard<std::mutex> lock(cmx_emu::g_launch_mutex);
  const unsigned nthreads = block.x * block.y * block.z;
  blockDim = block;
  gridDim = grid;
  cmx_emu::g_dyn_smem.assign(smem_bytes / sizeof(float), 0.f);  // exact: ASan sees overflows
  cmx_emu::g_shfl.assign(nthreads, 0.f);
  cmx_emu::g_mma.assign(size_t{nthreads} * 6, 0u);
  std::barrier<> bar(nthreads);
  cmx_emu::g_barrier = &bar;
  std::vector<std::thread> pool;
  pool.reserve(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            kernel(args...);
            if (!cmx_emu::t_async_open.empty() || !cmx_emu::t_async_groups.empty()) {
              cmx_emu::g_async_left = true;  // copies never waited for: a kernel bug
              cmx_emu::t_async_open.clear();
              cmx_emu::t_async_groups.clear();
            }
            bar.arrive_and_wait();
          }
    });
  }
  for (auto& th : pool) th.join();
  cmx_emu::g_barrier = nullptr;
  return cmx_emu::g_async_left.exchange(false) ? kCmxAsyncLeft : cmx_success;
}

#else  // real CUDA

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define CMX_UNROLL _Pragma("unroll")
#define CMX_NO_UNROLL _Pragma("unroll 1")

// A hint: the 128-byte line of p is fetched into L2 (no register, no wait; SASS CCTL.E.PF2).
__device__ __forceinline__ void cmx_prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global(p)));
}
__device__ __forceinline__ void cmx_note_staged_load(const void*) {}

// cp.async.cg (sm_80+): 16 bytes global -> shared without a register or a wait (SASS LDGSTS);
// valid == false: 16 zero bytes (src-size 0, nothing read). A commit closes this thread's
// group; cmx_cp_async_wait<n>() waits until at most n of its later groups are in flight (a
// barrier must follow before other threads read what landed).
__device__ __forceinline__ void cmx_cp_async16(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cmx_cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cmx_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}
#define CMX_DYN_SMEM(name)                                   \
  extern __shared__ __align__(16) float cmx_dyn_smem_raw[]; \
  float* name = cmx_dyn_smem_raw

using cmx_half = __half;
using cmx_bf16 = __nv_bfloat16;
__host__ __device__ __forceinline__ float cmx_to_float(cmx_half h) { return __half2float(h); }
__host__ __device__ __forceinline__ float cmx_to_float(cmx_bf16 h) { return __bfloat162float(h); }
__host__ __device__ __forceinline__ cmx_half cmx_from_float(float f, cmx_half) {
  return __float2half_rn(f);
}
__host__ __device__ __forceinline__ cmx_bf16 cmx_from_float(float f, cmx_bf16) {
  return __float2bfloat16_rn(f);
}

__device__ __forceinline__ uint16_t cmx_bits(cmx_half h) { return __half_as_ushort(h); }
__device__ __forceinline__ uint16_t cmx_bits(cmx_bf16 h) { return __bfloat16_as_ushort(h); }

template <typename T>
__device__ __forceinline__ uint32_t cmx_ld_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// d += A B on tensor cores (the emulation build's cmx_mma_16816 documents the fragments);
// TY: the PTX type of the 16-bit inputs.
#define CMX_MMA_16816(TY)                                                                  \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY                          \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"       \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
__device__ __forceinline__ void cmx_mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                              const uint32_t (&b)[2], cmx_bf16) {
  CMX_MMA_16816("bf16");
}
__device__ __forceinline__ void cmx_mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                              const uint32_t (&b)[2], cmx_half) {
  CMX_MMA_16816("f16");
}
#undef CMX_MMA_16816

// 2^x in one MUFU.EX2 (2 ulp; results below the normal range flushed to zero): exp2f's
// range handling around it costs three more instructions.
__device__ __forceinline__ float cmx_exp2(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

using cmx_error_t = cudaError_t;
constexpr cmx_error_t cmx_success = cudaSuccess;

// Launches on `stream` and returns the launch error (the caller turns it into a message).
template <class Kernel, class... Args>
cmx_error_t cmx_launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes,
                       cudaStream_t stream, Args... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}

#endif

// float32 is its own storage type.
__host__ __device__ __forceinline__ float cmx_to_float(float v) { return v; }
__host__ __device__ __forceinline__ float cmx_from_float(float f, float) { return f; }
