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
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_propagate_like_reference(backend, bad):
    ref, fused = layer_pair(2, 3, "gelu", backend, torch.float32, DEVICE)
    x = torch.randn(2, 2, 5, 5).to(DEVICE)
    x[0, 1, 2, 2] = bad
    for m in (ref, fused):
        m.eval()
    # the depthwise block: conv, act, BN1, residual. The kernels sum taps directly, as the
    # float64 reference does; "eager" is the reference's own fp32 ops, whose convolution
    # may multiply inf by zero padding (NaN where float64 gives inf): it must match those.
    if backend == "eager":
        o_r = ref[0].float().to(DEVICE)(x).cpu()
    else:
        o_r = ref[0](x.double().cpu())
    o_f = fused.forward_dw(x).cpu()
    assert torch.equal(torch.isnan(o_f), torch.isnan(o_r))
    assert torch.equal(torch.isposinf(o_f), torch.isposinf(o_r))
    assert torch.equal(torch.isneginf(o_f), torch.isneginf(o_r))


@pytest.mark.parametrize("backend", all_backends())
def test_empty_batch_eval(backend):
    w, b, g, be = _block()
    x = torch.randn(0, 3, 5, 5).to(DEVICE).requires_grad_()
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    out = fused_dwconv_block(x, w.requires_grad_(), b, g, be, rm, rv, None, training=False,
                             backend=backend)
    assert out.shape == x.shape
    out.sum().backward()  # like PyTorch: empty input gradient, zero weight gradient
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
    with pytest.raises(ValueError, match="more than 1 value"):
        fused_dwconv_block(x, w, b, g, be, rm, rv, None, training=True, backend=backend)


