/* The C ABI of the convmixer-ext kernel library (docs/DESIGN.md, "Build and ABI").
 *
 * The library (convmixer_ext/_cmx_cuda.so: nvcc; convmixer_ext/_cmx_emu.so: the same source
 * run by the host emulator) includes no torch header and links no torch library. Python passes
 * raw pointers, sizes, strides, the dtype and the stream through the plain-C structs below
 * (mirrored field by field by ctypes in convmixer_ext/_cmx_lib.py), so one build works with
 * every torch version. Every entry point returns 0 or a CMX_E* code; cmx_last_error() then
 * holds a message for the calling thread.
 *
 * Raising CMX_ABI_VERSION is required whenever a struct or signature below changes; the loader
 * refuses a library whose version differs from the one it was written for.
 */
#ifndef CMX_ABI_H_
#define CMX_ABI_H_

#include <stdint.h>

#define CMX_ABI_VERSION 9

/* cmx_shape.tensor_cores: the passes that may run on tensor cores */
#define CMX_TC_F2 1
#define CMX_TC_ALL 2       /* B2 in two launches where an image has several tiles: du
                            * element by element, then the MMAs */
#define CMX_TC_ALL_FUSED 3 /* B2 in one: each tile computes du on its halo */

#if defined(_WIN32)
#define CMX_API __declspec(dllexport)
#else
#define CMX_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes. */
enum {
  CMX_OK = 0,
  CMX_E_INVALID = 1,   /* an argument the kernels cannot take (a bug of the caller) */
  CMX_E_LIMIT = 2,     /* a hardware limit (grid, shared memory) the shape would exceed */
  CMX_E_CUDA = 3,      /* a CUDA runtime error (launch, device) */
  CMX_E_NO_DEVICE = 4  /* no usable CUDA device or driver */
};

/* Element types of x (and of weight, bias, out, dout, dx). */
enum { CMX_FLOAT32 = 0, CMX_FLOAT16 = 1, CMX_BFLOAT16 = 2 };

/* Activation ids. The Python side's source is convmixer_ext.semantics.ACTIVATIONS; the loader
 * compares it with cmx_activation_name() and refuses a library that disagrees. */
enum { CMX_ACT_GELU = 0, CMX_ACT_GELU_TANH = 1, CMX_ACT_RELU = 2, CMX_NUM_ACTIVATIONS = 3 };

/* The problem: x is [n, c, h, w] with element strides `stride` (out, dout and dx share x's
 * strides); depthwise kernel k x k with PyTorch's "same" padding. */
typedef struct {
  int64_t n, c, h, w;
  int64_t stride[4];
  int32_t dtype;        /* CMX_FLOAT32 / CMX_FLOAT16 / CMX_BFLOAT16 */
  int32_t k;            /* 1 .. cmx_max_kernel_size() */
  int32_t act;          /* CMX_ACT_* */
  int32_t has_in_affine;/* the block input is in_scale*x + in_shift per channel */
  int32_t aligned;      /* x and every tensor sharing its strides start 16-byte aligned
                         * (enables the 16-byte path; the passes also check the pointers) */
  int32_t target_blocks;/* reductions: split each channel block's (image, tile) items into
                         * enough parts for about this many blocks; 0: the default */
  int32_t saved_u;      /* F1 saves the convolution output u and F2, B1, B2 read it instead
                         * of convolving (cmx_outputs.u, cmx_inputs.u: float32, x's shape
                         * and element strides, 16-byte aligned for the 16-byte path) */
  int32_t prefetch;     /* L2 prefetch of every rectangle a block stages, ahead of its staging
                         * loop (the next item's while one computes); 16-byte path only. A
                         * hint: results do not depend on it */
  int32_t tensor_cores; /* passes on tensor cores (mma.sync) where their kernels take the
                         * shape (16-bit x in NCHW on the 16-byte path, k <= 17; cmx_plan.mma
                         * says which passes do): 0 none; CMX_TC_F2 F2 without saved_u;
                         * CMX_TC_ALL (or CMX_TC_ALL_FUSED) also F1 saving u and B2 reading
                         * it (B2: k <= 16) */
  int32_t images_per_block;/* F2 on tensor cores (cmx_plan.mma bit 1) without the input
                         * affine: a block takes its tile in this many images one after
                         * another, the next one's halo loaded while it convolves one (cut
                         * to n); 0 or 1: one image. A schedule: results do not depend on
                         * it */
} cmx_shape;

/* What the launches over this shape need, per pass (0: F1, 1: F2, 2: B1, 3: B2): the
 * number of partial rows its reduction writes (its outputs are [partial_rows, c] float32;
 * dW partials [partial_rows, c, k*k]; F2 has none), the 1-D grid, threads, channels per
 * block and dynamic shared memory; the spatial tile and whether the 16-byte path is taken. */
typedef struct {
  int32_t tile_h, tile_w;
  int32_t vec;                  /* 16-byte global accesses along the contiguous dimension */
  int32_t direct;               /* bit i: pass i loads global memory directly, no staged
                                 * tiles (F2, B1 reading the saved u: their own kernels) */
  int32_t mma;                  /* bit i: pass i convolves on tensor cores (F2 with
                                 * shape.tensor_cores: apply_mma_kernel; F1:
                                 * stats_mma_kernel; B2: bwd_mma_kernel) */
  int32_t du;                   /* 1: B2 first writes du to cmx_outputs.du (du_kernel), then
                                 * its MMAs read it (CMX_TC_ALL, images of several 32 x 32
                                 * tiles); 0: no du buffer */
  int64_t partial_rows[4];
  int64_t blocks[4];
  int32_t threads[4];
  int32_t channels_per_block[4];
  int32_t smem[4];              /* bytes */
} cmx_plan;

