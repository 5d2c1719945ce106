"""torch.library.opcheck of the custom ops (schemas, fake implementations, autograd
registration, torch.compile tracing) on every backend that implements them here."""
import pytest
import torch

from conftest import DEVICE, kernel_backends
from convmixer_ext.backends import OPS, SAVES_U_BACKENDS

DW = ["torch"] + kernel_backends()
PW = [b for b in DW if "pointwise" in OPS[b]]


# save_u: F1 saves the convolution output, returned as a fourth output and saved for backward
DW_SAVE = [(b, False) for b in DW] + [(b, True) for b in DW if b in SAVES_U_BACKENDS]


@pytest.mark.parametrize("backend, save_u", DW_SAVE)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("with_affine", [False, True], ids=["plain", "in_affine"])
def test_depthwise_opcheck(backend, save_u, batch_stats, with_affine):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    x, w, b, gamma, beta = r(2, 3, 5, 4), r(3, 1, 3, 3) / 3, 0.1 * r(3), 1 + 0.2 * r(3), r(3)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    aff = (1 + 0.3 * r(3), 0.2 * r(3)) if with_affine else (None, None)
    for t in (x, w, b, gamma, beta) + (aff if with_affine else ()):
        t.requires_grad_()
    args = (x, w, b, gamma, beta, rm, rv, *aff, batch_stats, 1e-5, "gelu", backend, save_u)
    torch.library.opcheck(torch.ops.convmixer_ext.dw_block_fwd.default, args)


@pytest.mark.parametrize("backend", PW)
def test_pointwise_opcheck(backend):
    torch.manual_seed(0)
    y = torch.randn(2, 4, 3, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 4, 1, 1, device=DEVICE, requires_grad=True)
    b = torch.randn(6, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.convmixer_ext.pw_act_fwd.default,
                          (y, w, b, "gelu", backend))
