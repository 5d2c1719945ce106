"""The whole fused ConvMixer: torch.compile(fullgraph=True), autocast, channels_last —
with the pointwise half unfused and fused (BN2 folded into the next layer's load)."""
import copy

import pytest
import torch

from conftest import DEVICE, all_backends, model_kernel_size
from convmixer_ext import convert
from convmixer_ext.reference import ConvMixer as RefConvMixer
from helpers import _maxerr, assert_close, randomize_bn


def _pair(backend, dim=8, depth=2, k=5, activation="gelu", pointwise="unfused"):
    torch.manual_seed(0)
    ref = RefConvMixer(dim, depth, kernel_size=k, patch_size=2, num_classes=6,
                       activation=activation)
    randomize_bn(ref, 1)
    fused = convert(copy.deepcopy(ref), backend=backend, pointwise=pointwise)
    return ref.to(DEVICE), fused.to(DEVICE)


@pytest.mark.parametrize("pointwise, dynamic", [("unfused", None), ("torch", None),
                                               ("torch", True)])
def test_compile_fullgraph_whole_model(pointwise, dynamic):
    """dynamic=True: symbolic sizes and module floats through every layer, BN2 folded."""
    torch._dynamo.reset()
    ref, fused = _pair("torch", pointwise=pointwise)
    # fullgraph: a graph break raises
    compiled = torch.compile(fused, fullgraph=True, dynamic=dynamic)
    x = torch.randn(2, 3, 12, 10, device=DEVICE)
    for train in (True, False):
        ref.train(train)
        fused.train(train)
        xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_c = ref(xr), compiled(xc)
        assert_close(out_c, out_r, torch.float32, f"compiled logits train={train}")
        out_r.square().sum().backward()
        out_c.square().sum().backward()
        assert_close(xc.grad, xr.grad, torch.float32, "compiled x.grad")
    for (n, br), (_, bf) in zip(ref.named_buffers(), fused.named_buffers()):
        assert torch.allclose(bf.double(), br.double(), rtol=1e-5, atol=1e-6), n


@pytest.mark.parametrize("pointwise", ["unfused", "torch"])
@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_reference_under_autocast(backend, dtype, pointwise):
    """Under torch.autocast the fused model casts like the reference (conv inputs to the
    autocast dtype, statistics in fp32): same output dtype, fp32 parameter gradients, and
    values as close to the float64 reference as the reference under the same autocast is
    (TOL of the dtype + 4x that reference's own error, as in compare_models: on a GPU the
    two low-precision models round at different points, so they cannot be held to TOL of
    each other). A conv bias's gradient is a sum over positions of its output's gradient,
    whose terms carry the dtype's rounding and cancel (GELU then BatchNorm follow): it is
    held to TOL relative to the sum of the terms' magnitudes, from the float64 model (an
    H200 run saw 4e-4 on a 1.2e-2 fp16 bias gradient whose terms summed to larger)."""
    ref, fused = _pair(backend, k=model_kernel_size(backend), pointwise=pointwise)
    ref64 = copy.deepcopy(ref).double().cpu().train()
    terms = {}  # conv name -> max over channels of sum over positions of |d out|

    def keep_terms(name):
        def hook(mod, inp, out):
            out.register_hook(lambda g: terms.__setitem__(
                name, g.abs().sum((0, 2, 3)).max().item()))
        return hook
    for name, mod in ref64.named_modules():
        if isinstance(mod, torch.nn.Conv2d) and mod.bias is not None:
            mod.register_forward_hook(keep_terms(name))
    x = torch.randn(2, 3, 12, 10, device=DEVICE)
    outs = []
    for m in (ref, fused):
        m.train()
        with torch.autocast(DEVICE, dtype=dtype):
            out = m(x)
        out.float().square().sum().backward()
        outs.append(out)
    out64 = ref64(x.double().cpu())
    out64.square().sum().backward()
    assert outs[0].dtype == outs[1].dtype
    assert_close(outs[1], out64, dtype, "autocast logits", _maxerr(outs[0], out64))
    for (n, pr), (_, pf), (_, p64) in zip(ref.named_parameters(), fused.named_parameters(),
                                          ref64.named_parameters()):
        assert pf.grad.dtype == torch.float32, n
        sum_scale = terms.get(n[:-len(".bias")]) if n.endswith(".bias") else None
        assert_close(pf.grad, p64.grad, dtype, n + ".grad", _maxerr(pr.grad, p64.grad),
                     scale=sum_scale)
    assert terms, "no conv bias seen"
    for (n, br), (_, bf), (_, b64) in zip(ref.named_buffers(), fused.named_buffers(),
                                          ref64.named_buffers()):
        assert bf.dtype == br.dtype, n
        if br.is_floating_point():
            assert_close(bf, b64, dtype, n, _maxerr(br, b64))


@pytest.mark.parametrize("pointwise", ["unfused", "torch"])
@pytest.mark.parametrize("backend", all_backends())
def test_channels_last_end_to_end(backend, pointwise):
    """channels_last in, channels_last through every block, no layout conversion in the
    fused op (the kernels read it natively), same values as NCHW."""
    ref, fused = _pair(backend, k=model_kernel_size(backend), pointwise=pointwise)
    fused.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 12, 10, device=DEVICE).to(memory_format=torch.channels_last)
    fused.train()
    feats = fused.stem(x)
    assert feats.is_contiguous(memory_format=torch.channels_last)
    pre = None
    for blk in fused.blocks:
        y = blk.forward_dw(feats, pre)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert y.stride() == feats.stride()  # same layout as the input, no copy
        feats, pre = blk.forward_folded(feats, pre)  # g (folded BN2) or the output
        assert feats.is_contiguous(memory_format=torch.channels_last)
    ref.train()
    assert_close(fused(x), ref(x.contiguous()), torch.float32, "channels_last logits")


def test_digits_demo_trains_like_reference(tmp_path):
    """examples/train_digits.py: fused and reference ConvMixer trained from the same init on
    the same batches give the same loss curve (the script asserts it) and learn."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_digits.py")
    spec = importlib.util.spec_from_file_location("train_digits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "loss.png"
    assert mod.main(["--epochs", "3", "--device", "cpu", "--backend", "torch",
                     "--out", str(out)]) == 0
    assert out.stat().st_size > 0