/* Inputs. Every vector is dense (stride 1) and every pointer refers to device memory of the
 * library's kind (GPU for _cmx_cuda, host for _cmx_emu). weight is [c, k, k] dense and bias
 * [c] dense, both in x's dtype; the per-channel vectors are float32. Unused fields: NULL. */
typedef struct {
  const void* x;
  const void* weight;
  const void* bias;
  const float* in_scale;  /* NULL unless shape.has_in_affine */
  const float* in_shift;
  const float* mean;      /* F2, B1, B2 */
  const float* rstd;
  const float* gamma;     /* F2, B2 */
  const float* beta;      /* F2 */
  const void* dout;       /* B1, B2 */
  const float* dbeta;     /* B2: per-channel sums from B1 (batch statistics only) */
  const float* dgamma;
  const float* u;         /* F2, B1, B2 with shape.saved_u: F1's saved convolution output */
  int32_t batch_stats;    /* B2: BN used batch statistics */
  void* stream;           /* cudaStream_t (ignored by the emulation build) */
} cmx_inputs;

/* Outputs (unused ones NULL). Partials are [partial_rows, c] float32 unless noted. */
typedef struct {
  void* y;                /* F2: out; B2: dx; x's dtype and strides */
  float* mean_p;          /* F1 */
  float* m2_p;            /* F1: centred sum of squares per tile */
  float* count_p;         /* F1: [partial_rows] valid positions per partial row */
  float* dbeta_p;         /* B1 */
  float* dgamma_p;        /* B1 */
  float* dw_p;            /* B2: [partial_rows, c, k*k] */
  float* db_p;            /* B2 */
  float* dscale_p;        /* B2 with in_affine: sum(dL/dinput * x) */
  float* dshift_p;        /* B2 with in_affine: sum(dL/dinput) */
  float* u;               /* F1 with shape.saved_u: u = conv(input) + b, float32 */
  float* du;              /* B2 with cmx_plan.du: scratch for du = dL/du, float32, x's shape
                           * and element strides (as u), 16-byte aligned */
} cmx_outputs;

CMX_API int32_t cmx_abi_version(void);
CMX_API const char* cmx_last_error(void);
/* "kind=cuda;archs=sm_80,sm_90,compute_90;cuda=13.0" or "kind=emulation". */
CMX_API const char* cmx_build_info(void);
CMX_API int32_t cmx_max_kernel_size(void);
CMX_API const char* cmx_activation_name(int32_t act); /* NULL for an unknown id */
/* Number of CUDA devices (>= 0), or -CMX_E_NO_DEVICE / -CMX_E_CUDA with cmx_last_error() set.
 * Also initialises the library's CUDA runtime (call it before any stream capture). The
 * emulation build returns 0. */
CMX_API int32_t cmx_device_count(void);
/* CMX_OK if the library holds a kernel image that runs on `device`, else why not. */
CMX_API int32_t cmx_check_device(int32_t device);

CMX_API int32_t cmx_make_plan(const cmx_shape* shape, cmx_plan* plan);
/* F1: per-tile mean, centred M2 and count of g = act(conv(input) + b) (and u, saved_u). */
CMX_API int32_t cmx_stats(const cmx_shape* shape, const cmx_inputs* in, const cmx_outputs* out);
/* F2 / eval: y = input + gamma*(g - mean)*rstd + beta. */
CMX_API int32_t cmx_apply(const cmx_shape* shape, const cmx_inputs* in, const cmx_outputs* out);
/* B1: per-tile sum(dout) and sum(dout * xhat). */
CMX_API int32_t cmx_bwd_reduce(const cmx_shape* shape, const cmx_inputs* in,
                               const cmx_outputs* out);
/* B2: dx, per-tile dW, db (and the in_affine gradients). */
CMX_API int32_t cmx_bwd_main(const cmx_shape* shape, const cmx_inputs* in,
                             const cmx_outputs* out);
/* Test hook: the element offset of (n, c, h, w) for these strides, through the kernels' own
 * 64-bit index helpers. */
CMX_API int64_t cmx_index_probe(const int64_t* strides, int64_t n, int64_t c, int64_t h,
                                int64_t w);
/* Test hook (emulation build; the CUDA build returns CMX_E_INVALID): one warp's emulated
 * mma.sync.m16n8k16 (.row.col, fp32 accumulators) of dtype CMX_FLOAT16 or CMX_BFLOAT16 on the
 * fragment registers regs[32][6] (a0..a3, b0, b1 of each lane), d[32][4] += A B in place. */
CMX_API int32_t cmx_mma_probe(int32_t dtype, const uint32_t* regs, float* d);
/* Test hook (emulation build; the CUDA build returns CMX_E_INVALID): on = 1 starts recording
 * the L2 prefetches and the staged 16-byte loads of the launches that follow; on = 0 stops
 * and writes counts[3]: prefetches issued, staged loads whose 128-byte line their block had
 * not prefetched before, and (block, line) pairs prefetched but never loaded. */
CMX_API int32_t cmx_prefetch_audit(int32_t on, int64_t* counts);

#ifdef __cplusplus
}
#endif

#endif /* CMX_ABI_H_ */
