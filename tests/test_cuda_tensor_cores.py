"""The CUDA library's F2 / eval pass on tensor cores (apply_mma_kernel, opt-in:
CONVMIXER_EXT_CUDA_TC=1 or ``Launchers(tensor_cores=True)``; docs/DESIGN.md, "CUDA tensor
cores"), executed by the host emulator (the real kernel on a GPU): the emulated MMA against
the PTX ISA's fragment layout, written out here independently of the library; the pass
against the torch twin and against the CUDA-core kernel (the same result up to summation
order: within one unit in the last place of the output) at every kernel size it takes, edge
tiles, both 16-bit dtypes, with and without the input affine; and where the planner takes
it and where not."""
import pytest
import torch

from conftest import DEVICE
from convmixer_ext import ConvMixerLayer, _env
from convmixer_ext._cmx_lib import TC_ALL, TC_ALL_FUSED, TC_F2
from convmixer_ext import torch_backend as twin
from convmixer_ext.backends import KernelBackend, backend_reason, library
from convmixer_ext.cuda_kernels import TC_MAX_KERNEL_SIZE, Launchers, tc_takes_width
from convmixer_ext.semantics import rstd_from_var
from helpers import assert_close, randomize_bn

BACKEND = "cuda" if DEVICE == "cuda" else "cuda_emu"
pytestmark = pytest.mark.skipif(backend_reason(BACKEND, DEVICE) is not None,
                                reason=f"{BACKEND} unavailable here")

F1, F2, B2 = 1 << 0, 1 << 1, 1 << 3  # the plan's mma bits of F1, F2 and B2
# one unit in the last place, relative to the largest output (8 / 11 significant bits)
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _lib():
    return library("cuda" if BACKEND == "cuda" else "emulation")[0]


def _impls(level=TC_ALL):
    """(tensor cores at ``level``: every pass that has a tensor-core kernel by default,
    CUDA cores)."""
    lib = _lib()
    return (KernelBackend(Launchers(lib, DEVICE, tensor_cores=level), saves_u=True),
            KernelBackend(Launchers(lib, DEVICE, tensor_cores=False), saves_u=True))


# ---------------------------------------------------------------- the emulated MMA
def _bits(t):
    """16-bit values as their unsigned bit patterns (int64)."""
    return t.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


@pytest.mark.skipif(BACKEND != "cuda_emu", reason="the MMA probe is the emulator's")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_emulated_mma_follows_the_ptx_fragment_layout(dtype):
    """mma.sync.aligned.m16n8k16.row.col with fp32 accumulators, as the PTX ISA lays out its
    fragments (lane = 4 * groupID + threadID_in_group): a0/a1 hold A[g][2t], A[g][2t+1] /
    A[g+8][...], a2/a3 the same at columns + 8; b0 B[2t][g], B[2t+1][g], b1 rows + 8; c0, c1
    D[g][2t], D[g][2t+1], c2, c3 row g + 8; the lower-indexed element in the low 16 bits.
    The probe's D must be C + A B (exact products, fp32 sums: within 1e-6 of the largest
    term sum), so any register or lane misplaced in the emulator shows. (The order of the two
    halves of a register is not observable through a product, where A and B share it: the
    kernel packs both alike, pack2 and cmx_ld_pair putting the first element low.)"""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(16, 16, generator=g).to(dtype)
    B = torch.randn(16, 8, generator=g).to(dtype)
    C = torch.randn(16, 8, generator=g)
    a, b = _bits(A), _bits(B)
    regs, acc = [], []
    for lane in range(32):
        gid, tig = lane // 4, lane % 4

        def pair(lo, hi):
            return int(lo) | (int(hi) << 16)
        c0 = 2 * tig
        regs.append([pair(a[gid, c0], a[gid, c0 + 1]), pair(a[gid + 8, c0], a[gid + 8, c0 + 1]),
                     pair(a[gid, c0 + 8], a[gid, c0 + 9]),
                     pair(a[gid + 8, c0 + 8], a[gid + 8, c0 + 9]),
                     pair(b[c0, gid], b[c0 + 1, gid]), pair(b[c0 + 8, gid], b[c0 + 9, gid])])
        acc.append([C[gid, c0].item(), C[gid, c0 + 1].item(), C[gid + 8, c0].item(),
                    C[gid + 8, c0 + 1].item()])
    d = _lib().mma_probe(str(dtype)[6:], regs, acc)
    D = torch.empty(16, 8, dtype=torch.float64)
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        D[gid, 2 * tig], D[gid, 2 * tig + 1] = d[lane][0], d[lane][1]
        D[gid + 8, 2 * tig], D[gid + 8, 2 * tig + 1] = d[lane][2], d[lane][3]
    ref = C.double() + A.double() @ B.double()
    terms = C.double().abs() + A.double().abs() @ B.double().abs()
    assert (D - ref).abs().max().item() <= 1e-6 * terms.max().item()


