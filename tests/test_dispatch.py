"""What "auto" picks (docs/DESIGN.md, "Backends"), with the GPU and the compiled library
mocked: architecture-safe dispatch (a device the library has no code for falls back, with
one warning saying why and how to get the kernels), never slower than PyTorch where no
kernel applies, and the explicit choices' errors."""
import functools
import warnings

import pytest
import torch

from convmixer_ext import BackendUnavailableError, _env, backends


class FakeLibrary:
    def __init__(self, archs):
        self.archs = archs

    def device_count(self):
        return 1

    def check_device(self, index):
        return None


@pytest.fixture
def gpu(monkeypatch):
    """A mocked machine with one GPU of a settable compute capability and a CUDA library
    built for settable architectures; returns a setter."""
    state = {"cap": (9, 0), "lib": FakeLibrary(["sm_80", "sm_90", "compute_90"]),
             "why": None}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: state["cap"])
    monkeypatch.setattr(backends, "library",
                        lambda kind: (state["lib"], state["why"]) if kind == "cuda"
                        else (None, "not here"))
    monkeypatch.setattr(backends, "_triton_import_error", lambda: None)
    monkeypatch.setattr(backends, "_warned", set())

    def clear():
        backends._cuda_runtime_reason.cache_clear()
        backends._cuda_device_reason.cache_clear()

    clear()

    def set_(cap=None, archs=None, missing=None):
        if cap is not None:
            state["cap"] = cap
        if archs is not None:
            state["lib"] = FakeLibrary(archs)
        if missing is not None:
            state["lib"], state["why"] = None, missing
        clear()

    yield set_
    clear()


CUDA0 = torch.device("cuda", 0)


@pytest.mark.parametrize("cap, archs, runs", [
    ((8, 0), ["sm_80", "sm_90", "compute_90"], True),
    ((8, 6), ["sm_80", "sm_90", "compute_90"], True),   # same major, newer minor
    ((8, 9), ["sm_80"], True),
    ((9, 0), ["sm_80", "sm_90", "compute_90"], True),
    ((10, 0), ["sm_80", "sm_90", "compute_90"], True),  # Blackwell: the embedded PTX
    ((12, 0), ["sm_80", "sm_90", "compute_90"], True),
    ((10, 0), ["sm_80", "sm_90"], False),                # no PTX: nothing runs
    ((7, 5), ["sm_80", "sm_90", "compute_90"], False),   # T4: older than every image
    ((7, 0), ["sm_80", "compute_80"], False),            # V100
    ((8, 0), ["sm_86"], False),                          # a newer minor does not run
])
def test_arch_runs(cap, archs, runs):
    assert backends.arch_runs(cap, archs) is runs


