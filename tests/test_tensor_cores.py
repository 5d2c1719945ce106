"""The "triton_tc" backend: every depthwise convolution of F1, F2/eval, B1 and B2 (du, the
transposed convolution and dW) as GEMMs on tensor cores (docs/DESIGN.md, "Tensor cores"), pass
by pass against the torch twin. With 16-bit x and weights every forward product is exact in
fp32; B2's fp32 du enters its GEMMs as two 16-bit terms (16 or 22 significant bits), so the
results are the CUDA-core ones up to summation order and that split: the fp32 tolerances of
every other kernel hold (compare_passes), and fail with du rounded once. Under the interpreter
the GEMMs run on fp32 copies of the 16-bit operands (its dot mishandles 16-bit ones); the
tensor-core instruction itself is checked by the real-target compile (tests/test_targets.py)
and a GPU run."""
import copy

import pytest
import torch

from conftest import DEVICE
from convmixer_ext import ConvMixerLayer, fused_dwconv_block
from convmixer_ext.backends import backend_reason, get_impl, resolve_backend
from helpers import assert_close, compare_models, compare_passes, layer_pair, pass_inputs

try:
    from convmixer_ext import triton_kernels as tk
except ImportError:  # no triton: every test here is skipped (pytestmark)
    tk = None

pytestmark = pytest.mark.skipif(backend_reason("triton_tc", DEVICE) is not None,
                                reason=f"triton_tc unavailable here: "
                                       f"{backend_reason('triton_tc', DEVICE)}")
bf16, f16 = torch.bfloat16, torch.float16

# (N, C, H, W, k, dtype, channels_last, input affine): 16- and 32-wide tiles, ragged edge
# tiles in both directions, several tiles, even k, k = 1 and the largest k; several images
# per program (their tiles stacked along the GEMMs' M: 2 of 32 rows, 4 of 16) with a short
# last group
CASES = [
    (2, 3, 7, 6, 3, bf16, False, False),     # one 16x16 tile, mostly padding; 2 images
    (3, 2, 20, 35, 9, bf16, False, True),    # 2 images of 32 rows, the second group short
    (5, 2, 9, 10, 5, f16, False, False),     # 4 images of 16 rows, the second group short
    (6, 1, 17, 12, 4, f16, True, True),      # 2 images of 32 rows, 3 groups, channels_last
    (1, 2, 20, 35, 9, bf16, False, True),    # 32x32 tiles, W ragged (32 + 3)
    (2, 3, 9, 10, 4, f16, True, False),      # even k, channels_last
    (1, 2, 33, 17, 7, f16, False, True),     # H ragged (32 + 1), TW 32 over W 17
    (1, 2, 12, 12, 16, bf16, True, False),   # even k, KP = 32
    (1, 3, 6, 5, 1, bf16, True, True),       # k = 1
    (1, 1, 18, 17, 31, bf16, False, True),   # k = 31, KP = 64
    (1, 2, 19, 40, 21, f16, True, False),    # k >= 19: B2's 32-column GEMMs, two tiles in W
]


def _ids(c):
    return f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-k{c[4]}-{str(c[5])[6:]}{'-cl' if c[6] else ''}" \
        f"{'-aff' if c[7] else ''}"


def _tensors(N, C, H, W, k, dtype, cl, aff):
    """pass_inputs, and the input affine drawn after them from the same generator."""
    g = torch.Generator().manual_seed(3)
    x, dout, w, b, gamma, beta = pass_inputs(N, C, H, W, k, dtype, cl, g, DEVICE)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    affine = (1.5 + r(C).abs(), 0.5 + r(C).abs()) if aff else None
    return x, dout, w, b, gamma, beta, affine


def _tilings(cases):
    """(case, tiling): every case in the default tiling, and each case of several images in
    every other tiling that stacks a different number of them per program (the warps'
    variants, "2w" / "4w", are the same program to the interpreter)."""
    if tk is None:
        return [pytest.param(c, "1", id=_ids(c)) for c in cases]
    out = []
    for c in cases:
        seen = set()
        for spec in ("1", "2", "4"):
            with tk.tensor_core_tiling(spec):
                img = tk.geometry((c[0], c[1], c[2], c[3]), (0, 0, 0, 1), tc=True)[-1]
            if img not in seen:
                seen.add(img)
                out.append(pytest.param(c, spec, id=f"{_ids(c)}-img{img}"))
    return out


# saved_u: F1 saves the convolution output and F2, B1, B2a read it (docs/DESIGN.md, "Saved
# convolution output"), in cases of one image and two per program, both layouts, the input
# affine
SAVED_U_CASES = [CASES[1], CASES[3], CASES[9]]


