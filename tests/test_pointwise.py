"""The fused pointwise block (1x1 conv + act + BN2: GEMM with bias/act/statistics epilogue)
against the reference modules, and ConvMixerLayer(pointwise=...) against the reference."""
import copy
from types import SimpleNamespace

import pytest
import torch

from conftest import DEVICE, all_backends, model_kernel_size
from convmixer_ext import ConvMixer, ConvMixerLayer, FusedBlocks, convert
from convmixer_ext.backends import backend_reason
from convmixer_ext.pointwise import fused_pointwise_block
from convmixer_ext.reference import ConvMixer as RefConvMixer
from convmixer_ext.semantics import activation_module
from helpers import assert_close, compare_models, layer_pair, randomize_bn

PW = ["torch"] + (["triton"] if backend_reason("triton", DEVICE) is None else [])


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


@pytest.mark.parametrize("training", [True, False])
def test_pointwise_gradcheck_float64(training):
    """g, mean and var of the pointwise op all carry gradients (the folded BN2 relies on
    autograd through mean/var): check them numerically in float64."""
    torch.manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    y, w, b = r(2, 4, 3, 3), r(5, 4, 1, 1), r(5)
    gamma = (1 + 0.3 * torch.randn(5, dtype=torch.float64)).requires_grad_()
    beta = r(5)

    def f(y, w, b, gamma, beta):
        # duck-typed modules, so that gradcheck's inputs are the very parameters used
        conv = SimpleNamespace(weight=w, bias=b)
        bn = SimpleNamespace(weight=gamma, bias=beta, affine=True, eps=1e-5, momentum=0.1,
                             running_mean=0.1 * torch.ones(5, dtype=torch.float64),
                             running_var=torch.full((5,), 1.5, dtype=torch.float64),
                             num_batches_tracked=torch.tensor(0))
        return fused_pointwise_block(y, conv, bn, training, "gelu", "torch")

    assert torch.autograd.gradcheck(f, (y, w, b, gamma, beta))


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
    with pytest.raises(ValueError, match="pointwise weight is on meta but y is on cpu"):
        fused_pointwise_block(torch.randn(2, 4, 3, 3), conv.to("meta"), bn, True, "gelu",
                              "torch")
    with pytest.raises(ValueError, match="eps"):
        fused_pointwise_block(torch.randn(2, 4, 3, 3), torch.nn.Conv2d(4, 4, 1),
                              torch.nn.BatchNorm2d(4, eps=-1.0), True, "gelu", "torch")


