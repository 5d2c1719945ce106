"""Every code path of the CUDA kernels, executed (host emulator on the CPU; the real kernels
on a GPU) and compared pass by pass with the torch twin: NCHW and channels_last, the 16-byte
vector path and the element path it falls back to (W or C not a multiple of the vector
width, a misaligned storage offset), several channel blocks with a partial last one, several
spatial tiles with ragged edge tiles, the tile shrink for large k in channels_last, unrolled
and generic kernel sizes, even k, with and without the input affine, and blocks that take
one (image, tile) item or many (the reductions' parts, merged in order), recomputing the
convolution output in every pass or saving it in F1 for the others to read (at x's storage
offset: misaligned with it). Each case asserts the path the library's planner takes, so a
case cannot silently test another one."""
import pytest
import torch

from conftest import DEVICE
from convmixer_ext import torch_backend
from convmixer_ext.backends import KernelBackend, backend_reason, get_impl, library
from convmixer_ext.cuda_kernels import Launchers
from convmixer_ext.semantics import ACTIVATIONS
from helpers import assert_close, compare_passes, like_x

BACKEND = "cuda" if DEVICE == "cuda" else "cuda_emu"
pytestmark = pytest.mark.skipif(backend_reason(BACKEND, DEVICE) is not None,
                                reason=f"{BACKEND} unavailable here")

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

# (N, C, H, W, k, dtype, layout, offset, expect_vec, channel blocks > 1, tiles > 1)
CASES = [
    (2, 3, 8, 36, 9, f32, "nchw", 0, True, False, True),      # W-tiles 32 + ragged 4
    (1, 5, 32, 32, 7, f32, "nchw", 0, True, True, False),     # 3 channel blocks, last partial
    (2, 5, 40, 16, 7, bf16, "nchw", 0, True, True, True),     # 16-bit chunks, H-tiles 32 + 8
    (2, 3, 9, 7, 5, f32, "nchw", 0, False, False, False),     # W not a multiple of 4
    (2, 3, 6, 12, 3, f16, "nchw", 0, False, False, False),    # W % 4 == 0 but not % 8
    (2, 3, 8, 8, 3, f32, "nchw", 1, False, False, False),     # misaligned storage offset
    (2, 20, 9, 10, 5, f32, "cl", 0, True, True, False),       # chunks of 4 channels, 12 + 8
    (2, 40, 6, 7, 3, bf16, "cl", 0, True, True, False),       # chunks of 8 channels, 32 + 8
    (2, 5, 7, 6, 9, f32, "cl", 0, False, False, False),       # odd C: element path
    (2, 8, 6, 7, 3, f32, "cl", 1, False, False, False),       # CL, misaligned offset
    (1, 16, 34, 33, 4, f32, "cl", 0, True, True, True),       # even k, ragged tiles, chunks
    (1, 3, 12, 13, 11, f16, "nchw", 0, False, False, False),  # generic k
    (1, 8, 12, 12, 11, f32, "cl", 0, True, False, False),     # generic k, CL chunks
    (1, 8, 20, 20, 13, bf16, "cl", 0, False, True, False),    # large k: CL without chunks
    (1, 8, 40, 40, 31, f32, "cl", 0, False, True, True),      # k = 31, CL
    (1, 2, 35, 33, 31, f32, "nchw", 0, False, False, True),   # k = 31, NCHW, ragged tiles
]


def _ids(c):
    N, C, H, W, k, dt, lay, off = c[:8]
    return f"{N}x{C}x{H}x{W}-k{k}-{str(dt)[6:]}-{lay}{'-off' if off else ''}"


def _make(N, C, H, W, dtype, layout, offset, g):
    """A tensor of these values in this layout, at a storage offset of `offset` elements."""
    vals = torch.randn(N, C, H, W, generator=g)
    shape = (N, H, W, C) if layout == "cl" else (N, C, H, W)
    buf = torch.empty(vals.numel() + offset, dtype=dtype, device=DEVICE)
    t = buf[offset:].view(shape)
    t.copy_(vals.permute(0, 2, 3, 1) if layout == "cl" else vals)
    return t.permute(0, 3, 1, 2) if layout == "cl" else t


