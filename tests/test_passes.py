"""Every kernel backend against the torch twin, pass by pass (docs/DESIGN.md, "Forward" and
"Backward"): F1 statistics, F2 apply, B1 dbeta/dgamma, B2 dx/dW/db — same inputs, same
dtype — with and without the input affine (docs/DESIGN.md, "Folded BN2")."""
import pytest
import torch

from conftest import DEVICE, kernel_backends
from convmixer_ext import torch_backend
from convmixer_ext.backends import get_impl
from convmixer_ext.semantics import rstd_from_var
from helpers import assert_close

# (N, C, H, W, k, activation, dtype, channels_last)
CASES = [
    (2, 3, 6, 7, 3, "gelu", torch.float32, False),
    (2, 3, 6, 7, 7, "gelu_tanh", torch.float32, True),
    (1, 2, 9, 6, 9, "relu", torch.float32, False),
    (2, 2, 5, 5, 6, "gelu", torch.float32, True),      # even k
    (1, 2, 6, 7, 11, "gelu", torch.float32, False),    # generic path
    (2, 3, 6, 5, 9, "gelu", torch.bfloat16, False),
    (2, 3, 6, 5, 5, "relu", torch.float16, True),
]


def _tensors(N, C, H, W, k, dtype, cl):
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = (r(N, C, H, W) + 0.2).to(dtype)
    dout = r(N, C, H, W).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
        dout = dout.contiguous(memory_format=torch.channels_last)
    w = (r(C, 1, k, k) / k).to(dtype)
    b = (0.1 * r(C)).to(dtype)
    gamma, beta = 1 + 0.3 * r(C), 0.2 * r(C)
    return [t.to(DEVICE) for t in (x, dout, w, b, gamma, beta)]


@pytest.mark.parametrize("with_affine", [False, True], ids=["plain", "in_affine"])
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[4]}-{c[5]}-{str(c[6])[6:]}{'-cl' if c[7] else ''}")
def test_passes_match_twin(case, backend, with_affine):
    N, C, H, W, k, act, dtype, cl = case
    x, dout, w, b, gamma, beta = _tensors(N, C, H, W, k, dtype, cl)
    # a large shift makes a wrong padding (a*0 + c instead of 0) visible
    aff = ((1.5 + torch.rand(C)).to(DEVICE), (0.5 + torch.rand(C)).to(DEVICE)) \
        if with_affine else None
    impl, twin = get_impl(backend), torch_backend
    f32 = torch.float32  # every pass computes in fp32; only stored outputs are rounded

    mean, var = impl.stats(x, w, b, act, aff)
    mean_t, var_t = twin.stats(x, w, b, act, aff)
    assert_close(mean, mean_t, f32, "F1 mean")
    assert_close(var, var_t, f32, "F1 var")

    rstd = rstd_from_var(var_t, 1e-5)
    out = impl.apply(x, w, b, mean_t, rstd, gamma, beta, act, aff)
    out_t = twin.apply(x, w, b, mean_t, rstd, gamma, beta, act, aff)
    assert out.dtype == dtype and out.stride() == x.stride()
    assert_close(out, out_t, dtype, "F2 out")

    dbeta, dgamma = impl.bwd_reduce(dout, x, w, b, mean_t, rstd, act, aff)
    dbeta_t, dgamma_t = twin.bwd_reduce(dout, x, w, b, mean_t, rstd, act, aff)
    assert_close(dbeta, dbeta_t, f32, "B1 dbeta")
    assert_close(dgamma, dgamma_t, f32, "B1 dgamma")

    for batch_stats in (True, False):
        dx, dw, db, d_aff = impl.bwd_main(dout, x, w, b, mean_t, rstd, gamma, dbeta_t,
                                         dgamma_t, batch_stats, act, aff)
        dx_t, dw_t, db_t, d_aff_t = twin.bwd_main(dout, x, w, b, mean_t, rstd, gamma, dbeta_t,
                                                 dgamma_t, batch_stats, act, aff)
        assert dx.dtype == dtype and dx.stride() == x.stride()
        assert_close(dx, dx_t, dtype, f"B2 dx (batch_stats={batch_stats})")
        assert_close(dw, dw_t, f32, f"B2 dW (batch_stats={batch_stats})")
        assert_close(db, db_t, f32, f"B2 db (batch_stats={batch_stats})")
        assert (d_aff is None) == (d_aff_t is None) == (aff is None)
        if aff is not None:
            assert_close(d_aff[0], d_aff_t[0], f32, "B2 d(in_scale)")
            assert_close(d_aff[1], d_aff_t[1], f32, "B2 d(in_shift)")
