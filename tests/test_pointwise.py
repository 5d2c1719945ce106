"""The fused pointwise block (1x1 conv + act + BN2: GEMM with bias/act/statistics epilogue)
against the reference modules, and ConvMixerLayer(pointwise=...) against the reference."""
import copy

import pytest
import torch

from conftest import DEVICE
from convmixer_ext import ConvMixerLayer, convert
from convmixer_ext.backends import _reason
from convmixer_ext.pointwise import fused_pointwise_block
from convmixer_ext.reference import ConvMixer as RefConvMixer
from convmixer_ext.semantics import activation_module
from helpers import assert_close, compare_models, layer_pair, randomize_bn

PW = ["torch"] + (["triton"] if _reason("triton", DEVICE) is None else [])


@pytest.mark.parametrize("backend", PW)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_pointwise_block_vs_reference(backend, dtype, train, layout):
    torch.manual_seed(0)
    act = "gelu"
    conv, bn = torch.nn.Conv2d(20, 24, 1), torch.nn.BatchNorm2d(24)
    randomize_bn(bn, 2)
    conv, bn = conv.to(DEVICE, dtype), bn.to(DEVICE, dtype)
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    y = torch.randn(3, 20, 7, 9, device=DEVICE).to(dtype)
    if layout == "cl":
        y = y.to(memory_format=torch.channels_last)
    for step in range(2):
        yf, yr = y.clone().requires_grad_(), y.double().requires_grad_()
        bn.train(train)
        bn64.train(train)
        conv.zero_grad()
        bn.zero_grad()
        conv64.zero_grad()
        bn64.zero_grad()
        out = fused_pointwise_block(yf, conv, bn, train, act, backend)
        ref = bn64(activation_module(act)(conv64(yr)))
        probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(step)).to(DEVICE)
        out.backward(probe.to(dtype))
        ref.backward(probe.double())
        assert out.dtype == dtype and out.shape == ref.shape
        assert_close(out, ref, dtype, "out")
        assert_close(yf.grad, yr.grad, dtype, "y.grad")
        for name, a, b in (("weight", conv.weight, conv64.weight), ("bias", conv.bias, conv64.bias),
                           ("gamma", bn.weight, bn64.weight), ("beta", bn.bias, bn64.bias)):
            assert_close(a.grad, b.grad, dtype, name + ".grad")
        assert_close(bn.running_mean, bn64.running_mean, dtype, "running_mean")
        assert_close(bn.running_var, bn64.running_var, dtype, "running_var")
        assert int(bn.num_batches_tracked) == int(bn64.num_batches_tracked)


@pytest.mark.parametrize("pointwise", PW)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_layer_with_fused_pointwise(pointwise, activation):
    ref, fused = layer_pair(3, 5, activation, "torch", torch.float32, DEVICE)
    fused.pointwise = pointwise
    x = torch.randn(2, 3, 6, 7, device=DEVICE)
    compare_models(ref, fused, x, torch.float32, train=True, steps=3)
    compare_models(ref, fused, x, torch.float32, train=False, steps=1)


def test_model_convert_with_fused_pointwise():
    torch.manual_seed(0)
    ref = RefConvMixer(8, 2, kernel_size=3, patch_size=2, num_classes=5).double()
    randomize_bn(ref, 3)
    fused = convert(copy.deepcopy(ref), backend="torch", pointwise="torch")
    assert all(b.pointwise == "torch" for b in fused.blocks)
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64)
    assert_close(fused.train()(x), ref.train()(x), torch.float64, "logits")


def test_pointwise_opcheck():
    torch.manual_seed(0)
    y = torch.randn(2, 4, 3, 5, requires_grad=True)
    w = torch.randn(6, 4, 1, 1, requires_grad=True)
    b, g, be = (torch.randn(6, requires_grad=True) for _ in range(3))
    for batch_stats in (True, False):
        torch.library.opcheck(torch.ops.convmixer_ext.pw_block_fwd.default,
                              (y, w, b, g, be, torch.zeros(6), torch.ones(6), batch_stats,
                               1e-5, "gelu", "torch"))


def test_pointwise_bad_arguments():
    with pytest.raises(ValueError, match="pointwise"):
        ConvMixerLayer(4, 3, pointwise="cublas")
    conv, bn = torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="pointwise backend"):
        fused_pointwise_block(torch.randn(2, 4, 3, 3), conv, bn, True, "gelu", "cuda")
    with pytest.raises(ValueError, match="1x1 conv"):
        fused_pointwise_block(torch.randn(2, 5, 3, 3), conv, bn, True, "gelu", "torch")
    with pytest.raises(TypeError, match="dtype"):
        fused_pointwise_block(torch.randn(2, 4, 3, 3).double(), conv, bn, True, "gelu", "torch")