def _audited(lib, fn):
    """(fn(), the emulator's prefetch audit of what fn ran)."""
    lib.prefetch_audit_start()
    try:
        out = fn()
    finally:
        audit = lib.prefetch_audit_stop()
    return out, audit


def _impl(target_blocks):
    """The backend, with reductions split for about ``target_blocks`` blocks (1: each block
    takes every item of its channel block, and F2 stays on CUDA cores, where 16-bit NCHW on
    the 16-byte path takes the tensor cores by default; 0: the library's defaults)."""
    if target_blocks == 0:
        return get_impl(BACKEND)
    lib = library("cuda" if BACKEND == "cuda" else "emulation")[0]
    return KernelBackend(Launchers(lib, DEVICE, target_blocks, tensor_cores=False),
                         saves_u=True)


@pytest.mark.parametrize("saved_u", [False, True], ids=["recompute", "saved_u"])
@pytest.mark.parametrize("target_blocks", [0, 1], ids=["parts", "one-part"])
@pytest.mark.parametrize("with_affine", [False, True], ids=["plain", "in_affine"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_paths_match_twin(case, with_affine, target_blocks, saved_u):
    N, C, H, W, k, dtype, layout, offset, vec, multi_cb, multi_tile = case
    g = torch.Generator().manual_seed(5)
    x = _make(N, C, H, W, dtype, layout, offset, g)
    dout = _make(N, C, H, W, dtype, layout, offset, g)
    assert x.storage_offset() == offset
    assert x.is_contiguous(memory_format=torch.channels_last if layout == "cl"
                           else torch.contiguous_format)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    w = (r(C, 1, k, k) / k).to(dtype)
    b = (0.1 * r(C)).to(dtype)
    gamma, beta = 1 + 0.3 * r(C), 0.2 * r(C)
    aff = (1.5 + r(C).abs(), 0.5 + r(C).abs()) if with_affine else None
    impl = _impl(target_blocks)
    plan = impl.k.plan(x, k, 0, with_affine, saved_u=saved_u)
    assert bool(plan.vec) == vec, "the case no longer takes the path it is named for"
    assert (max(plan.channels_per_block) < C) == multi_cb
    assert (plan.tile_h < H or plan.tile_w < W) == multi_tile
    items = N * -(-H // plan.tile_h) * -(-W // plan.tile_w)
    assert plan.partial_rows[3] == (1 if target_blocks == 1 else items)  # one part: all items
    # F2 on tensor cores by default where its kernel takes the shape (16-bit NCHW, 16 bytes)
    tc_shape = dtype != f32 and layout == "nchw" and vec and not saved_u and k <= 17
    assert bool(plan.mma & 2) == (tc_shape and target_blocks == 0)

    compare_passes(impl, x, dout, w, b, gamma, beta, "gelu", aff, dtype, saved_u=saved_u)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_kernel_paths_with_a_misaligned_saved_u_alone(layout):
    """x 16-byte aligned but the saved u one float past an alignment (same strides): the
    library must read and write u without 16-byte accesses (the sanitizer tier reports any
    misaligned one) and give the twin's results."""
    g = torch.Generator().manual_seed(6)
    C = 8
    x = _make(2, C, 6, 8, f32, layout, 0, g)
    dout = _make(2, C, 6, 8, f32, layout, 0, g)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    w, b = r(C, 1, 7, 7) / 7, 0.1 * r(C)
    impl = get_impl(BACKEND)
    assert impl.k.plan(x, 7, 0, False, saved_u=True).vec  # x alone would take 16 bytes
    compare_passes(impl, x, dout, w, b, 1 + 0.3 * r(C), 0.2 * r(C), "gelu", None, f32,
                   saved_u=True, u_offset=1)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "strided"])
def test_kernel_paths_saved_u_apply_elementwise_only_on_a_dense_x(layout, dense):
    """F2 reading the saved u runs element by element (apply_u_kernel) where x is dense in
    its layout, and the tiled kernel where it is not (here x dense in another dimension
    order, which the C ABI's strides allow: H outside C for NCHW's W-contiguous rows, W
    outside H for channels_last's C-contiguous positions), with the twin's results either
    way; the emulator's audit tells the two apart (the tiled kernel prefetches what it
    stages, the elementwise one stages nothing)."""
    g = torch.Generator().manual_seed(11)
    N, C, H, W = 2, 8, 6, 8

    def make():
        if dense:
            return _make(N, C, H, W, f32, layout, 0, g)
        if layout == "cl":  # memory order N, W, H, C
            return torch.randn(N, W, H, C, generator=g).to(DEVICE).permute(0, 3, 2, 1)
        return torch.randn(N, H, C, W, generator=g).to(DEVICE).permute(0, 2, 1, 3)
    x, dout = make(), make()
    assert x.is_contiguous(memory_format=torch.channels_last if layout == "cl"
                           else torch.contiguous_format) == dense
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    w, b = r(C, 1, 7, 7) / 7, 0.1 * r(C)
    lib = library("cuda" if BACKEND == "cuda" else "emulation")[0]
    impl = KernelBackend(Launchers(lib, DEVICE, prefetch=True), saves_u=True)
    assert impl.k.plan(x, 7, 0, False, saved_u=True).vec
    compare_passes(impl, x, dout, w, b, 1 + 0.3 * r(C), 0.2 * r(C), "gelu", None, f32,
                   saved_u=True)
    if BACKEND != "cuda_emu":
        return
    u = like_x(x, f32, 0.5)
    mean, rstd = torch.zeros(C), torch.ones(C)
    _, audit = _audited(lib, lambda: impl.apply(x, w, b, mean, rstd, torch.ones(C),
                                                torch.zeros(C), "gelu", None, u=u))
    assert (audit["prefetches"] == 0) == dense, audit


def test_activation_ids_reach_the_kernels():
    """Each activation gives its own result through the library (ids agree end to end)."""
    impl = get_impl(BACKEND)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g).to(DEVICE)
    w, b = (torch.randn(4, 1, 3, 3, generator=g) / 3).to(DEVICE), torch.zeros(4).to(DEVICE)
    for act in ACTIVATIONS:
        assert_close(impl.stats(x, w, b, act)[0], torch_backend.stats(x, w, b, act)[0],
                     f32, act)