@pytest.mark.skipif(BACKEND != "cuda_emu", reason="the MMA probe is the emulator's")
def test_mma_probe_refuses_float32():
    from convmixer_ext._cmx_lib import LibraryError
    with pytest.raises(LibraryError, match="float16 or bfloat16"):
        _lib().mma_probe("float32", [[0] * 6] * 32, [[0.0] * 4] * 32)


# ---------------------------------------------------------------- the pass
# (N, C, H, W, k): a whole 32 x 32 plane, ragged edge tiles (H 40 / 9, W 24 / 48), every
# kernel size class (1, even, unrolled 3 / 5 / 7 / 9, generic 13, the largest 17: two
# MMA k-steps)
CASES = [(2, 3, 32, 32, 3), (1, 2, 40, 24, 9), (1, 2, 9, 48, 7), (2, 2, 16, 16, 1),
         (1, 2, 20, 16, 4), (1, 3, 33, 40, 5), (1, 2, 24, 32, 13), (1, 2, 35, 40, 17)]


def _inputs(N, C, H, W, k, dtype, affine, g):
    x = torch.randn(N, C, H, W, generator=g).to(DEVICE, dtype)
    w = (torch.randn(C, 1, k, k, generator=g) / k).to(DEVICE, dtype)
    b = (0.1 * torch.randn(C, generator=g)).to(DEVICE, dtype)
    aff = ((1.5 + torch.randn(C, generator=g).abs()).to(DEVICE),
           (0.5 + torch.randn(C, generator=g).abs()).to(DEVICE)) if affine else None
    return x, w, b, aff


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "in_affine"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}x{}x{}x{}-k{}".format(*c))
def test_f2_on_tensor_cores_matches_twin_and_cuda_cores(case, dtype, affine, act):
    N, C, H, W, k = case
    g = torch.Generator().manual_seed(7)
    x, w, b, aff = _inputs(N, C, H, W, k, dtype, affine, g)
    tc, cc = _impls()
    assert tc.k.plan(x, k, 0, affine).mma == F2, "F2 must take the tensor-core kernel here"
    assert cc.k.plan(x, k, 0, affine).mma == 0
    mean_t, var_t = twin.stats(x, w, b, act, aff)
    rstd = rstd_from_var(var_t, 1e-5)
    gamma = (1 + 0.3 * torch.randn(C, generator=g)).to(DEVICE)
    beta = (0.2 * torch.randn(C, generator=g)).to(DEVICE)
    out = tc.apply(x, w, b, mean_t, rstd, gamma, beta, act, aff)
    assert out.dtype == dtype and out.stride() == x.stride()
    assert_close(out, twin.apply(x, w, b, mean_t, rstd, gamma, beta, act, aff), dtype, "F2")
    ref = cc.apply(x, w, b, mean_t, rstd, gamma, beta, act, aff)
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= ULP[dtype] * ref.double().abs().max().item(), err


# (N, C, H, W, k, dtype): image counts that are and are not multiples of the images per
# block, a ragged edge tile (H 40, W 24), the generic k, both dtypes
IMG_CASES = [(5, 2, 32, 32, 3, torch.bfloat16), (4, 2, 40, 24, 9, torch.float16),
             (3, 1, 20, 16, 13, torch.bfloat16)]


