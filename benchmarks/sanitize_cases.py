"""Exercise every CUDA kernel (forward train/eval, backward; templated and generic k;
fp32/bf16; NCHW and channels_last; ragged tiles; training with the convolution output saved
and recomputed; the tensor-core kernels at each CONVMIXER_EXT_CUDA_TC level, F2's taking
several images a block) — run under compute-sanitizer by benchmarks/gpu_run.sh."""
import os

import torch

from convmixer_ext import fused_dwconv_block

assert torch.cuda.is_available(), "needs a GPU"
dev = "cuda"
# SANITIZE_QUICK=1 (racecheck, which is slow): one kernel size per code path and one dtype
# (the shared-memory schedule does not depend on the dtype)
QUICK = os.environ.get("SANITIZE_QUICK") == "1"


def block(x, k, training, save):
    """One forward (and backward) of the fused block on x with random weights."""
    torch.manual_seed(k)
    C, dtype = x.shape[1], x.dtype
    x.requires_grad_()
    w = torch.randn(C, 1, k, k, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(C, device=dev, dtype=dtype, requires_grad=True)
    g = torch.ones(C, device=dev, requires_grad=True)
    be = torch.zeros(C, device=dev, requires_grad=True)
    rm, rv = torch.zeros(C, device=dev), torch.ones(C, device=dev)
    out = fused_dwconv_block(x, w, b, g, be, rm, rv, None, training=training, backend="cuda",
                             save_conv=save)
    out.backward(torch.randn_like(out))


for k in ((3, 9, 4, 13) if QUICK else (3, 5, 7, 9, 4, 13, 17)):
    for dtype in ((torch.float32,) if QUICK else (torch.float32, torch.bfloat16)):
        for cl in (False, True):
            for training, save in ((True, False), (True, True), (False, None)):
                torch.manual_seed(k)
                x = torch.randn(2, 5, 37, 35, device=dev, dtype=dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                block(x, k, training, save)
# the tensor-core kernels (16-bit NCHW, W a multiple of 8): F2 at the default level, F1 and
# B2 at "all" (B2's du pass: planes of two by two tiles) and at "all-fused"
for level in ("1", "all", "all-fused"):
    os.environ["CONVMIXER_EXT_CUDA_TC"] = level
    for k in ((9,) if QUICK else (3, 9)):
        for training, save in ((True, True), (False, None)):
            torch.manual_seed(k)
            block(torch.randn(2, 3, 40, 48, device=dev, dtype=torch.bfloat16), k, training, save)
del os.environ["CONVMIXER_EXT_CUDA_TC"]
# F2 taking its tile in several images a block (cp.async into two halo buffers: racecheck
# sees a refill that no barrier orders after the reads of the image before)
os.environ["CONVMIXER_EXT_CUDA_TC_IMAGES"] = "2"
for k in ((9,) if QUICK else (3, 9)):
    torch.manual_seed(k)
    block(torch.randn(5, 3, 40, 48, device=dev, dtype=torch.bfloat16), k, False, None)
del os.environ["CONVMIXER_EXT_CUDA_TC_IMAGES"]
torch.cuda.synchronize()
print("sanitize cases done")