@pytest.mark.parametrize("case, tiling, saved_u", [
    pytest.param(*p.values, saved, id=p.id + ("-saved_u" if saved else ""))
    for saved, cases in ((False, CASES), (True, SAVED_U_CASES)) for p in _tilings(cases)])
def test_tensor_core_passes_match_twin(case, tiling, saved_u):
    N, C, H, W, k, dtype, cl, aff = case
    x, dout, w, b, gamma, beta, affine = _tensors(*case)
    with tk.tensor_core_tiling(tiling):
        compare_passes(get_impl("triton_tc"), x, dout, w, b, gamma, beta, "gelu", affine,
                       dtype, saved_u=saved_u)


def test_tensor_core_tiling_stacks_what_the_batch_and_64_rows_allow():
    """The tilings' images per program: the spec's, at most the batch (as a power of two)
    and 64 GEMM rows; the warps of one image, or one per 16 rows; a bad spec is refused."""
    g = lambda N, H: tk.geometry((N, 8, H, 20), (0, 0, 0, 1), tc=True)  # noqa: E731
    for spec, N, H, want in (("1", 8, 32, (2, 1)), ("2", 8, 32, (2, 2)), ("4", 8, 32, (2, 2)),
                             ("4", 8, 16, (1, 4)), ("4", 3, 16, (1, 4)), ("4", 2, 16, (1, 2)),
                             ("2", 1, 32, (2, 1)), ("2w", 8, 32, (4, 2)),
                             ("4w", 8, 16, (4, 4))):
        with tk.tensor_core_tiling(spec):
            geo = g(N, H)
        assert (geo[4], geo[5]) == want, (spec, N, H, geo)
        assert geo[3] == geo[5] * geo[0] * geo[1]
    # the default again, "2": 2 images of 32 rows
    assert tk.DEFAULT_TC_TILING == "2"
    assert tk.geometry((8, 8, 32, 32), (0, 0, 0, 1), tc=True)[-1] == 2
    with pytest.raises(ValueError, match="spec must be one of"):
        with tk.tensor_core_tiling("3"):
            pass


def _b2_splits(x):
    """Whether the tensor-core B2a stores du split for x (triton_kernels._split_du)."""
    tile = tk._plan(x, tc=True)[3]
    return tk._split_du(x, True, tile)


def _b2_args(x, dout, w, b, gamma, aff, batch_stats):
    """bwd_main's arguments with the twin's statistics and B1 sums."""
    from convmixer_ext import torch_backend as twin
    from convmixer_ext.semantics import rstd_from_var
    mean, var = twin.stats(x, w, b, "gelu", aff)
    rstd = rstd_from_var(var, 1e-5)
    dbeta, dgamma = twin.bwd_reduce(dout, x, w, b, mean, rstd, "gelu", aff)
    return (dout, x, w, b, mean, rstd, gamma, dbeta, dgamma, batch_stats, "gelu", aff)


@pytest.mark.parametrize("tiling", ["1", "2"])
@pytest.mark.parametrize("gamma_scale", [1e-7, 1e6], ids=["tiny-du", "huge-du"])
@pytest.mark.parametrize("H, split", [(33, False), (20, True)], ids=["b2b-scales", "b2a-scales"])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # dx: inf, as the twin's
def test_tensor_core_b2_keeps_fp32_range_in_float16(H, split, gamma_scale, tiling):
    """float16 has 5 exponent bits: du (fp32) from a BN gamma of 1e-7 falls below its normal
    range (a plain float16 split keeps ~3 of its bits: dW off by ~15%) and from 1e6 beyond
    its largest value (inf). B2 scales each program's du by a power of two first, so dW and
    db keep the fp32 tolerance; with two images per program ("2") the scale covers both,
    the second's du 2^16 times the first's (a scale from the first alone overflows). Two
    tiles per image (H = 33): B2b scales each halo of the fp32 scratch; one (H = 20): B2a
    scales its tile, which is B2b's whole halo, and stores the terms."""
    from convmixer_ext import torch_backend as twin
    x, dout, w, b, gamma, beta, _ = _tensors(2, 2, H, 17, 7, f16, False, False)
    with tk.tensor_core_tiling(tiling):
        assert _b2_splits(x) == split
    gamma = gamma * gamma_scale
    dout[0] *= 2.0**-8
    dout[1] *= 2.0**8
    # du = gamma rstd dout act'(u) (no batch-statistics terms: they would mix the images)
    args = _b2_args(x, dout, w, b, gamma, None, False)
    with tk.tensor_core_tiling(tiling):
        _, dw, db, _ = get_impl("triton_tc").bwd_main(*args)
    _, dw_t, db_t, _ = twin.bwd_main(*args)
    for got, want, what in ((dw, dw_t, "B2 dW"), (db, db_t, "B2 db")):
        m = want.abs().max()  # relative to their own magnitude (assert_close floors at 1e-2)
        assert 0 < m < float("inf")
        assert_close(got / m, want / m, torch.float32, what)


