"""Layouts, autograd corners, numerics and determinism on every available backend."""
import pytest
import torch

from conftest import DEVICE, all_backends
from convmixer_ext import fused_dwconv_block
from helpers import compare_models, layer_pair


def _block(C=3, k=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=DEVICE, dtype=dtype)  # noqa: E731
    return r(C, 1, k, k) / k, 0.1 * r(C), 1 + 0.2 * r(C).float(), 0.1 * r(C).float()


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("view", ["slice", "expand", "permuted"])
def test_strided_inputs_read_correctly(backend, view):
    ref, fused = layer_pair(3, 5, "gelu", backend, torch.float32, DEVICE)
    base = torch.randn(2, 6, 9, 11).to(DEVICE)
    if view == "slice":      # every other channel, a spatial window
        x = base[:, ::2, 1:8, 2:10]
    elif view == "expand":   # batch broadcast (stride 0)
        x = base[:1, :3, :6, :7].expand(2, 3, 6, 7)
    else:                    # NHWC memory seen as NCHW with odd strides
        x = torch.randn(2, 7, 3, 6).to(DEVICE).permute(0, 2, 3, 1)
    assert not x.is_contiguous()
    compare_models(ref, fused, x, torch.float32, train=True, steps=1)


@pytest.mark.parametrize("backend", all_backends())
def test_frozen_parameters_and_no_grad(backend):
    ref, fused = layer_pair(3, 3, "gelu", backend, torch.float32, DEVICE)
    for m in (ref, fused):
        m[0].fn[0].weight.requires_grad_(False)
        m[0].fn[2].bias.requires_grad_(False)
    x = torch.randn(2, 3, 5, 6).to(DEVICE).requires_grad_()
    with torch.inference_mode():
        fused.eval()
        out_i = fused(x)
    ref.eval()
    torch.testing.assert_close(out_i.double().cpu(), ref(x.detach().double().cpu()),
                               rtol=1e-4, atol=1e-4)
    fused.train()
    with torch.no_grad():
        out = fused(x)
    assert not out.requires_grad
    fused(x).sum().backward()
    assert fused[0].fn[0].weight.grad is None and fused[0].fn[2].bias.grad is None
    assert fused[0].fn[0].bias.grad is not None and x.grad is not None


@pytest.mark.parametrize("backend", all_backends())
def test_deterministic_outputs_and_gradients(backend):
    """Same input -> bitwise-identical outputs and gradients (no float atomics)."""
    w, b, g, be = _block(C=3, k=5)
    x = torch.randn(2, 3, 9, 10).to(DEVICE)
    dout = torch.randn_like(x)
    results = []
    for _ in range(3):
        ps = [t.clone().requires_grad_() for t in (x, w, b, g, be)]
        out = fused_dwconv_block(*ps, training=True, backend=backend)
        out.backward(dout)
        results.append([out.detach()] + [p.grad for p in ps])
    for later in results[1:]:
        for a, c in zip(results[0], later):
            assert torch.equal(a, c)


@pytest.mark.parametrize("backend", all_backends())
def test_constant_channel_zero_variance(backend):
    """A channel whose activation is constant: var = 0, rstd = 1/sqrt(eps), finite output."""
    ref, fused = layer_pair(2, 3, "relu", backend, torch.float32, DEVICE)
    with torch.no_grad():
        for m in (ref, fused):
            m[0].fn[0].weight.zero_()
    compare_models(ref, fused, torch.randn(2, 2, 4, 5).to(DEVICE), torch.float32, train=True)


@pytest.mark.parametrize("backend", all_backends())
def test_nan_propagates_like_reference(backend):
    ref, fused = layer_pair(2, 3, "gelu", backend, torch.float32, DEVICE)
    x = torch.randn(2, 2, 5, 5).to(DEVICE)
    x[0, 1, 2, 2] = float("nan")
    for m in (ref, fused):
        m.eval()
    o_r = ref(x.double().cpu())
    o_f = fused(x).cpu()
    assert torch.equal(torch.isnan(o_f), torch.isnan(o_r))


@pytest.mark.parametrize("backend", all_backends())
def test_empty_batch_eval(backend):
    w, b, g, be = _block()
    x = torch.randn(0, 3, 5, 5).to(DEVICE).requires_grad_()
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    out = fused_dwconv_block(x, w, b, g, be, rm, rv, None, training=False, backend=backend)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="more than 1 value"):
        fused_dwconv_block(x, w, b, g, be, rm, rv, None, training=True, backend=backend)
