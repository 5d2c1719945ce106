"""Hardware limits on every backend, probed with shapes only (meta tensors: nothing is
allocated or run): a shape whose grid would exceed a limit is refused with a clear
ValueError naming the shape; large channel counts that the old 2-D/3-D grids could not
launch (C > 65535) are tiled onto the 1-D grid instead."""
import pytest
import torch

from convmixer_ext import backends
from convmixer_ext import triton_kernels as tk


def _meta(*shape, cl=False, dtype=torch.float32):
    x = torch.empty(shape, device="meta", dtype=dtype)
    return x.to(memory_format=torch.channels_last) if cl else x


def _launchers():
    lib, why = backends.library("emulation")
    if lib is None:
        pytest.skip(why)
    from convmixer_ext.cuda_kernels import Launchers
    return Launchers(lib, "cpu")  # the planner is the same code in the CUDA build


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_cuda_plan_limits(cl):
    plan = _launchers().plan
    p = plan(_meta(2, 100_000, 32, 32, cl=cl), 9)  # C beyond 65535: fine on the 1-D grid
    items = 2 * (32 // p.tile_h) * (32 // p.tile_w)
    for i in range(4):  # F1, F2, B1, B2
        cb = p.channels_per_block[i]
        parts = items if i == 1 else p.partial_rows[i]
        assert 1 <= parts <= items and p.blocks[i] == parts * -(-100_000 // cb)
        assert p.threads[i] <= 256 and p.smem[i] <= 96 * 1024
    for k in (1, 15, 16, 31):
        q = plan(_meta(1, 3, 64, 64, cl=cl), k)
        assert max(q.smem) <= 96 * 1024
    with pytest.raises(ValueError, match="CUDA grid limit"):
        plan(_meta(300_000, 30_000, 32, 32, cl=cl), 3)
    with pytest.raises(ValueError, match="kernel size must be in"):
        plan(_meta(1, 3, 8, 8, cl=cl), 32)


def test_cuda_plan_with_the_saved_convolution_output():
    """Reading F1's saved u, B2 convolves nothing and stages dW's input over dout's planes:
    at k = 31 (fp32, 32 x 32 tile, one channel) it fits in under half the shared memory of
    recomputing u on the doubly extended region, F2 and B1 stage the tile only, and the
    spatial tile (hence the partial rows) does not depend on saving; the plan's channels per
    block are those that let the most threads reside per SM by shared memory."""
    plan = _launchers().plan
    for dtype in (torch.float32, torch.bfloat16):
        x = _meta(64, 1536, 32, 32, dtype=dtype)
        rec, sav = plan(x, 31), plan(x, 31, 0, False, saved_u=True)
        assert (rec.tile_h, rec.tile_w, list(rec.partial_rows)) == \
            (sav.tile_h, sav.tile_w, list(sav.partial_rows))
        per_channel = [p.smem[3] / p.channels_per_block[3] for p in (rec, sav)]
        assert per_channel[1] < 0.5 * per_channel[0] and sav.smem[3] <= 48 * 1024, per_channel
        for i in (1, 2):  # F2, B1: no halo, no weights
            assert sav.smem[i] / sav.channels_per_block[i] < \
                0.5 * rec.smem[i] / rec.channels_per_block[i]
        # B2 at k = 31 with u: one channel (5 blocks of 41-45 KB per SM) rather than two
        # (2 blocks of 88 KB)
        assert sav.channels_per_block[3] == 1


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_triton_grid_limits(cl):
    recorded = []
    with tk.recording(lambda kernel, grid, args, kw: recorded.append(grid)):
        x = _meta(2, 100_000, 32, 32, cl=cl)
        w = _meta(100_000, 1, 3, 3)
        b = _meta(100_000)
        tk.k_stats(x, w, b, None, None, 0)
        assert recorded and recorded[-1][0] < tk.MAX_PROGRAMS and len(recorded[-1]) == 1
        big = _meta(200_000, 20_000, 32, 32, cl=cl)
        with pytest.raises(ValueError, match="grid limit"):
            tk.k_stats(big, _meta(20_000, 1, 3, 3), _meta(20_000), None, None, 0)


def test_triton_channels_last_dw_row_limit():
    """The channels_last dW kernel's column offsets are 32-bit: a row of 2^31 elements or
    more (W * C) is refused by name, not wrapped around."""
    x = _meta(1, 2**16, 2, 2**15, cl=True)
    with pytest.raises(ValueError, match=r"fewer than 2\^31 elements \(W \* C\)"):
        tk._dw_plan(x, 3)
    assert tk._dw_plan(_meta(1, 2**15, 2, 2**15, cl=True), 3)[0] >= 1


def test_pointwise_limits():
    with tk.recording(lambda *a: None):
        y = _meta(4, 64, 32, 32, cl=True)
        g = _meta(4, 64, 32, 32, cl=True)
        tk.pw_gemm_act_stats(y, _meta(64, 64), _meta(64), g, 0)
        huge = _meta(2_200_000, 8, 32, 32, cl=True)
        with pytest.raises(ValueError, match="fewer than 2\\^31 positions"):
            tk.pw_gemm_act_stats(huge, _meta(8, 8), _meta(8), huge, 0)