@pytest.mark.parametrize("tiling", ["1", "2"])
def test_tensor_core_float16_b2_is_the_same_split_or_not(tiling, monkeypatch):
    """float16 B2 where each image is one tile: B2a scales du and stores its 16-bit terms,
    B2b reads them; with the fp32 scratch (what larger images take) B2b scales its halo and
    splits: the same scale (the tile is the halo), the same terms, the same GEMMs, so dx, dW
    and db are bitwise equal. Batch statistics on, the input affine, two images per
    program at "2" (one scale over both), du of different magnitudes in each."""
    x, dout, w, b, gamma, beta, aff = _tensors(3, 2, 20, 17, 7, f16, False, True)
    dout[0] *= 2.0**-12
    dout[2] *= 2.0**10
    args = _b2_args(x, dout, w, b, gamma, aff, True)
    impl = get_impl("triton_tc")
    with tk.tensor_core_tiling(tiling):
        assert _b2_splits(x)
        split = impl.bwd_main(*args)
        monkeypatch.setattr(tk, "_split_du", lambda *a: False)
        unsplit = impl.bwd_main(*args)
    flat = lambda r: [r[0], r[1], r[2], *r[3]]  # dx, dW, db, (dscale, dshift)  # noqa: E731
    for a, b_ in zip(flat(split), flat(unsplit), strict=True):
        assert torch.equal(a, b_)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # 0 * inf, on purpose
def test_tensor_core_non_finite_values_never_vanish():
    """A banded GEMM multiplies every input column of a tile row by the band's zeros, so a
    non-finite x or du reaches the tile rows that read it (documented, docs/DESIGN.md,
    "Tensor cores"): never a finite result where the reference has none, and rows away from
    it keep the reference's values. The windows start up to 7 (x) or 3 (fp32 du) columns
    early (16-byte aligned loads): column 29 is read by the tile at w0 = 32 too."""
    from convmixer_ext import torch_backend as twin
    x, dout, w, b, gamma, beta, _ = _tensors(1, 1, 16, 64, 3, bf16, False, False)
    x_inf = x.clone()
    x_inf[0, 0, 5, 29] = float("inf")
    dout[0, 0, 9, 29] = float("inf")
    mean, rstd = torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE)
    impl = get_impl("triton_tc")
    out = impl.apply(x_inf, w, b, mean, rstd, gamma, beta, "gelu", None)
    out_t = twin.apply(x_inf, w, b, mean, rstd, gamma, beta, "gelu", None)
    z = torch.zeros(1, device=DEVICE)
    args = (dout, x, w, b, mean, rstd, gamma, z, z, False, "gelu", None)
    dx, dx_t = impl.bwd_main(*args)[0], twin.bwd_main(*args)[0]
    for got, want, row, what in ((out, out_t, 5, "F2 out"), (dx, dx_t, 9, "B2 dx")):
        bad = ~torch.isfinite(want)
        assert bad.any() and not torch.isfinite(got[bad]).any(), what
        away = torch.ones(16, dtype=torch.bool)
        away[row - 1:row + 2] = False  # the rows a k = 3 window at that row reaches
        assert torch.isfinite(got[..., away, :]).all(), what
        assert_close(got[..., away, :], want[..., away, :], bf16, what)


