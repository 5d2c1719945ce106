"""Every kernel backend against the torch twin, pass by pass (docs/DESIGN.md, "Forward" and
"Backward"): F1 statistics, F2 apply, B1 dbeta/dgamma, B2 dx/dW/db — same inputs, same
dtype — with and without the input affine (docs/DESIGN.md, "Folded BN2")."""
import pytest
import torch

from conftest import DEVICE, kernel_backends
from convmixer_ext.backends import SAVES_U_BACKENDS, get_impl
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


def _dtype_layout(case):
    """The dtype and layout part of a case's test id: "float32", "bfloat16-cl"."""
    return f"{str(case[6])[6:]}{'-cl' if case[7] else ''}"


@pytest.mark.parametrize("with_affine", [False, True], ids=["plain", "in_affine"])
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[4]}-{c[5]}-{_dtype_layout(c)}")
def test_passes_match_twin(case, backend, with_affine):
    _compare_case(case, backend, 11, with_affine)


def _compare_case(case, backend, seed, with_affine, saved_u=False):
    N, C, H, W, k, act, dtype, cl = case
    x, dout, w, b, gamma, beta = pass_inputs(N, C, H, W, k, dtype, cl,
                                             torch.Generator().manual_seed(seed), DEVICE)
    # a large shift makes a wrong padding (a*0 + c instead of 0) visible
    aff = ((1.5 + torch.rand(C)).to(DEVICE), (0.5 + torch.rand(C)).to(DEVICE)) \
        if with_affine else None
    compare_passes(get_impl(backend), x, dout, w, b, gamma, beta, act, aff, dtype,
                   saved_u=saved_u)


# B2's dW work split (csrc/fused_dw_kernels.cuh, DwTasks): shapes whose tiles give a channel
# more threads than dW units, so that the units are cut into slices of the tile's row chunks
# (16x16 fp32 k=3: 5 slices; 17x18 fp32 k=9: 5 slices over ragged rows and a partial chunk;
# 16x16 bf16 channels_last k=9, 8 channels: 3 slices, two tasks for most threads)
SPLIT_CASES = [
    (1, 2, 16, 16, 3, "gelu", torch.float32, False),
    (1, 3, 17, 18, 9, "gelu", torch.float32, False),
    (1, 8, 16, 16, 9, "gelu", torch.bfloat16, True),
]


@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b != "triton"])
@pytest.mark.parametrize("case", SPLIT_CASES,
                         ids=lambda c: f"{c[2]}x{c[3]}-k{c[4]}-{_dtype_layout(c)}")
def test_dw_task_split_matches_twin(case, backend):
    _compare_case(case, backend, 12, False)


# F1 saves the convolution output u, F2, B1 and B2a read it (docs/DESIGN.md, "Saved
# convolution output"): both layouts, the input affine, a ragged tile; for the compiled
# library also its 16-byte paths (NCHW with W a multiple of 4 / 8: fp32 u stored and staged
# in 16-byte chunks; channels_last with 8 channels: chunks along C through the transpose
# buffer), two tiles along W (36 = 32 + 4), the generic (run-time k) instantiation (k = 17:
# dW's second unit of 16 tap columns per row) and B2's unrolled k = 9
SAVED_U_CASES = [
    (2, 3, 6, 7, 7, "gelu", torch.float32, False),
    (2, 3, 5, 6, 4, "gelu_tanh", torch.bfloat16, True),
    (1, 2, 5, 36, 11, "gelu", torch.float32, False),
    (1, 2, 9, 20, 17, "gelu", torch.float32, False),
    (2, 8, 6, 8, 9, "relu", torch.bfloat16, True),
    (1, 3, 7, 16, 9, "gelu", torch.float16, False),
]


@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b in SAVES_U_BACKENDS])
@pytest.mark.parametrize("case", SAVED_U_CASES,
                         ids=lambda c: f"k{c[4]}-{c[5]}-{_dtype_layout(c)}")
def test_passes_save_and_read_u(case, backend):
    _compare_case(case, backend, 13, True, saved_u=True)


def test_kernels_without_saved_u_refuse_one():
    """Launchers that recompute u in every pass (``saves_u=False``): handing them one is an
    error, not a silently ignored argument."""
    import types

    from convmixer_ext.backends import KernelBackend
    impl = KernelBackend(types.SimpleNamespace(k_stats=None))  # launchers without u
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="cannot save the convolution output"):
        impl.stats(x, torch.zeros(1, 1, 1, 1), torch.zeros(1), "gelu", None, u=x)