def test_double_backward_is_a_clear_error():
    w, b, g, be = _block()
    x = torch.randn(2, 3, 5, 5).to(DEVICE).requires_grad_()
    out = fused_dwconv_block(x, w.requires_grad_(), b, g, be, backend="torch")
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("backend", all_backends())
def test_deterministic_algorithms_mode_is_respected(backend):
    """torch.use_deterministic_algorithms(True): the op runs (no nondeterministic path is
    taken, so nothing raises) and results are bitwise reproducible."""
    w, b, g, be = _block()
    x = torch.randn(2, 3, 6, 5).to(DEVICE)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        outs = []
        for _ in range(2):
            xi = x.clone().requires_grad_()
            out = fused_dwconv_block(xi, w, b, g, be, backend=backend)
            out.backward(torch.ones_like(out))
            outs.append((out.detach(), xi.grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("backend", all_backends())
def test_float16_range(backend):
    """fp16 inputs up to |x| ~ 1e3 with k = 9: every intermediate is fp32, so u (here up
    to ~1e4) and the statistics cannot overflow; results match float64 within fp16
    tolerance. (Outputs beyond 65504 would be inf, as any fp16 tensor.)"""
    ref, fused = layer_pair(3, 9, "gelu", backend, torch.float16, DEVICE)
    x = (300 * torch.randn(2, 3, 7, 6)).to(DEVICE, torch.float16)
    compare_models(ref, fused, x, torch.float16, train=True, steps=1, check_grads=False)


def _triton_offset_probe():
    """A one-program kernel storing the Triton kernels' offsets (_offs) of channels x
    positions (defined at module level: the interpreter resolves globals there)."""
    import triton
    import triton.language as tl
    global _offs
    from convmixer_ext.triton_kernels import _offs

    @triton.jit
    def probe(out_ptr, c_ptr, h_ptr, w_ptr, base, sC, sH, sW):
        c = tl.load(c_ptr + tl.arange(0, 4))
        h = tl.load(h_ptr + tl.arange(0, 4))
        w = tl.load(w_ptr + tl.arange(0, 4))
        o = base + _offs(c, h, w, sC, sH, sW)  # [4, 4]: every channel x position pair
        tl.store(out_ptr + tl.arange(0, 4)[:, None] * 4 + tl.arange(0, 4)[None, :], o)

    return probe


def test_index_helpers_beyond_2_31():
    """The CUDA kernels' offset helpers (through the emulation build) and the Triton
    kernels' offsets give exact 64-bit element offsets past 2^31 elements."""
    from convmixer_ext.backends import backend_reason, library
    strides = [3 * 2**30, 2**30, 2**16, 1]          # a [4, 3, 16384, 65536]-like layout
    idx = [(3, 2, 16383, 65535), (1, 0, 5, 7), (2, 1, 65535, 1)]
    expect = [sum(i * s for i, s in zip(ix, strides)) for ix in idx]
    assert max(expect) > 2**33
    checked = 0
    if backend_reason("cuda_emu", "cpu") is None:
        got = [library("emulation")[0].index_probe(strides, *ix) for ix in idx]
        assert got == expect
        checked += 1
    if backend_reason("triton", DEVICE) is None:
        pad = idx + [(0, 0, 0, 0)]
        cs, hs, ws = (torch.tensor([p[j] for p in pad], dtype=torch.int32, device=DEVICE)
                      for j in (1, 2, 3))
        out = torch.empty(4, 4, dtype=torch.int64, device=DEVICE)
        n = 3
        _triton_offset_probe()[(1,)](out, cs, hs, ws, n * strides[0], *strides[1:])
        for a in range(4):
            for p in range(4):
                assert out[a, p].item() == (n * strides[0] + pad[a][1] * strides[1]
                                            + pad[p][2] * strides[2] + pad[p][3] * strides[3])
        checked += 1
    assert checked, "no kernel backend available to check"


def test_no_memory_growth_over_repeated_steps():
    """200 forward/backward steps after warm-up: resident memory must not grow by more
    than a few activations (a leaked saved tensor per step would add ~200 MB)."""
    import gc

    from helpers import layer_pair as _lp

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    _, fused = _lp(16, 5, "gelu", "torch", torch.float32, "cpu")
    x = torch.randn(4, 16, 64, 64)  # 1 MiB
    probe = torch.randn_like(x)

    def steps(n):
        for _ in range(n):
            xi = x.clone().requires_grad_()
            fused(xi).backward(probe)
        gc.collect()

    steps(20)
    before = rss()
    steps(200)
    assert rss() - before < 40 * 2**20


@pytest.mark.parametrize("backend", [b for b in all_backends() if b not in ("eager",)])
def test_training_step_reads_nothing_back_to_the_host(backend, monkeypatch):
    """A training step (forward, backward, buffer updates) of a fused layer, the folded
    pointwise half included, never reads a value back to the host (no .item(), .tolist(),
    .cpu(), .numpy()): what a CUDA graph needs to capture it. (The partial counts are
    written by the kernels; "eager" is PyTorch's own BatchNorm, which reads
    num_batches_tracked for momentum=None only.)"""
    ref, fused = layer_pair(4, 5, "gelu", backend, torch.float32, DEVICE)
    fused.pointwise = "torch" if backend in ("torch", "cuda_emu") else "triton"
    x = torch.randn(2, 4, 6, 7).to(DEVICE).requires_grad_()
    probe = torch.randn(2, 4, 6, 7).to(DEVICE)

    def refuse(*a, **k):
        raise AssertionError("a host read-back in the training step")

    for name in ("item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    fused.train()
    fused(x).backward(probe)
    monkeypatch.undo()
    assert x.grad is not None and fused[0].fn[2].num_batches_tracked.item() == 1


def _triton_cdf_probe():
    """A kernel storing the Triton kernels' normal CDF (_cdf, GELU's Phi) of a vector (module
    level, as above)."""
    import triton
    import triton.language as tl
    global _cdf
    from convmixer_ext.triton_kernels import _cdf

    @triton.jit
    def probe(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, _cdf(tl.load(x_ptr + i, mask=i < n, other=0.0)), mask=i < n)

    return probe


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 3e38 * t(6)
def test_triton_normal_cdf_accuracy():
    """GELU's Phi in the Triton kernels (one polynomial and one 2^x, docs/DESIGN.md,
    "Activation") against Phi in float64 (erfc, accurate in both tails): within 2 ulp of the
    fp32 result for u >= 0 (measured 1.4 in fp32 arithmetic; a GPU's 2^x adds up to 2 ulp
    of the tail term, 0.5 ulp here), relative error below 1e-5 on [-6, 0) (4.1e-6: the
    exponent, up to -27, rounded in fp32; erf's 0.5 + 0.5 erf lost all bits below -4),
    below 1e-9 absolute beyond -6 (tiny and huge arguments), exactly 0.5 at +-0, 1 and 0 at
    +-inf, nan at nan."""
    import math

    import numpy as np
    from convmixer_ext.backends import backend_reason
    if backend_reason("triton", DEVICE) is not None:
        pytest.skip(backend_reason("triton", DEVICE))
    probe = _triton_cdf_probe()

    def cdf(x):
        y = torch.empty_like(x, device=DEVICE)
        probe[(-(-x.numel() // 1024),)](x.to(DEVICE), y, x.numel(), BLOCK=1024)
        return y.cpu().double()

    tiny = torch.logspace(-38, 0, 400, dtype=torch.float64)
    x = torch.cat([torch.linspace(-12, 12, 48001, dtype=torch.float64), tiny, -tiny,
                   torch.tensor([1e30, -3e38, 6.0, -6.0])]).float()
    ref = torch.tensor([0.5 * math.erfc(-v / math.sqrt(2)) for v in x.double().tolist()],
                       dtype=torch.float64)
    got = cdf(x)
    pos, mid, far = x >= 0, (x < 0) & (x >= -6), x < -6
    ulp = torch.from_numpy(np.spacing(ref.float().numpy())).double()
    err_pos = ((got - ref).abs() / ulp)[pos].max().item()
    err_mid = ((got - ref).abs() / ref)[mid].max().item()
    err_far = (got - ref).abs()[far].max().item()
    assert err_pos <= 2.0, f"Phi off by {err_pos:.2f} ulp for u >= 0"
    assert err_mid <= 1e-5, f"Phi off by {err_mid:.2e} (relative) on [-6, 0)"
    assert err_far <= 1e-9, f"Phi off by {err_far:.2e} below -6"
    ys = cdf(torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")]))
    assert ys[:4].tolist() == [0.5, 0.5, 1.0, 0.0] and ys[4].isnan()


def test_cuda_and_triton_kernels_share_the_normal_cdf():
    """The CUDA library's Phi (normal_cdf in csrc/fused_dw_kernels.cuh) evaluates the same
    polynomial as the Triton kernels' _cdf (docs/DESIGN.md, "Activation"): the same ten
    coefficients in the same order, and the same density constants of GELU's derivative."""
    import inspect
    import math
    import os
    import re
    from convmixer_ext import triton_kernels
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cuh = open(os.path.join(root, "csrc", "fused_dw_kernels.cuh")).read()
    body = cuh[cuh.index("kNormalCdfPoly[10] = {"):]
    body = body[:body.index("};")]
    num = r"-?\d+\.\d+(?:e-?\d+)?"
    cuda = [float(v) for v in re.findall(num + "(?=f)", body)]
    src = inspect.getsource(triton_kernels._cdf.fn)
    first = re.search(r"t = tl\.fma\(c, (" + num + "), (" + num + r")\)", src)
    triton = [float(first.group(1)), float(first.group(2))] + [
        float(v) for v in re.findall(r"t = tl\.fma\(t, c, (" + num + r")\)", src)]
    assert len(cuda) == 10 and cuda == triton, (cuda, triton)
    pdf = cuh[cuh.index("__device__ __forceinline__ float normal_pdf"):]
    a, b = (float(v) for v in re.findall(num + "(?=f)", pdf[:pdf.index("}")]))
    assert a == pytest.approx(-0.5 / math.log(2.0), rel=1e-15)
    assert b == pytest.approx(math.log2(1.0 / math.sqrt(2.0 * math.pi)), rel=1e-15)
