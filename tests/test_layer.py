"""ConvMixerLayer (every available backend) against the reference layer in float64:
outputs, gradients of the input and of every parameter, running statistics."""
import copy

import pytest
import torch

from conftest import DEVICE, all_backends
from convmixer_ext import fused_dwconv_block
from helpers import compare_models, layer_pair

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

# (N, C, H, W, k, activation, dtype, channels_last)
CASES = [
    (2, 3, 5, 7, 3, "gelu", f32, False),
    (1, 4, 6, 5, 5, "gelu_tanh", f32, False),      # batch 1
    (2, 3, 7, 6, 7, "relu", f32, True),
    (2, 2, 9, 8, 9, "gelu", f32, False),
    (2, 2, 5, 6, 9, "gelu_tanh", f32, True),
    (2, 3, 6, 6, 4, "gelu", f32, False),           # even k: PyTorch's asymmetric "same"
    (1, 2, 7, 5, 13, "relu", f32, False),          # generic (run-time k) path
    (2, 1, 4, 4, 3, "gelu", f32, False),           # C = 1
    (1, 2, 35, 34, 9, "gelu", f32, False),         # several tiles, ragged edge tiles
    (1, 2, 18, 17, 17, "gelu_tanh", f32, False),   # large k: small CUDA tiles, several of them
    (2, 3, 5, 7, 9, "gelu", bf16, False),
    (2, 3, 5, 6, 7, "gelu_tanh", bf16, True),
    (2, 3, 5, 6, 3, "relu", f16, False),
]


def _id(c):
    N, C, H, W, k, act, dt, cl = c
    return f"{N}x{C}x{H}x{W}-k{k}-{act}-{str(dt)[6:]}{'-cl' if cl else ''}"


def _input(N, C, H, W, dtype, channels_last, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = (1.5 * torch.randn(N, C, H, W, generator=g) + 0.3).to(device=DEVICE, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_layer_matches_reference(case, train, backend):
    N, C, H, W, k, act, dtype, cl = case
    ref, fused = layer_pair(C, k, act, backend, dtype, DEVICE)
    x = _input(N, C, H, W, dtype, cl)
    # low precision: the fused layer's pointwise half is PyTorch in that dtype, so the
    # reference run in that dtype (CPU) bounds what "as accurate as PyTorch" means
    ref_lowp = copy.deepcopy(ref).to(dtype) if dtype in (bf16, f16) else None
    # three training steps: running statistics and num_batches_tracked evolve
    compare_models(ref, fused, x, dtype, train=train, steps=3 if train else 1,
                   ref_lowp=ref_lowp)


@pytest.mark.parametrize("backend", all_backends())
def test_momentum_none_cumulative_average(backend):
    ref, fused = layer_pair(3, 5, "gelu", backend, f32, DEVICE, momentum=None)
    compare_models(ref, fused, _input(2, 3, 6, 5, f32, False), f32, train=True, steps=3)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_running_stats_uses_batch_stats(backend, train):
    """track_running_stats=False: batch statistics in train and in eval, like nn.BatchNorm2d."""
    ref, fused = layer_pair(3, 3, "gelu", backend, f32, DEVICE)
    for m in (ref, fused):
        bn = m[0].fn[2]
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    compare_models(ref, fused, _input(2, 3, 5, 6, f32, False), f32, train=train, steps=2)


@pytest.mark.parametrize("backend", all_backends())
def test_bn_without_affine(backend):
    ref, fused = layer_pair(3, 3, "relu", backend, f32, DEVICE)
    for m in (ref, fused):
        bn = m[0].fn[2]
        bn.affine = False
        bn.weight = bn.bias = None
    compare_models(ref, fused, _input(2, 3, 5, 6, f32, False), f32, train=True, steps=1)


@pytest.mark.parametrize("backend", all_backends())
def test_large_mean_offset_variance_is_stable(backend):
    """Batch variance of g with a mean offset ~1e4 times its spread. Naive E[g^2]-E[g]^2 in
    fp32 is off by several hundred percent here; the fused statistics (Chan merge of
    centred per-tile partials) must stay within 1e-3 of the float64 truth. momentum=1
    makes running_var exactly the unbiased batch variance."""
    C, k = 2, 3
    g = torch.Generator().manual_seed(5)
    x = (0.05 * torch.randn(2, C, 8, 8, generator=g)).to(DEVICE)
    w = (0.3 * torch.randn(C, 1, k, k, generator=g)).to(DEVICE)
    b = torch.full((C,), 1000.0, device=DEVICE)
    gamma, beta = torch.ones(C, device=DEVICE), torch.zeros(C, device=DEVICE)
    rm, rv = torch.zeros(C, device=DEVICE), torch.zeros(C, device=DEVICE)
    fused_dwconv_block(x, w, b, gamma, beta, rm, rv, None, training=True, momentum=1.0,
                       activation="relu", backend=backend)
    u64 = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding="same",
                                     groups=C)
    expected = torch.relu(u64).var(dim=(0, 2, 3), unbiased=True)
    assert ((rv.double().cpu() - expected.cpu()).abs() / expected.cpu()).max() < 1e-3
