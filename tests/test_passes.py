"""Every kernel backend against the torch twin, pass by pass (docs/DESIGN.md, "Forward" and
"Backward"): F1 statistics, F2 apply, B1 dbeta/dgamma, B2 dx/dW/db — same inputs, same
dtype — with and without the input affine (docs/DESIGN.md, "Folded BN2")."""
import pytest
import torch

from conftest import DEVICE, kernel_backends
from convmixer_ext.backends import get_impl
from helpers import compare_passes, pass_inputs

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


@pytest.mark.parametrize("with_affine", [False, True], ids=["plain", "in_affine"])
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[4]}-{c[5]}-{str(c[6])[6:]}{'-cl' if c[7] else ''}")
def test_passes_match_twin(case, backend, with_affine):
    N, C, H, W, k, act, dtype, cl = case
    x, dout, w, b, gamma, beta = pass_inputs(N, C, H, W, k, dtype, cl,
                                             torch.Generator().manual_seed(11), DEVICE)
    # a large shift makes a wrong padding (a*0 + c instead of 0) visible
    aff = ((1.5 + torch.rand(C)).to(DEVICE), (0.5 + torch.rand(C)).to(DEVICE)) \
        if with_affine else None
    compare_passes(get_impl(backend), x, dout, w, b, gamma, beta, act, aff, dtype)
