"""SyncBatchNorm semantics of the fused block under torch.distributed (gloo, 2 CPU
processes), against the reference block run in one process on the whole global batch —
which is what nn.SyncBatchNorm computes (nn.SyncBatchNorm itself does not run on CPU)."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from convmixer_ext.backends import backend_reason

WORLD = 2


def _setup():
    torch.manual_seed(0)
    from convmixer_ext.reference import conv_mixer_layer
    from helpers import randomize_bn
    ref = conv_mixer_layer(3, 5, "gelu").double()
    randomize_bn(ref, 0)
    ref[3] = torch.nn.Identity()  # BN2 is PyTorch's (SyncBatchNorm needs a GPU)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * WORLD, 3, 6, 7, generator=g, dtype=torch.float64)
    probe = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return ref, x.float(), probe.float()


def _check_step(rank, step, sl, ref, fused, x, probe, out, xl):
    """Ground truth: ``ref`` (float64) on the whole global batch in one process; ``fused``
    holds this rank's gradients already averaged over the ranks (as DDP leaves them)."""
    from helpers import assert_close
    ref.zero_grad()
    xr = x.double().clone().requires_grad_()
    out_r = ref.train()(xr)
    out_r.backward(probe.double())
    f32 = torch.float32
    assert_close(out, out_r[sl], f32, f"rank {rank} step {step} out")
    assert_close(xl.grad, xr.grad[sl], f32, f"rank {rank} x.grad")
    for (n, p_r), (_, p_f) in zip(ref.named_parameters(), fused.named_parameters()):
        assert_close(p_f.grad, p_r.grad / WORLD, f32, f"rank {rank} {n}.grad")
    for (n, b_r), (_, b_f) in zip(ref.named_buffers(), fused.named_buffers()):
        assert torch.allclose(b_f.double(), b_r.double(), rtol=1e-5, atol=1e-6), n


def _worker(rank, init_file, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        from convmixer_ext import ConvMixerLayer
        ref, x, probe = _setup()
        sl = slice(2 * rank, 2 * rank + 2)
        from convmixer_ext.backends import SAVES_U_BACKENDS
        fused = ConvMixerLayer.from_reference(copy.deepcopy(ref).float(), backend)
        fused.process_group = dist.group.WORLD
        # F1 saves the convolution output for the later passes where the backend can
        fused.save_conv = True if backend in SAVES_U_BACKENDS else None
        ddp = torch.nn.parallel.DistributedDataParallel(fused)
        for step in range(2):
            ddp.zero_grad()
            xl = x[sl].clone().requires_grad_()
            out = ddp(xl)
            out.backward(probe[sl])
            _check_step(rank, step, sl, ref, fused, x, probe, out, xl)
            with torch.no_grad():  # keep both models' weights in step
                for p_r, p_f in zip(ref.parameters(), fused.parameters()):
                    p_f.sub_(0.1 * p_f.grad)
                    p_r.sub_(0.1 * p_r.grad / WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [b for b in ("torch", "cuda_emu", "triton")
                                     if backend_reason(b, "cpu") is None])
def test_sync_bn_under_ddp_gloo(backend, tmp_path, monkeypatch):
    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    # the spawned workers import triton afresh: the interpreter for their CPU tensors (set
    # for them only: this process's later tests may launch compiled kernels on a GPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), backend), nprocs=WORLD, join=True)


def _worker_folded(rank, init_file, backend):
    """Two layers with the pointwise half fused and BN2 folded into the next layer's load,
    every BatchNorm an nn.SyncBatchNorm via convert(sync_bn=True). DDP refuses to wrap
    nn.SyncBatchNorm modules on the CPU, so its gradient averaging is done here as DDP
    does it (all-reduce, divide by the world size)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        from convmixer_ext import convert
        from convmixer_ext.reference import conv_mixer_layer
        from helpers import randomize_bn
        torch.manual_seed(0)
        ref = torch.nn.Sequential(conv_mixer_layer(3, 3, "gelu"), conv_mixer_layer(3, 5, "gelu"))
        randomize_bn(ref, 2)
        model = torch.nn.Module()
        model.blocks = copy.deepcopy(ref)
        convert(model, backend=backend, sync_bn=True, pointwise="torch")
        assert all(layer.folds_bn2() for layer in model.blocks)
        assert all(type(layer[3]) is torch.nn.SyncBatchNorm for layer in model.blocks)
        ref = ref.double()
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2 * WORLD, 3, 5, 6, generator=g)
        probe = torch.randn(x.shape, generator=g)
        sl = slice(2 * rank, 2 * rank + 2)
        for step in range(2):
            model.zero_grad()
            xl = x[sl].clone().requires_grad_()
            out = model.blocks(xl)
            out.backward(probe[sl])
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= WORLD
            _check_step(rank, step, sl, ref, model.blocks, x, probe, out, xl)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [b for b in ("torch", "cuda_emu")
                                     if backend_reason(b, "cpu") is None])
def test_sync_bn_folded_pointwise_gloo(backend, tmp_path):
    """SyncBatchNorm semantics for BN1 and for the folded BN2 (statistics gathered and
    merged, gradients through them summed over the ranks), against the reference stack on
    the whole global batch in one process."""
    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    mp.spawn(_worker_folded, args=(str(tmp_path / "init"), backend), nprocs=WORLD, join=True)


def test_process_group_without_init_is_a_clear_error():
    from convmixer_ext import fused_dwconv_block
    with pytest.raises(RuntimeError, match="not initialised"):
        fused_dwconv_block(torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3), torch.randn(3),
                           torch.ones(3), torch.zeros(3), backend="torch",
                           process_group=object())
