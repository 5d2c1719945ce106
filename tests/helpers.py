"""Shared test helpers: tolerances (one place), model pairs, comparisons."""
import copy

import torch

from convmixer_ext import ConvMixerLayer
from convmixer_ext.reference import conv_mixer_layer

# Tolerance per dtype, relative to the largest magnitude of the expected tensor.
# float64: the twin and the reference differ only by summation order.
# float32: fp32 accumulation of k*k taps and N*H*W-long reductions (observed <1e-5).
# bfloat16 / float16: inputs and outputs rounded to 8 / 11 mantissa bits, plus the
# unfused pointwise half running in that dtype.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _maxerr(a, b):
    a, b = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
    return (a - b).abs().max().item() if b.numel() else 0.0


def assert_close(actual, expected, dtype, what="", slack=None, scale=None):
    """max|actual - expected| <= TOL[dtype] * scale (+ 4 * slack: the error of the reference
    model itself run in ``dtype``, when given — "as accurate as PyTorch in that dtype").
    ``scale`` (default: the largest magnitude of ``expected``) may be raised by the caller to
    the magnitude of the terms ``expected`` sums, where they cancel."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}: finiteness"
    # floor: quantities that cancel to ~0 by construction (e.g. the conv-bias gradient under
    # batch statistics) are held to an absolute error of TOL * 1e-2, not relative to ~0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-2, scale or 0.0)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    bound = TOL[dtype] * scale + (4 * slack if slack is not None else 0.0)
    assert err <= bound, (f"{what}: max abs err {err:.3g} > {TOL[dtype]:.1g} * {scale:.3g}"
                          f" + 4 * {slack} ({dtype})")


def randomize_bn(module, seed=0):
    """Non-trivial BN affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                C = m.num_features
                if m.affine:
                    m.weight.copy_(1 + 0.5 * torch.randn(C, generator=g))
                    m.bias.copy_(0.5 * torch.randn(C, generator=g))
                if m.track_running_stats:
                    m.running_mean.copy_(0.3 * torch.randn(C, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(C, generator=g))


def layer_pair(C, k, activation="gelu", backend="torch", dtype=torch.float32, device="cpu",
               momentum=0.1, seed=0):
    """(reference layer in float64, fused layer in ``dtype``) with identical weights."""
    torch.manual_seed(seed)
    ref = conv_mixer_layer(C, k, activation, momentum=momentum)
    randomize_bn(ref, seed)
    fused = ConvMixerLayer(C, k, activation, momentum=momentum, backend=backend)
    fused.load_state_dict(ref.state_dict())
    fused = fused.to(device=device, dtype=dtype)
    # the reference gets the fused model's (possibly rounded) values, in float64
    ref = copy.deepcopy(ref)
    ref.load_state_dict({n: t.to(torch.float64) if t.is_floating_point() else t
                         for n, t in fused.state_dict().items()})
    ref = ref.double()
    return ref, fused


def run_step(model, x, seed, train=True):
    """One forward/backward with a fixed upstream gradient (standard normal of the output's
    shape from ``seed``); returns (out, x.grad)."""
    model.train(train)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(probe.to(device=out.device, dtype=out.dtype))
    return out, x.grad


def _device(model):
    """Where a model's parameters are (references are built on the CPU; the model under test
    is on DEVICE)."""
    return next(model.parameters()).device


def _grads(model):
    return {name: None if p.grad is None else p.grad.detach().clone()
            for name, p in model.named_parameters()}


def compare_models(ref, fused, x, dtype, train=True, steps=1, seed=1, check_grads=True,
                   ref_lowp=None):
    """Run both models ``steps`` times; compare outputs, input and parameter gradients
    and all buffers (running statistics, num_batches_tracked). ``ref_lowp``: the reference
    in ``dtype`` on the CPU; its own error widens the bound (see assert_close). That error
    is a sample of a random rounding walk (per step it varies several-fold with the data),
    so each quantity's slack is the largest over all steps."""
    runs, slack = [], {}
    for step in range(steps):
        ref.zero_grad()
        fused.zero_grad()
        out_r, dx_r = run_step(ref, x.to(device=_device(ref), dtype=torch.float64), seed + step,
                               train)
        out_f, dx_f = run_step(fused, x, seed + step, train)
        grads_r = _grads(ref) if check_grads else {}
        grads_f = _grads(fused) if check_grads else {}
        runs.append((out_r, dx_r, grads_r, out_f, dx_f, grads_f))
        if ref_lowp is not None:
            ref_lowp.zero_grad()
            out_l, dx_l = run_step(ref_lowp, x.to(_device(ref_lowp)), seed + step, train)
            errs = {"out": _maxerr(out_l, out_r), "x.grad": _maxerr(dx_l, dx_r)}
            if check_grads:
                errs.update({n: _maxerr(g, grads_r[n]) for n, g in _grads(ref_lowp).items()
                             if g is not None})
            slack = {n: max(e, slack.get(n, 0.0)) for n, e in errs.items()}
    for step, (out_r, dx_r, grads_r, out_f, dx_f, grads_f) in enumerate(runs):
        assert out_f.dtype == x.dtype
        assert_close(out_f, out_r, dtype, f"step {step} out", slack.get("out"))
        if check_grads:
            assert_close(dx_f, dx_r, dtype, f"step {step} x.grad", slack.get("x.grad"))
            for name, g_r in grads_r.items():
                if g_r is None:  # frozen in the reference: frozen in the fused model too
                    assert grads_f.get(name) is None, f"unexpected gradient for {name}"
                    continue
                assert grads_f.get(name) is not None, f"no gradient for {name}"
                assert_close(grads_f[name], g_r, dtype, f"step {step} {name}.grad",
                             slack.get(name))
    for (name, b_r), (_, b_f) in zip(ref.named_buffers(), fused.named_buffers()):
        if b_r.is_floating_point():
            assert_close(b_f, b_r, dtype, name)
        else:
            assert torch.equal(b_f.cpu(), b_r.cpu()), name


def pass_inputs(N, C, H, W, k, dtype, channels_last, g, device):
    """(x, dout, w, b, gamma, beta) for a pass-by-pass comparison, drawn from generator ``g``
    (callers may draw more from it after), x and dout in ``dtype`` and the layout asked for,
    on ``device``."""
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = (r(N, C, H, W) + 0.2).to(dtype)
    dout = r(N, C, H, W).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dout = dout.contiguous(memory_format=torch.channels_last)
    w = (r(C, 1, k, k) / k).to(dtype)
    b = (0.1 * r(C)).to(dtype)
    gamma, beta = 1 + 0.3 * r(C), 0.2 * r(C)
    return [t.to(device) for t in (x, dout, w, b, gamma, beta)]


def like_x(x, dtype, fill, offset=None):
    """A tensor of ``dtype`` filled with ``fill`` with x's shape, strides and storage offset
    (so that a misaligned x gets a misaligned one: the saved convolution output shares x's
    strides, and the kernels' 16-byte path must then be off for it too), or ``offset``."""
    offset = x.storage_offset() if offset is None else offset
    n = x.untyped_storage().nbytes() // x.element_size() - x.storage_offset() + offset
    buf = torch.full((n,), fill, dtype=dtype, device=x.device)
    return buf.as_strided(x.shape, x.stride(), offset)


def compare_passes(impl, x, dout, w, b, gamma, beta, act, aff, dtype, saved_u=False,
                   u_offset=None):
    """Every pass of a kernel backend against the torch twin on the same inputs (docs/
    DESIGN.md, "Forward" and "Backward"): F1 statistics, F2 output, B1 sums, B2 gradients
    (with batch statistics and without), the input affine's gradients when there is one.
    Every pass computes in fp32; only stored outputs are rounded to ``dtype``.
    ``saved_u``: F1 saves the convolution output (checked against the twin's, every element
    written); the later passes then get another u (F1's plus noise, with the statistics of
    its activation), twin and kernels alike: a pass that recomputed u instead of reading
    it would miss the change. ``u_offset``: u's storage offset (default: x's)."""
    from convmixer_ext import torch_backend as twin
    from convmixer_ext.semantics import act_fwd, rstd_from_var
    f32 = torch.float32
    u = {}
    if saved_u:
        saved = like_x(x, f32, float("nan"), u_offset)
        u = {"u": saved}
    mean, var = impl.stats(x, w, b, act, aff, **u)
    mean_t, var_t = twin.stats(x, w, b, act, aff)
    assert_close(mean, mean_t, f32, "F1 mean")
    assert_close(var, var_t, f32, "F1 var")
    if saved_u:
        assert saved.stride() == x.stride()
        assert_close(saved, twin.conv_u(x, w, b, aff), f32, "F1 saved u")
        g = torch.Generator().manual_seed(5)
        u = {"u": like_x(x, f32, 0.0, u_offset).copy_(
            saved + 0.5 * torch.randn(x.shape, generator=g).to(saved.device))}
        var_t, mean_t = torch.var_mean(act_fwd(u["u"], act), dim=(0, 2, 3), correction=0)

    rstd = rstd_from_var(var_t, 1e-5)
    out = impl.apply(x, w, b, mean_t, rstd, gamma, beta, act, aff, **u)
    out_t = twin.apply(x, w, b, mean_t, rstd, gamma, beta, act, aff, **u)
    assert out.dtype == dtype and out.stride() == x.stride()
    assert_close(out, out_t, dtype, "F2 out")

    dbeta, dgamma = impl.bwd_reduce(dout, x, w, b, mean_t, rstd, act, aff, **u)
    dbeta_t, dgamma_t = twin.bwd_reduce(dout, x, w, b, mean_t, rstd, act, aff, **u)
    assert_close(dbeta, dbeta_t, f32, "B1 dbeta")
    assert_close(dgamma, dgamma_t, f32, "B1 dgamma")

    for batch_stats in (True, False):
        dx, dw, db, d_aff = impl.bwd_main(dout, x, w, b, mean_t, rstd, gamma, dbeta_t,
                                         dgamma_t, batch_stats, act, aff, **u)
        dx_t, dw_t, db_t, d_aff_t = twin.bwd_main(dout, x, w, b, mean_t, rstd, gamma, dbeta_t,
                                                 dgamma_t, batch_stats, act, aff, **u)
        assert dx.dtype == dtype and dx.stride() == x.stride()
        assert_close(dx, dx_t, dtype, f"B2 dx (batch_stats={batch_stats})")
        assert_close(dw, dw_t, f32, f"B2 dW (batch_stats={batch_stats})")
        assert_close(db, db_t, f32, f"B2 db (batch_stats={batch_stats})")
        assert (d_aff is None) == (d_aff_t is None) == (aff is None)
        if aff is not None:
            assert_close(d_aff[0], d_aff_t[0], f32, "B2 d(in_scale)")
            assert_close(d_aff[1], d_aff_t[1], f32, "B2 d(in_shift)")