# The channels_last dW kernel of the CUDA-core Triton path (triton_kernels._bwd_dw_kernel):
# two tap blocks (k = 13: 169 taps in blocks of 128), a partial channel block (C = 40 = 32 +
# 8, 33 = 32 + 1), image rows cut into chunks with a ragged last one (H = 7: 3 + 3 + 1), the
# input affine's zero padding; each chunk is a partial row of its own.
DW_CASES = [
    (1, 40, 7, 5, 13, "gelu", torch.float32, True),
    (2, 33, 7, 6, 3, "relu", torch.bfloat16, True),
]


@pytest.mark.skipif("triton" not in kernel_backends(), reason="the triton backend")
@pytest.mark.parametrize("with_affine", [False, True], ids=["plain", "in_affine"])
@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: f"C{c[1]}-k{c[4]}-{_dtype_layout(c)}")
def test_channels_last_dw_kernel_matches_twin(case, with_affine, monkeypatch):
    from convmixer_ext import triton_kernels as tk
    N, C, H, W, k = case[:5]
    x = torch.empty((N, C, H, W), device="meta").to(memory_format=torch.channels_last)
    per_img = -(-C // 32) * -(-k * k // 128)
    monkeypatch.setattr(tk, "_DW_MIN_PROGRAMS", 3 * N * per_img)  # 3 chunks per image
    rows, grid, rows_per_chunk, opts = tk._dw_plan(x, k)
    assert (rows, rows_per_chunk, opts["LANES"]) == (3 * N, 3, 32)
    assert grid == (N * 3 * per_img,) and opts["TAPS"] == min(128, 1 << (k * k - 1).bit_length())
    _compare_case(case, "triton", 14, with_affine)


@pytest.mark.skipif("triton" not in kernel_backends(), reason="the triton backend")
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_triton_dw_partials_per_image(cl):
    """Where the CUDA-core Triton B2 takes dW (recorded launches on ConvMixer-1536/20's block,
    nothing runs): channels_last in its own kernel, one partial row per image (B2b's 32-
    position tiles made it 32 per image: about 1 GB at k = 9 in fp32), NCHW in B2b over its
    whole-plane tile (one row per image too)."""
    from convmixer_ext import triton_kernels as tk
    N, C, k = 64, 1536, 9
    x = torch.empty((N, C, 32, 32), device="meta")
    x = x.to(memory_format=torch.channels_last) if cl else x
    meta = dict(device="meta")
    w, vec = torch.empty((C, 1, k, k), **meta), torch.empty(C, **meta)
    launches = []
    with tk.recording(lambda kern, grid, args, kw: launches.append((kern.fn.__name__, args, kw))):
        tk.k_bwd_main(x, x, w, vec, vec, vec, vec, vec, vec, True, None, None, 0)
    names = [n for n, _, _ in launches]
    dx_kw = dict(launches[names.index("_bwd_dx_kernel")][2])
    assert (dx_kw["BLOCK_C"] == 1) is (not cl)  # B2b sums dW over one-channel tiles only
    assert ("_bwd_dw_kernel" in names) is cl
    dw_p = launches[names.index("_bwd_dw_kernel" if cl else "_bwd_dx_kernel")][1][
        4 if cl else 9]
    assert tuple(dw_p.shape) == (N, C, k * k)


@pytest.mark.skipif(DEVICE != "cpu" or "triton" not in kernel_backends(),
                    reason="Triton's interpreter (tests/conftest.py's shortcut)")
def test_interpreter_shortcuts_are_installed_and_undone_per_grid():
    """tests/conftest.py's shortcuts of Triton's interpreter (the mapping of triton.language
    once per grid and module, the numpy dtype of a type kept) are installed (a Triton whose
    interpreter changed shape would drop them silently: the suite's time, not its results),
    the results of a pass through them match the twin (above), a launch still undoes its
    grid's mapping, and a type's numpy dtype is the interpreter's own."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti
    assert ti._patch_lang._shortcut and ti._get_np_dtype._shortcut
    x = torch.randn(1, 2, 5, 6)
    get_impl("triton").stats(x, torch.randn(2, 1, 3, 3), torch.randn(2), "gelu")
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.tensor.__add__)
    for ty, want in ((tl.float32, np.float32), (tl.bfloat16, np.uint16), (tl.int1, bool),
                     (tl.block_type(tl.float16, [4, 8]), np.float16),
                     (tl.pointer_type(tl.float32), np.uint64),
                     (tl.block_type(tl.pointer_type(tl.bfloat16), [4]), np.uint64)):
        assert ti._get_np_dtype(ty) == np.dtype(want), ty