def test_a_later_triton_interpret_changes_no_launch(monkeypatch):
    """triton.jit fixed whether these kernels are interpreted when it defined them; the
    launchers and the availability check follow that, not TRITON_INTERPRET at launch time
    (a test that set it for its subprocesses, left set, once sent a GPU's compiled launches
    down the interpreter's path: fp32 operands, which triton 3.6 refused to compile)."""
    was = tk.triton_interpreter()
    assert was == (type(tk._apply_kernel).__name__ == "InterpretedFunction")
    x, dout, w, b, gamma, beta, _ = _tensors(1, 2, 16, 20, 3, bf16, False, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0" if was else "1")
    assert tk.triton_interpreter() == was
    assert backend_reason("triton_tc", DEVICE) is None
    assert tk.targets_gpu(x) is (DEVICE == "cuda")
    assert tk._conv_kw(x, w, True)["TC"] == (1 if DEVICE == "cuda" else 2)
    if DEVICE == "cuda":  # (on the CPU, triton's own lazy imports read the variable too)
        compare_passes(get_impl("triton_tc"), x, dout, w, b, gamma, beta, "gelu", None, bf16)


def test_tensor_core_results_are_bitwise_reproducible():
    """Same inputs, same outputs and gradients, to the bit (fixed-order partial sums; no
    atomics)."""
    x, dout, w, b, gamma, beta, aff = _tensors(1, 2, 20, 35, 9, bf16, False, True)
    runs = []
    for _ in range(2):
        xs = x.detach().clone().requires_grad_()
        params = [t.detach().clone().requires_grad_() for t in (w, b, gamma, beta, *aff)]
        rm, rv = torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE)
        out = fused_dwconv_block(xs, *params[:4], rm, rv, None, training=True,
                                 backend="triton_tc", in_affine=tuple(params[4:]))
        out.backward(dout)
        runs.append([out, xs.grad, rm, rv] + [p.grad for p in params])
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def test_tensor_core_layer_matches_reference():
    """ConvMixerLayer(backend="triton_tc") in bf16: outputs, every gradient and the running
    statistics after two training steps, as accurate as the reference in bf16 (the
    tolerance of compare_models widened by that reference's own error)."""
    ref, fused = layer_pair(3, 9, "gelu", "triton_tc", bf16, DEVICE)
    x = torch.randn(2, 3, 11, 13, generator=torch.Generator().manual_seed(2)).to(DEVICE, bf16)
    ref_lowp = copy.deepcopy(ref).to(bf16)  # the same weights, in bf16, on the CPU
    compare_models(ref, fused, x, bf16, train=True, steps=2, ref_lowp=ref_lowp)


def test_tensor_core_backend_refuses_float32_and_auto_takes_it_for_16_bit_nchw_only(
        monkeypatch):
    x = torch.randn(1, 2, 5, 5, device=DEVICE)
    w = torch.randn(2, 1, 3, 3, device=DEVICE)
    v = torch.ones(2, device=DEVICE)
    with pytest.raises(TypeError, match="float16 or bfloat16.*backend='triton' or 'cuda'"):
        fused_dwconv_block(x, w, v, v, v, backend="triton_tc")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ConvMixerLayer(2, 3, backend="triton_tc").to(DEVICE)(x)
    # "auto" on this device: the tensor cores for 16-bit NCHW on a GPU (measured fastest
    # there at every k; in eval up to k = 17 the CUDA library's), never for fp32 or
    # channels_last, never off a GPU
    monkeypatch.delenv("CONVMIXER_EXT_CUDA_TC", raising=False)
    for k in (1, 3, 9, 31):
        for dtype in (bf16, f16, torch.float32):
            for cl in (False, True):
                for training in (False, True):
                    got = resolve_backend("auto", torch.device(DEVICE), dtype, k,
                                          channels_last=cl, training=training)
                    if DEVICE == "cuda" and dtype != torch.float32 and not cl:
                        want = "triton_tc" if training or k > 17 else "cuda"
                        assert got == want, (k, dtype, cl, training, got)
                    else:
                        assert got != "triton_tc", (k, dtype, cl, training, got)


@pytest.mark.parametrize("k, KP, XO, CW", [(3, 32, 7, 16), (9, 32, 4, 16), (4, 16, 0, 16),
                                           (31, 64, 1, 32)])
@pytest.mark.parametrize("flip", [False, True])
def test_toeplitz_operands_match_their_definition(k, KP, XO, CW, flip):
    """The launcher's Toeplitz operands (a reversed Hankel view of the zero-padded weight
    rows, copied) against their definition written element by element: ``T[c, i, q, j] =
    W[c, i, q - XO - j]`` inside the band (W with its columns reversed for B2's transposed
    convolution), 0 outside."""
    from convmixer_ext.triton_kernels import _toeplitz
    C = 3
    w = torch.randn(C, 1, k, k, generator=torch.Generator().manual_seed(k)).to(DEVICE, bf16)
    wc = w.float().cpu().reshape(C, k, k)
    if flip:
        wc = wc.flip(-1)
    want = torch.zeros(C, k, KP, CW)
    for q in range(KP):
        for j in range(CW):
            if 0 <= q - XO - j < k:
                want[:, :, q, j] = wc[:, :, q - XO - j]
    got = _toeplitz(w, KP, XO, CW, flip).float().cpu().reshape(C, k, KP, CW)
    assert torch.equal(got, want)