VEC_CASES = [c for c in CASES if c[8]]
# (case, parts of F1): one part, and two where there are several tiles (>= 4 items)
PREFETCH_CASES = [(c, 1) for c in VEC_CASES] + [(c, 2) for c in VEC_CASES if c[10]]


@pytest.mark.skipif(BACKEND != "cuda_emu", reason="the prefetch audit is the emulator's")
@pytest.mark.parametrize("saved_u", [False, True], ids=["recompute", "saved_u"])
@pytest.mark.parametrize("case, parts", PREFETCH_CASES,
                         ids=[f"{_ids(c)}-{p}-part{'s' * (p > 1)}" for c, p in PREFETCH_CASES])
def test_prefetch_covers_every_staged_load(case, saved_u, parts):
    """Pass by pass: every 16-byte load a block stages finds its 128-byte line prefetched
    into L2 by that block beforehand (the first item's lines before any staging, each next
    item's while the previous one computes), and the block loads every line it prefetches:
    the prefetched rectangles are the staged ones, and no block looks past its part's last
    item. Blocks take many items (one part, or F1's two), with the input affine (B2 stages
    the raw x too). F1 saving u prefetches nothing (its register cap; docs/DESIGN.md,
    "L2 prefetch"); reading it, F2 (element by element) and B1 in NCHW (loading u and dout
    directly) stage nothing. F2 on CUDA cores throughout (16-bit NCHW F2 runs on tensor cores
    by default: a block per tile, its halo staged once, nothing to prefetch ahead of, which
    the end checks)."""
    N, C, H, W, k, dtype, layout, offset = case[:8]
    lib = library("emulation")[0]
    g = torch.Generator().manual_seed(7)
    x = _make(N, C, H, W, dtype, layout, offset, g)
    target = 1
    if parts == 2:  # F1 in two parts of >= 2 items (the other passes as that gives)
        plan = Launchers(lib, DEVICE, 1).plan(x, k, 0, True, saved_u=saved_u)
        items = N * -(-H // plan.tile_h) * -(-W // plan.tile_w)
        assert items >= 4  # two parts of >= 2 items: each looks ahead
        target = 2 * -(-C // plan.channels_per_block[0])
    dout = _make(N, C, H, W, dtype, layout, offset, g)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w, b = (r(C, 1, k, k) / k).to(dtype), (0.1 * r(C)).to(dtype)
    aff = (1.5 + r(C).abs(), 0.5 + r(C).abs())
    gamma, beta = 1 + 0.3 * r(C), 0.2 * r(C)
    impl = KernelBackend(Launchers(lib, DEVICE, target, prefetch=True, tensor_cores=False),
                         saves_u=True)
    assert impl.k.plan(x, k, 0, True, saved_u=saved_u).partial_rows[0] == parts
    u = {"u": like_x(x, f32, 0.0)} if saved_u else {}

    def audited(name, fn):
        out, audit = _audited(lib, fn)
        if name == "F1" and saved_u:
            assert audit["prefetches"] == 0, audit
        elif saved_u and (name == "F2" or (name == "B1" and layout == "nchw")):
            # F2 element by element, B1 in NCHW loading u and dout directly: nothing staged
            assert audit == {"prefetches": 0, "missed": 0, "unused": 0}, (name, audit)
        else:
            assert audit["prefetches"] > 0, (name, audit)
            assert audit["missed"] == 0, (name, audit)
            assert audit["unused"] == 0, (name, audit)
        return out

    mean, var = audited("F1", lambda: impl.stats(x, w, b, "gelu", aff, **u))
    rstd = (var + 1e-5).rsqrt()
    audited("F2", lambda: impl.apply(x, w, b, mean, rstd, gamma, beta, "gelu", aff, **u))
    dbeta, dgamma = audited("B1", lambda: impl.bwd_reduce(dout, x, w, b, mean, rstd, "gelu",
                                                          aff, **u))
    audited("B2", lambda: impl.bwd_main(dout, x, w, b, mean, rstd, gamma, dbeta, dgamma, True,
                                        "gelu", aff, **u))
    tc = KernelBackend(Launchers(lib, DEVICE, target, prefetch=True, tensor_cores=True),
                       saves_u=True)
    if tc.k.plan(x, k, 0, True, saved_u=saved_u).mma & 2:  # F2 on tensor cores
        _, audit = _audited(lib, lambda: tc.apply(x, w, b, mean, rstd, gamma, beta, "gelu",
                                                  aff, **u))
        assert audit == {"prefetches": 0, "missed": 0, "unused": 0}, audit


@pytest.mark.skipif(BACKEND != "cuda_emu", reason="the prefetch audit is the emulator's")
def test_prefetch_switch_reaches_the_kernels(monkeypatch):
    """Unset, CONVMIXER_EXT_CUDA_PREFETCH leaves the prefetches on in NCHW and off in
    channels_last (cuda_kernels.default_prefetch); =0 / =1 (or prefetch=False / True) turn
    them off / on in both layouts. Off, the audit counts every staged load as missed (so it
    can fail)."""
    lib = library("emulation")[0]
    g = torch.Generator().manual_seed(8)
    w, b = torch.randn(4, 1, 3, 3, generator=g) / 3, torch.zeros(4)
    on = {}
    for layout in ("nchw", "cl"):
        x = _make(2, 4, 8, 8, f32, layout, 0, g)
        for name, flag, env in (("unset", None, None), ("env 0", None, "0"),
                                ("env 1", None, "1"), ("arg off", False, "1"),
                                ("arg on", True, "0")):
            if env is None:
                monkeypatch.delenv("CONVMIXER_EXT_CUDA_PREFETCH", raising=False)
            else:
                monkeypatch.setenv("CONVMIXER_EXT_CUDA_PREFETCH", env)
            impl = KernelBackend(Launchers(lib, DEVICE, prefetch=flag), saves_u=True)
            _, audit = _audited(lib, lambda: impl.stats(x, w, b, "gelu"))
            if audit["prefetches"] > 0:
                assert audit["missed"] == 0, (layout, name, audit)
            else:
                assert audit["missed"] > 0, (layout, name, audit)
            on[layout, name] = audit["prefetches"] > 0
    assert on == {(lay, n): v for lay in ("nchw", "cl") for n, v in
                  (("unset", lay == "nchw"), ("env 0", False), ("env 1", True),
                   ("arg off", False), ("arg on", True))}, on