@pytest.mark.parametrize("case", IMG_CASES, ids=lambda c: "{}x{}x{}x{}-k{}".format(*c))
def test_f2_taking_several_images_a_block_changes_no_bit(case, monkeypatch):
    """images_per_block (CONVMIXER_EXT_CUDA_TC_IMAGES): a block takes its tile in several
    images one after another, the next one's halo on its way (cp.async, which the emulator
    lands only at the kernel's wait: a missing wait reads the other image's halo) while it
    convolves one. Every output is the one-image kernel's, bit for bit; the grid has a block
    per group of images, and the second halo buffer more shared memory; with the input
    affine it keeps one image a block."""
    N, C, H, W, k, dtype = case
    g = torch.Generator().manual_seed(11)
    x, w, b, _ = _inputs(N, C, H, W, k, dtype, False, g)
    mean = (0.1 * torch.randn(C, generator=g)).to(DEVICE)
    rstd = (1 + torch.rand(C, generator=g)).to(DEVICE)
    gamma = (1 + 0.3 * torch.randn(C, generator=g)).to(DEVICE)
    beta = (0.2 * torch.randn(C, generator=g)).to(DEVICE)
    lib, tiles = _lib(), -(-H // 32) * -(-W // 32)

    def impl(images):
        return KernelBackend(Launchers(lib, DEVICE, tensor_cores=TC_F2, images_per_block=images),
                             saves_u=True)
    one = impl(1)
    ref = one.apply(x, w, b, mean, rstd, gamma, beta, "gelu")
    plan1 = one.k.plan(x, k, 0, False)
    assert plan1.mma == F2 and plan1.blocks[1] == N * C * tiles
    for images in (2, 3, N + 4):
        many = impl(images)
        plan = many.k.plan(x, k, 0, False)
        groups = -(-N // min(images, N))
        assert plan.mma == F2 and plan.blocks[1] == groups * C * tiles, images
        assert plan.smem[1] > plan1.smem[1] if groups < N else plan.smem[1] == plan1.smem[1]
        out = many.apply(x, w, b, mean, rstd, gamma, beta, "gelu")
        assert torch.equal(_bits(out), _bits(ref)), images
        assert many.k.plan(x, k, 0, True).blocks[1] == N * C * tiles  # the input affine
    monkeypatch.setenv(_env.CUDA_TC_IMAGES_VAR, "2")  # what a Launchers without a value reads
    default = KernelBackend(Launchers(lib, DEVICE, tensor_cores=TC_F2), saves_u=True)
    assert default.k.plan(x, k, 0, False).blocks[1] == -(-N // 2) * C * tiles
    assert torch.equal(_bits(default.apply(x, w, b, mean, rstd, gamma, beta, "gelu")),
                       _bits(ref))


def test_images_per_block_refuses_what_is_not_a_count(monkeypatch):
    from convmixer_ext.cuda_kernels import shape_of
    x = torch.zeros(2, 4, 16, 16, dtype=torch.bfloat16)
    for bad in (0, -1, 1.5, True, 2**31):
        with pytest.raises(ValueError, match="images_per_block must be an int >= 1"):
            shape_of(x, 3, 0, False, images_per_block=bad)
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv(_env.CUDA_TC_IMAGES_VAR, bad)
        with pytest.raises(ValueError, match="CONVMIXER_EXT_CUDA_TC_IMAGES must be an integer"):
            _env.cuda_tc_images()
    monkeypatch.setenv(_env.CUDA_TC_IMAGES_VAR, "")
    assert _env.cuda_tc_images() == 1


def test_tensor_cores_only_where_the_kernel_takes_the_shape():
    """The planner takes apply_mma_kernel for F2, stats_mma_kernel for F1 and bwd_mma_kernel
    for B2 only for 16-bit x in NCHW on the 16-byte path, k <= 17, and only when asked: F2
    without a saved u (at the default level), F1 saving it and B2 reading it (at "all"), B2
    only to k = 16; B1 keeps its kernels."""
    tc, cc = _impls()
    bf = torch.bfloat16

    def mma(x, k=3, saved_u=False, impl=tc, affine=False):
        return impl.k.plan(x, k, 0, affine, saved_u=saved_u).mma

    x = torch.zeros(2, 4, 16, 16, dtype=bf, device=DEVICE)
    assert mma(x) == F2 and mma(x, 17) == F2
    assert mma(x, impl=cc) == 0                                        # not asked
    assert mma(x, 18) == 0 and mma(x, 19) == 0                         # halo beyond 8 columns
    # the largest k it takes is the one "auto" sends to the library for 16-bit NCHW eval
    assert mma(x, TC_MAX_KERNEL_SIZE) == F2 and mma(x, TC_MAX_KERNEL_SIZE + 1) == 0
    assert mma(x, 9, saved_u=True) == F1 | B2                          # F2 reads u: no conv
    assert mma(x, 16, saved_u=True) == F1 | B2
    assert mma(x, 17, saved_u=True) == F1 and mma(x, 18, saved_u=True) == 0  # dW: 16 taps
    assert mma(x, 9, saved_u=True, affine=True) == F1 | B2
    assert mma(x, 9, affine=True) == F2
    assert mma(x, 9, saved_u=True, impl=cc) == 0
    f2_only = _impls(TC_F2)[0]                                         # the default level
    assert mma(x, 9, saved_u=True, impl=f2_only) == 0 and mma(x, impl=f2_only) == F2
    assert mma(x, 9, impl=f2_only) == F2 and mma(x, 9) == F2              # F1 saving u only
    assert mma(x, impl=_impls(True)[0]) == F2                          # True: that level
    for bad in (x.float(), x.to(memory_format=torch.channels_last),
                torch.zeros(2, 4, 16, 12, dtype=bf, device=DEVICE)):
        assert mma(bad, 9, saved_u=True) == 0
    assert mma(x.float()) == 0                                         # fp32: exact FMA
    assert mma(x.to(memory_format=torch.channels_last)) == 0           # channels_last
    assert mma(torch.zeros(2, 4, 16, 12, dtype=bf, device=DEVICE)) == 0  # W % 8 != 0
    # the widths auto counts on (cuda_kernels.tc_takes_width) are the planner's
    for W in (8, 12, 16, 20, 24):
        got = mma(torch.zeros(2, 4, 16, W, dtype=bf, device=DEVICE)) == F2
        assert got == tc_takes_width(W), W
    off = torch.zeros(2 * 4 * 16 * 16 + 1, dtype=bf, device=DEVICE)[1:].view(2, 4, 16, 16)
    assert mma(off) == 0                                               # misaligned
    plan = tc.k.plan(x, 3, 0, False)
    assert plan.blocks[1] == 2 * 4 * 1 and plan.threads[1] == 64       # a block per plane tile
    plan = tc.k.plan(torch.zeros(3, 4, 40, 72, dtype=bf, device=DEVICE), 9, 0, False,
                     saved_u=True)
    for i in (0, 3):  # F1 and B2: a block and a partial row per image and 32 x 32 tile
        assert plan.blocks[i] == 3 * 4 * 2 * 3 and plan.threads[i] == 64
        assert plan.partial_rows[i] == 3 * 2 * 3
    # B2's du pass (its buffer) where B2 is on tensor cores at "all" and an image has
    # several tiles (2 x 3 here; one row or column of them is enough); none at "all-fused",
    # on an image of one tile, nor where B2 runs on CUDA cores
    fused = _impls(TC_ALL_FUSED)[0]
    assert plan.du == 1
    for H, W in ((33, 32), (32, 40)):
        xt = torch.zeros(1, 2, H, W, dtype=bf, device=DEVICE)
        assert tc.k.plan(xt, 9, 0, False, saved_u=True).du == 1
        assert mma(xt, 9, saved_u=True, impl=fused) == F1 | B2
        assert fused.k.plan(xt, 9, 0, False, saved_u=True).du == 0
    assert tc.k.plan(torch.zeros(1, 2, 32, 32, dtype=bf, device=DEVICE), 9, 0, False,
                     saved_u=True).du == 0
    xt = torch.zeros(1, 2, 40, 40, dtype=bf, device=DEVICE)
    assert tc.k.plan(xt, 9, 0, True, saved_u=True).du == 1            # with the input affine
    for impl, k in ((tc, 17), (cc, 9), (f2_only, 9)):
        assert impl.k.plan(xt, k, 0, False, saved_u=True).du == 0, k


def test_the_switch_reaches_the_layer(monkeypatch):
    """A ConvMixerLayer's eval forward runs on the tensor-core kernel by default (the shape
    the library gets asks for it; the result within one unit in the last place of the
    CUDA-core one); CONVMIXER_EXT_CUDA_TC=0: nothing asks, =1 as unset, =all asks for B2
    too; other values are refused with the variable's name."""
    from convmixer_ext import cuda_kernels
    asked = []
    real = cuda_kernels.shape_of

    def spy(*a, **kw):
        asked.append(kw.get("tensor_cores", False))
        return real(*a, **kw)
    monkeypatch.setattr(cuda_kernels, "shape_of", spy)
    torch.manual_seed(0)
    layer = ConvMixerLayer(8, 9, backend=BACKEND).to(DEVICE, torch.bfloat16).eval()
    randomize_bn(layer)
    x = torch.randn(2, 8, 16, 40, device=DEVICE, dtype=torch.bfloat16)  # 2 tiles a plane
    monkeypatch.setenv(_env.CUDA_TC_VAR, "0")
    with torch.no_grad():
        ref = layer(x)
    assert asked and not any(asked)
    for on in ("1", None):
        asked.clear()
        if on is None:
            monkeypatch.delenv(_env.CUDA_TC_VAR)
        else:
            monkeypatch.setenv(_env.CUDA_TC_VAR, on)
        with torch.no_grad():
            out = layer(x)
        assert asked and all(asked), on
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= ULP[torch.bfloat16] * ref.double().abs().max().item()
    # training at k = 9 saves u: its B2 asks for tensor cores at "all" (level 2) and
    # "all-fused" (3) alone, and its gradients are the CUDA-core B2's up to the split's
    # rounding (and the two levels' bit for bit: du's own pass, two tiles a plane here,
    # against du on each tile's halo)
    layer.train()
    grads = {}
    for level, want in (("1", 1), (" all ", 2), ("all-fused", 3)):
        monkeypatch.setenv(_env.CUDA_TC_VAR, level)
        asked.clear()
        xs = x.clone().requires_grad_()
        layer.zero_grad()
        layer(xs).float().square().sum().backward()
        assert set(asked) == {want}, (level, asked)
        grads[level] = [xs.grad, layer[0].fn[0].weight.grad]
    for a, b_, c_ in zip(*grads.values()):
        assert_close(a, b_, torch.bfloat16, "B2 on tensor cores against CUDA cores")
        assert torch.equal(b_, c_)
    monkeypatch.setenv(_env.CUDA_TC_VAR, "yes")
    with pytest.raises(ValueError, match=f"{_env.CUDA_TC_VAR} must be 0, 1, all or "
                                         "all-fused"), torch.no_grad():
        layer(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input_never_vanishes_and_results_repeat(bad):
    """A non-finite x reaches every output the CUDA-core kernel's does (an MMA also
    multiplies the band's zeros by it, so more of its rows: docs/DESIGN.md, "CUDA tensor
    cores"), never fewer; finite inputs give bitwise-identical outputs run after run (no
    atomics, a fixed order of MMAs)."""
    g = torch.Generator().manual_seed(9)
    x, w, b, _ = _inputs(1, 2, 16, 16, 5, torch.bfloat16, False, g)
    tc, cc = _impls()
    C = x.shape[1]
    args = (torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE),
            torch.ones(C, device=DEVICE), torch.zeros(C, device=DEVICE), "gelu", None)
    first = tc.apply(x, w, b, *args)
    assert torch.equal(first, tc.apply(x, w, b, *args))
    x[0, 1, 7, 9] = bad
    out, ref = tc.apply(x, w, b, *args), cc.apply(x, w, b, *args)
    bad_ref, bad_out = ~torch.isfinite(ref), ~torch.isfinite(out)
    assert bad_ref.any() and bad_out[bad_ref].all()
    assert torch.isfinite(out[0, 0]).all()  # the other channel is untouched


# ---------------------------------------------------------------- B2
# (k <= 16: dW's taps along one MMA tile's 16 rows; k = 16 the largest, even, two MMA tiles
# of its 8 taps i)
B2_CASES = [c for c in CASES if c[-1] <= 16] + [(1, 2, 20, 24, 16)]


def _b2_inputs(case, dtype, g):
    N, C, H, W, k = case
    x, w, b, _ = _inputs(N, C, H, W, k, dtype, False, g)
    dout = torch.randn(N, C, H, W, generator=g).to(DEVICE, dtype)
    gamma = (1 + 0.3 * torch.randn(C, generator=g)).to(DEVICE)
    beta = (0.2 * torch.randn(C, generator=g)).to(DEVICE)
    return x, dout, w, b, gamma, beta


def _b2_three_ways(tc, cc, x, dout, w, b, gamma, act, aff, dtype):
    """B2 of the tensor-core launchers ``tc``, of the CUDA-core ones ``cc`` and of the single
    launch ("all-fused") on one set of inputs (statistics and sums from the CUDA-core F1 and
    B1, no batch-statistics terms): the single launch stages the same fp32 du as du's own
    pass (taken where an image has several tiles) stores, so its gradients are ``tc``'s bit
    for bit; dx within one unit in the last place of the CUDA-core one. Returns ``tc``'s and
    ``cc``'s (dx, dW, db, input affine's gradients)."""
    k, (H, W) = w.shape[-1], x.shape[-2:]
    u = torch.empty_like(x, dtype=torch.float32)
    mean, var = cc.stats(x, w, b, act, aff, u=u)
    rstd = rstd_from_var(var, 1e-5)
    dbeta, dgamma = cc.bwd_reduce(dout, x, w, b, mean, rstd, act, aff, u=u)
    args = (dout, x, w, b, mean, rstd, gamma, dbeta, dgamma, False, act, aff)
    got, want = tc.bwd_main(*args, u=u), cc.bwd_main(*args, u=u)
    fused = _impls(TC_ALL_FUSED)[0]
    affine = aff is not None
    assert fused.k.plan(x, k, 0, affine, saved_u=True).du == 0
    assert tc.k.plan(x, k, 0, affine, saved_u=True).du == int(H > 32 or W > 32)

    def flat(r):
        return r[:3] + (tuple(r[3]) if affine else ())
    for a, b_ in zip(flat(fused.bwd_main(*args, u=u)), flat(got), strict=True):
        assert torch.equal(a, b_)
    err = (got[0].double() - want[0].double()).abs().max().item()
    assert err <= ULP[dtype] * want[0].double().abs().max().item(), err
    return got, want


@pytest.mark.parametrize("dtype, act", [(torch.bfloat16, "gelu"), (torch.float16, "gelu"),
                                        (torch.bfloat16, "relu")], ids=["bf16", "fp16", "relu"])
@pytest.mark.parametrize("case", B2_CASES, ids=lambda c: "{}x{}x{}x{}-k{}".format(*c))
def test_b2_on_tensor_cores_matches_twin_and_cuda_cores(case, dtype, act):
    """bwd_mma_kernel (B2 reading the saved u): every pass against the twin (dx in the
    dtype's tolerance, dW and db in fp32's: du enters the MMAs as two 16-bit terms, docs/
    DESIGN.md, "Numerics of B2"), with batch statistics and without; and dx within one unit
    in the last place of the CUDA-core kernel's (the same sums in another order), and dW and
    db in fp32's tolerance of it without batch statistics (with them, BN's projection makes
    dW a sum that cancels to a fraction of its terms, which compare_passes holds against
    the twin)."""
    from helpers import compare_passes
    g = torch.Generator().manual_seed(11)
    x, dout, w, b, gamma, beta = _b2_inputs(case, dtype, g)
    k = case[-1]
    tc, cc = _impls()
    assert tc.k.plan(x, k, 0, False, saved_u=True).mma == F1 | B2, "F1 and B2 on tensor cores"
    assert cc.k.plan(x, k, 0, False, saved_u=True).mma == 0
    compare_passes(tc, x, dout, w, b, gamma, beta, act, None, dtype, saved_u=True)
    (dx, dw, db, _), (dx_c, dw_c, db_c, _) = _b2_three_ways(tc, cc, x, dout, w, b, gamma, act,
                                                            None, dtype)
    # ... and rounds to the same 16-bit value almost everywhere: only where the fp32 sums sit
    # at a rounding boundary (du's high term alone would move ~half of them by an ulp)
    differ = (dx != dx_c).double().mean().item()
    assert differ <= 0.01, differ
    assert_close(dw, dw_c, torch.float32, "dW against CUDA cores")
    assert_close(db, db_c, torch.float32, "db against CUDA cores")


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "in_affine"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}x{}x{}x{}-k{}".format(*c))
def test_f1_on_tensor_cores_matches_twin_and_cuda_cores(case, dtype, affine):
    """stats_mma_kernel (F1 saving u): the saved u and the statistics against the twin and
    the CUDA-core kernel (products exact, fp32 sums in another order: fp32's tolerance),
    every element of u written (the buffer starts as NaN), a partial row per image and tile
    whose counts sum to the batch's."""
    N, C, H, W, k = case
    g = torch.Generator().manual_seed(14)
    x, w, b, aff = _inputs(N, C, H, W, k, dtype, affine, g)
    tc, cc = _impls()
    assert tc.k.plan(x, k, 0, affine, saved_u=True).mma & F1
    u = torch.full(x.shape, float("nan"), device=DEVICE)
    u_c = torch.full(x.shape, float("nan"), device=DEVICE)
    mean_p, m2_p, count_p = tc.k.k_stats(x, w, b, *(aff or (None, None)), 0, u=u)
    assert count_p.sum().item() == N * H * W
    mean, var = tc.stats(x, w, b, "gelu", aff, u=u)
    mean_c, var_c = cc.stats(x, w, b, "gelu", aff, u=u_c)
    mean_t, var_t = twin.stats(x, w, b, "gelu", aff)
    assert torch.isfinite(u).all()
    assert_close(u, twin.conv_u(x, w, b, aff), torch.float32, "F1 saved u")
    assert_close(u, u_c, torch.float32, "F1 saved u against CUDA cores")
    for got, want, what in ((mean, mean_t, "mean"), (var, var_t, "var"),
                            (mean, mean_c, "mean against CUDA cores"),
                            (var, var_c, "var against CUDA cores")):
        assert_close(got, want, torch.float32, f"F1 {what}")


@pytest.mark.parametrize("gamma_scale", [1e-7, 1e6], ids=["tiny-du", "huge-du"])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # dx: inf, as the twin's
def test_b2_on_tensor_cores_keeps_fp32_range_in_float16(gamma_scale):
    """float16 has 5 exponent bits: du from a BN gamma of 1e-7 falls below its normal range
    and from 1e6 beyond its largest value. Each block scales its halo's du by a power of two
    before splitting it, so dW and db keep the fp32 tolerance; the images' du 2^16 apart (a
    scale per block, not per launch)."""
    g = torch.Generator().manual_seed(12)
    x, dout, w, b, gamma, _ = _b2_inputs((2, 2, 40, 24, 7), torch.float16, g)
    gamma = gamma * gamma_scale
    dout[0] *= 2.0**-8
    dout[1] *= 2.0**8
    tc, _ = _impls()
    u = twin.conv_u(x, w, b, None).contiguous()
    mean, var = twin.stats(x, w, b, "gelu", None)
    rstd = rstd_from_var(var, 1e-5)
    dbeta, dgamma = twin.bwd_reduce(dout, x, w, b, mean, rstd, "gelu", None)
    # (no batch-statistics terms: they would mix the images)
    args = (dout, x, w, b, mean, rstd, gamma, dbeta, dgamma, False, "gelu", None)
    assert tc.k.plan(x, 7, 0, False, saved_u=True).mma & B2
    _, dw, db, _ = tc.bwd_main(*args, u=u)
    _, dw_t, db_t, _ = twin.bwd_main(*args, u=u)
    for got, want, what in ((dw, dw_t, "B2 dW"), (db, db_t, "B2 db")):
        m = want.abs().max()  # relative to their own magnitude (assert_close floors at 1e-2)
        assert 0 < m < float("inf")
        assert_close(got / m, want / m, torch.float32, what)


def _b2_unit(case, seed):
    """bf16 B2 inputs for ``case`` with the twin's saved u and unit statistics (mean 0, rstd
    1): (x, dout, w, b, gamma, u, mean, rstd)."""
    g = torch.Generator().manual_seed(seed)
    x, dout, w, b, gamma, _ = _b2_inputs(case, torch.bfloat16, g)
    C = x.shape[1]
    return (x, dout, w, b, gamma, twin.conv_u(x, w, b, None).contiguous(),
            torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE))


def test_b2_on_tensor_cores_repeats_and_keeps_non_finite_du():
    """Bitwise-identical gradients run after run (fixed-order sums, no atomics); a
    non-finite dout reaches dx and dW as the CUDA-core kernel's does."""
    x, dout, w, b, gamma, u, mean, rstd = _b2_unit((1, 2, 16, 24, 5), 13)
    tc, cc = _impls()
    z = torch.zeros(x.shape[1], device=DEVICE)

    def run(impl, d):
        return impl.bwd_main(d, x, w, b, mean, rstd, gamma, z, z, False, "gelu", None, u=u)
    first, again = run(tc, dout), run(tc, dout)
    for a, b_ in zip(first[:3], again[:3]):
        assert torch.equal(a, b_)
    dout[0, 1, 7, 9] = float("inf")
    (dx, dw, _, _), (dx_c, dw_c, _, _) = run(tc, dout), run(cc, dout)
    assert not torch.isfinite(dx_c[0, 1]).all() and not torch.isfinite(dw_c[1]).all()
    assert (~torch.isfinite(dx[~torch.isfinite(dx_c)])).all()
    assert not torch.isfinite(dw[1]).all()
    assert torch.isfinite(dx[0, 0]).all() and torch.isfinite(dw[0]).all()  # the other channel


def test_b2_du_pass_refuses_a_missing_buffer():
    """Where the plan asks for B2's du pass (plan.du), a launch without its buffer is refused
    with an error naming it, nothing written: the library never stores through NULL."""
    from convmixer_ext import _cmx_lib as abi
    x, dout, w, b, gamma, u, mean, rstd = _b2_unit((1, 2, 40, 16, 5), 15)
    C = x.shape[1]
    tc, _ = _impls()
    shape, rows, inputs, plan = tc.k._setup(x, w, b, None, None, 0, "B2", dout, u)
    assert plan.du == 1
    inputs.dout, inputs.mean, inputs.rstd, inputs.gamma = (
        t.data_ptr() for t in (dout, mean, rstd, gamma))
    dx = torch.full_like(x, 7.0)
    dw_p, db_p = torch.empty(rows, C, 25, device=DEVICE), torch.empty(rows, C, device=DEVICE)
    outputs = abi.Outputs(y=dx.data_ptr(), dw_p=dw_p.data_ptr(), db_p=db_p.data_ptr())
    with pytest.raises(ValueError, match="du is NULL"):
        tc.k._run("cmx_bwd_main", x, shape, inputs, outputs)
    assert (dx == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [(2, 3, 32, 32, 3), (1, 2, 40, 24, 9), (1, 3, 33, 40, 5),
                                  (1, 2, 20, 24, 16)],
                         ids=lambda c: "{}x{}x{}x{}-k{}".format(*c))
def test_b2_on_tensor_cores_with_the_input_affine(case, dtype):
    """bwd_mma_kernel with the folded input a x + c: dW = a (du * X) + c (du * M) with the
    in-image mask M's MMAs beside x's, dx = a (dout + the correlation), and the tile's sums
    for d(in_scale) and d(in_shift): every pass against the twin (compare_passes, batch
    statistics and not), against the CUDA-core kernel (dx within one unit in the last place,
    dW, db and the affine's gradients in fp32's tolerance: the same sums in another order),
    and images of several tiles (du's own pass) bitwise the single launch's."""
    from helpers import compare_passes
    g = torch.Generator().manual_seed(16)
    N, C, H, W, k = case
    x, w, b, aff = _inputs(N, C, H, W, k, dtype, True, g)
    dout = torch.randn(N, C, H, W, generator=g).to(DEVICE, dtype)
    gamma = (1 + 0.3 * torch.randn(C, generator=g)).to(DEVICE)
    beta = (0.2 * torch.randn(C, generator=g)).to(DEVICE)
    tc, cc = _impls()
    assert tc.k.plan(x, k, 0, True, saved_u=True).mma & B2
    compare_passes(tc, x, dout, w, b, gamma, beta, "gelu", aff, dtype, saved_u=True)
    (_, dw, db, (dsc, dsh)), (_, dw_c, db_c, (dsc_c, dsh_c)) = _b2_three_ways(
        tc, cc, x, dout, w, b, gamma, "gelu", aff, dtype)
    for got, want, what in ((dw, dw_c, "dW"), (db, db_c, "db"), (dsc, dsc_c, "d(in_scale)"),
                            (dsh, dsh_c, "d(in_shift)")):
        assert_close(got, want, torch.float32, f"{what} against CUDA cores")