def _model_pair(backend, pointwise, depth=3, k=5, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ref = RefConvMixer(6, depth, kernel_size=k, patch_size=2, num_classes=4)
    randomize_bn(ref, seed + 1)
    fused = convert(copy.deepcopy(ref), backend=backend, pointwise=pointwise)
    ref = copy.deepcopy(ref).double()
    return ref, fused.to(DEVICE, dtype)


@pytest.mark.parametrize("pointwise", PW)
@pytest.mark.parametrize("backend", all_backends())
def test_folded_model_matches_reference(backend, pointwise):
    """BN2 folded into the next layer's depthwise load (FusedBlocks chain): logits, input
    and every parameter gradient, running statistics after two training steps, then eval."""
    # the interpreter is slow: two layers (one hand-off) there, three elsewhere
    ref, fused = _model_pair(backend, pointwise, k=model_kernel_size(backend, pointwise),
                             depth=2 if "triton" in (backend, pointwise) else 3)
    assert isinstance(fused.blocks, FusedBlocks)
    assert all(layer.folds_bn2() for layer in fused.blocks)
    x = torch.randn(2, 3, 10, 12, device=DEVICE)
    compare_models(ref, fused, x, torch.float32, train=True, steps=2)
    compare_models(ref, fused, x, torch.float32, train=False, steps=1)


def test_chain_hands_bn2_to_the_next_layer(monkeypatch):
    """Inside the stack no BN2 is applied on its own: layers 1.. receive the previous
    layer's affine (pre) and the affine is materialised once, after the last layer."""
    import convmixer_ext.modules as modules
    seen, applied = [], []
    real_block, real_apply = modules.fused_dwconv_block, modules.apply_affine
    monkeypatch.setattr(modules, "fused_dwconv_block",
                        lambda *a, **kw: seen.append(kw["in_affine"] is not None) or
                        real_block(*a, **kw))
    monkeypatch.setattr(modules, "apply_affine",
                        lambda *a: applied.append(1) or real_apply(*a))
    _, fused = _model_pair("torch", "torch", depth=4)
    fused(torch.randn(2, 3, 8, 8, device=DEVICE)).sum().backward()
    assert seen == [False, True, True, True]
    assert len(applied) == 1


def test_folded_state_dict_and_timm_conversion():
    """convert(pointwise=...) keeps every state_dict key; a timm ConvMixer converted with
    the folded chain gives timm's logits and gradients."""
    import timm.models.convmixer as timm_convmixer
    torch.manual_seed(0)
    tm = timm_convmixer.ConvMixer(8, 2, kernel_size=5, patch_size=2, num_classes=5)
    randomize_bn(tm, 2)
    keys = list(tm.state_dict())
    fused = convert(copy.deepcopy(tm), backend="torch", pointwise="torch")
    assert list(fused.state_dict()) == keys
    x = torch.randn(2, 3, 8, 10)
    for train in (True, False):
        tm.train(train)
        fused.train(train)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_f = tm(xr), fused(xf)
        out_r.square().sum().backward()
        out_f.square().sum().backward()
        assert_close(out_f, out_r, torch.float32, f"timm logits train={train}")
        assert_close(xf.grad, xr.grad, torch.float32, "timm x.grad")
    for (n, pr), (_, pf) in zip(tm.named_parameters(), fused.named_parameters()):
        assert_close(pf.grad, pr.grad, torch.float32, n + ".grad")


@pytest.mark.parametrize("pooling", ["average", "custom"])
def test_convmixer_folds_last_bn2_into_pooling(monkeypatch, pooling):
    """ConvMixer applies the last layer's BN2 affine after the average pooling (to [N, C]),
    with the reference's logits and gradients; a replaced pooling gets the materialised
    activation instead."""
    import convmixer_ext.modules as modules
    applied = []
    real_apply = modules.apply_affine
    monkeypatch.setattr(modules, "apply_affine",
                        lambda g, pre: applied.append(g.dim()) or real_apply(g, pre))
    torch.manual_seed(0)
    ref = RefConvMixer(6, 2, kernel_size=3, patch_size=2, num_classes=4)
    randomize_bn(ref, 4)
    fused = ConvMixer(6, 2, kernel_size=3, patch_size=2, num_classes=4, backend="torch",
                      pointwise="torch")
    fused.load_state_dict(ref.state_dict())
    if pooling == "custom":  # max pooling does not commute with a negative scale
        for m in (ref, fused):
            m.pooling = torch.nn.Sequential(torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(1))
    x = torch.randn(2, 3, 8, 6)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    assert applied == ([2] if pooling == "average" else [4])
    out_r.square().sum().backward()
    out_f.square().sum().backward()
    assert_close(out_f, out_r, torch.float32, "logits")
    assert_close(xf.grad, xr.grad, torch.float32, "x.grad")
    for (n, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters()):
        assert_close(pf.grad, pr.grad, torch.float32, n + ".grad")


def test_folded_model_empty_batch_eval():
    """An empty batch in eval goes through the folded chain (forward and backward) like
    through the reference: empty logits, empty input gradient."""
    _, fused = _model_pair("torch", "torch", depth=2)
    x = torch.randn(0, 3, 8, 8, device=DEVICE, requires_grad=True)
    out = fused.eval()(x)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.skipif("triton" not in PW, reason="needs the Triton pointwise backend")
@pytest.mark.parametrize("tile", ["128x128x32", "16x16x16"], ids=["gpu-tile", "many-tiles"])
def test_pointwise_triton_tiles(monkeypatch, tile):
    """The GEMM tile the GPU uses (128x128x32), and small tiles giving several row and
    column tiles (the 1-D, columns-fastest program order), against the torch twin: g,
    mean, var and the gradients of y, weight and bias through mean/var as well."""
    monkeypatch.setenv("CONVMIXER_EXT_PW_TILE", tile)
    torch.manual_seed(0)
    y = torch.randn(3, 20, 7, 9, device=DEVICE)
    w = torch.randn(40, 20, 1, 1, device=DEVICE) / 5
    b = torch.randn(40, device=DEVICE)
    probes = [torch.randn(s, device=DEVICE) for s in ((3, 40, 7, 9), (40,), (40,))]
    res = {}
    for backend in ("triton", "torch"):
        args = [t.clone().requires_grad_() for t in (y, w, b)]
        outs = torch.ops.convmixer_ext.pw_act_fwd(*args, "gelu", backend)
        sum((o * p).sum() for o, p in zip(outs, probes)).backward()
        res[backend] = list(outs) + [a.grad for a in args]
    names = ["g", "mean", "var", "y.grad", "weight.grad", "bias.grad"]
    for name, got, want in zip(names, res["triton"], res["torch"]):
        assert_close(got, want, torch.float32, name)


@pytest.mark.skipif("triton" not in PW, reason="needs the Triton pointwise backend")
def test_fp32_gemm_precision_follows_cudnn_allow_tf32(monkeypatch):
    """The fp32 pointwise GEMM uses TF32 exactly where eager's 1x1 convolution does
    (cudnn.allow_tf32): the GPU configuration the launcher picks, recorded without running."""
    from convmixer_ext import triton_kernels as tk
    y = torch.empty(2, 8, 4, 4, device="meta")
    for allow, want in ((True, "tf32"), (False, "ieee")):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
        seen = []
        with tk.recording(lambda kern, grid, args, kw: seen.append(kw["PRECISION"])):
            tk.pw_gemm_act_stats(y, torch.empty(8, 8, device="meta"),
                                 torch.empty(8, device="meta"), torch.empty_like(y), 0)
        assert seen == [want]
    with tk.recording(lambda kern, grid, args, kw: seen.append(kw["PRECISION"])):
        seen.clear()
        tk.pw_gemm_act_stats(y.bfloat16(), torch.empty(8, 8, device="meta").bfloat16(),
                             torch.empty(8, device="meta").bfloat16(), y.bfloat16(), 0)
    assert seen == ["ieee"]  # 16-bit operands: plain tensor-core products, exact in fp32