def test_auto_picks_cuda_where_the_library_runs(gpu):
    gpu(cap=(9, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend("auto", CUDA0, torch.float32, 9) == "cuda"
    assert backends.resolve_backend("auto", CUDA0, torch.float32, 9, op="pointwise") == "triton"


@pytest.mark.parametrize("cap", [(7, 5), (7, 0)], ids=["T4", "V100"])
def test_auto_falls_back_once_with_a_warning_on_an_unsupported_gpu(gpu, cap):
    gpu(cap=cap)
    with pytest.warns(RuntimeWarning) as rec:
        assert backends.resolve_backend("auto", CUDA0, torch.float32, 9) == "triton"
        assert backends.resolve_backend("auto", CUDA0, torch.float32, 9) == "triton"
    assert len(rec) == 1  # told once
    msg = str(rec[0].message)
    assert f"{cap[0]}.{cap[1]}" in msg and "triton" in msg and "TORCH_CUDA_ARCH_LIST" in msg
    with pytest.raises(BackendUnavailableError, match="cannot run on device 0"):
        backends.resolve_backend("cuda", CUDA0, torch.float32, 9)


def test_blackwell_runs_the_ptx_without_ptx_falls_back(gpu):
    gpu(cap=(10, 0))
    assert backends.resolve_backend("auto", CUDA0, torch.float32, 9) == "cuda"
    gpu(archs=["sm_80", "sm_90"])
    with pytest.warns(RuntimeWarning, match="10.0"):
        assert backends.resolve_backend("auto", CUDA0, torch.float32, 9) == "triton"


# (k, channels_last, training) -> auto's pick on an H100/H200 with every backend there
# (fp32's, 16-bit's where they differ), from the measured tables
# (benchmarks/results/NVIDIA_H200-2026-11-26*.md and -2026-11-27-run9-*.md; 16-bit NCHW:
# NVIDIA_H100_80GB_HBM3-2026-11-26-run4*.md, and for its eval up to k = 17
# NVIDIA_H200-2026-11-27-run10-cuda-tc.md), written out here by hand
@pytest.mark.parametrize("k, cl, training, pick", [
    (3, False, True, "triton"), (3, False, False, "cuda"), (3, True, True, "eager"),
    (3, True, False, "triton"), (7, False, True, "cuda"), (7, True, True, ("triton", "eager")),
    (7, True, False, "cuda"), (9, True, True, "cuda"), (9, False, False, "cuda"),
    (15, False, True, "cuda"), (31, False, True, "cuda"), (31, False, False, "cuda"),
    (31, True, True, "cuda"), (1, False, True, "triton"), (1, True, True, "eager"),
    (4, True, True, ("triton", "eager")), (5, True, True, ("triton", "eager")),
    (8, True, True, "cuda"), (5, True, False, "cuda"),
])
def test_auto_takes_the_measured_fastest(gpu, monkeypatch, k, cl, training, pick):
    pick32, pick16 = pick if isinstance(pick, tuple) else (pick, pick)
    monkeypatch.delenv(_env.CUDA_TC_VAR, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            # 16-bit NCHW: tensor cores measured fastest at every k, the CUDA library's in
            # eval up to k = 17, Triton's elsewhere
            tc = "cuda" if not training and k <= 17 else "triton_tc"
            want = pick32 if dtype == torch.float32 else tc if not cl else pick16
            assert backends.resolve_backend("auto", CUDA0, dtype, k, channels_last=cl,
                                            training=training) == want, dtype


@pytest.mark.parametrize("training", [True, False])
def test_auto_tensor_cores_for_16_bit_nchw_only(gpu, monkeypatch, training):
    auto = functools.partial(backends.resolve_backend, "auto", CUDA0, training=training)
    monkeypatch.delenv(_env.CUDA_TC_VAR, raising=False)
    for k in (1, 3, 7, 9, 15, 17, 18, 31):
        # eval up to k = 17: the CUDA library, its F2 on tensor cores (unless switched off)
        tc = "cuda" if not training and k <= 17 else "triton_tc"
        assert auto(torch.bfloat16, k) == tc, k
        assert auto(torch.float16, k) == tc, k
        assert auto(torch.float32, k) != "triton_tc", k          # fp32 stays on FP32 FMA
        assert auto(torch.bfloat16, k, channels_last=True) != "triton_tc", k  # 2-10x slower
    # a width its tensor-core F2 does not take (not a multiple of 8): its CUDA-core F2 there
    # is slower than Triton's tensor cores
    assert auto(torch.bfloat16, 9, tc_width=False) == "triton_tc"
    monkeypatch.setenv(_env.CUDA_TC_VAR, "0")   # the same, switched off
    assert auto(torch.bfloat16, 9) == "triton_tc"
    monkeypatch.delenv(_env.CUDA_TC_VAR)
    # without Triton: the CUDA library, which runs it, without a warning
    monkeypatch.setattr(backends, "_triton_import_error", lambda: "no triton here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto(torch.bfloat16, 31) == "cuda"
        assert auto(torch.bfloat16, 3) == "cuda"


def test_measured_pick_falls_back_where_it_cannot_run(gpu, monkeypatch):
    # statistics synchronised over a group: eager cannot, the CUDA library takes it
    assert backends.resolve_backend("auto", CUDA0, torch.float32, 3, sync=True,
                                    channels_last=True, training=True) == "cuda"
    # Triton's pick without Triton: the CUDA library, without a warning (it runs)
    monkeypatch.setattr(backends, "_triton_import_error", lambda: "no triton here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend("auto", CUDA0, torch.float32, 3) == "cuda"


def test_missing_library_falls_back_to_eager_without_triton(gpu, monkeypatch):
    gpu(missing="the CUDA kernels were not built (nvcc was not found when the package was "
                "built)")
    monkeypatch.setattr(backends, "_triton_import_error", lambda: "no triton here")
    with pytest.warns(RuntimeWarning, match="were not built .* 'eager'"):
        assert backends.resolve_backend("auto", CUDA0, torch.float32, 3) == "eager"
    # statistics synchronised over a group: the twin, which can synchronise
    assert backends.resolve_backend("auto", CUDA0, torch.float32, 3, sync=True) == "torch"


def test_no_kernel_applies_runs_pytorch_without_warning(gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend("auto", CUDA0, torch.float64, 3) == "eager"
        assert backends.resolve_backend("auto", CUDA0, torch.float32, 33) == "eager"
        assert backends.resolve_backend("auto", torch.device("cpu"), torch.float32, 3) == "eager"
        assert backends.resolve_backend("auto", torch.device("cpu"), torch.float32, 3,
                                        sync=True) == "torch"
        assert backends.resolve_backend("auto", torch.device("cpu"), torch.float32,
                                        op="pointwise") == "eager"


def test_explicit_choices_and_their_errors():
    cpu = torch.device("cpu")
    assert backends.resolve_backend("eager", cpu, torch.float64, 40) == "eager"
    with pytest.raises(ValueError, match="cannot synchronise"):
        backends.resolve_backend("eager", cpu, torch.float32, 3, sync=True)
    with pytest.raises(ValueError, match="pointwise backend must be"):
        backends.resolve_backend("cuda_emu", cpu, torch.float32, op="pointwise")
    with pytest.raises(ValueError, match="depthwise backend must be"):
        backends.resolve_backend("fast", cpu, torch.float32)


def test_env_override_applies_to_the_ops_it_implements(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("CONVMIXER_EXT_BACKEND", "torch")
    assert backends.resolve_backend("auto", cpu, torch.float32, 3) == "torch"
    monkeypatch.setenv("CONVMIXER_EXT_BACKEND", "cuda_emu")  # no pointwise: auto decides
    assert backends.resolve_backend("auto", cpu, torch.float32, op="pointwise") == "eager"


def test_old_triton_interpreter_with_new_numpy_is_refused_clearly(monkeypatch):
    triton = pytest.importorskip("triton")
    import numpy
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    backends._interpreter_problem.cache_clear()
    try:
        why = backends._interpreter_problem()
        assert "numpy < 2.4" in why and "triton >= 3.7" in why
        monkeypatch.setattr(numpy, "__version__", "2.3.5")
        backends._interpreter_problem.cache_clear()
        assert backends._interpreter_problem() is None
    finally:
        monkeypatch.undo()
        backends._interpreter_problem.cache_clear()


def test_the_op_tells_auto_whether_the_width_suits_the_tensor_core_f2(monkeypatch):
    """fused_dwconv_block passes resolve_backend whether x's width is one the CUDA library's
    tensor-core F2 takes (a multiple of 8), which decides auto's 16-bit NCHW eval pick."""
    from convmixer_ext import fused_dwconv_block, ops
    from convmixer_ext.cuda_kernels import tc_takes_width
    seen = []
    real = ops.resolve_backend

    def spy(*a, **kw):
        seen.append(kw["tc_width"])
        return real(*a, **kw)
    monkeypatch.setattr(ops, "resolve_backend", spy)
    for W in (16, 12, 24, 7):
        x = torch.randn(1, 2, 5, W)
        w = torch.randn(2, 1, 3, 3)
        v = torch.ones(2)
        fused_dwconv_block(x, w, v, v, v, backend="torch")
    assert seen == [True, False, True, False]
    assert [tc_takes_width(W) for W in (8, 16, 12, 7)] == [True, True, False, False]
