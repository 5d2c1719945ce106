"""Bad input gets a clear Python exception naming the argument and what was expected."""
import os
import subprocess
import sys

import pytest
import torch

import convmixer_ext
from convmixer_ext import BackendUnavailableError, ConvMixerLayer, fused_dwconv_block
from convmixer_ext import _cmx_lib, backends
from conftest import DEVICE


def _args(C=3, k=3, dtype=torch.float32, device="cpu"):
    r = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    return dict(x=r(2, C, 5, 5), weight=r(C, 1, k, k), bias=r(C),
                gamma=torch.ones(C, device=device), beta=torch.zeros(C, device=device))


def _call(device="cpu", **over):
    a = _args(device=device)
    a.update(over)
    return fused_dwconv_block(a.pop("x"), a.pop("weight"), a.pop("bias"), a.pop("gamma"),
                              a.pop("beta"), backend=a.pop("backend", "torch"), **a)


@pytest.mark.parametrize("over, exc, words", [
    (dict(x=torch.randn(3, 5, 5)), ValueError, ["x", "4-D"]),
    (dict(x=torch.randn(2, 3, 5, 5).int()), TypeError, ["x", "float"]),
    (dict(x=[1.0]), TypeError, ["x", "Tensor"]),
    (dict(weight=torch.randn(3, 1, 3, 2)), ValueError, ["weight", "(3, 1, k, k)"]),
    (dict(weight=torch.randn(4, 1, 3, 3)), ValueError, ["weight", "3 channels"]),
    (dict(weight=torch.randn(3, 1, 3, 3).double()), TypeError, ["weight", "dtype"]),
    (dict(bias=torch.randn(4)), ValueError, ["bias", "(3,)"]),
    (dict(gamma=torch.ones(2)), ValueError, ["gamma", "(3,)"]),
    (dict(beta=torch.zeros(3).half()), TypeError, ["beta", "dtype"]),
    (dict(running_mean=torch.zeros(3)), ValueError, ["running_mean", "running_var"]),
    (dict(running_mean=torch.zeros(4), running_var=torch.ones(4)), ValueError,
     ["running_mean", "(3,)"]),
    (dict(activation="swish"), ValueError, ["activation", "gelu"]),
    (dict(backend="cudnn"), ValueError, ["backend", "torch"]),
    (dict(x=torch.randn(1, 3, 1, 1), weight=torch.randn(3, 1, 1, 1)), ValueError,
     ["more than 1 value"]),
    (dict(in_affine=torch.ones(3)), TypeError, ["in_affine", "(scale, shift)"]),
    (dict(in_affine=(torch.ones(3), torch.zeros(4))), ValueError, ["in_affine shift", "(3,)"]),
    (dict(in_affine=(torch.ones(3).half(), torch.zeros(3))), TypeError,
     ["in_affine scale", "float32"]),
    # the older name of the same keyword
    (dict(pre=(torch.ones(3), torch.zeros(4))), ValueError, ["pre shift", "(3,)"]),
    (dict(pre=(torch.ones(3), torch.zeros(3)), in_affine=(torch.ones(3), torch.zeros(3))),
     TypeError, ["in_affine", "pre", "not both"]),
    (dict(eps=float("nan")), ValueError, ["eps", "finite positive"]),
    (dict(eps=-1.0), ValueError, ["eps", "finite positive"]),
    (dict(eps=0.0), ValueError, ["eps"]),
    (dict(eps=float("inf")), ValueError, ["eps"]),
    (dict(eps="1e-5"), ValueError, ["eps"]),
    (dict(momentum=None, running_mean=torch.zeros(3), running_var=torch.ones(3)), ValueError,
     ["momentum=None", "num_batches_tracked"]),
    (dict(momentum=float("nan"), running_mean=torch.zeros(3), running_var=torch.ones(3)),
     ValueError, ["momentum", "finite"]),
    (dict(running_mean=torch.zeros(3), running_var=torch.ones(3),
          num_batches_tracked=torch.zeros(2)), TypeError, ["num_batches_tracked", "0-d"]),
    (dict(training=1), TypeError, ["training", "bool"]),
    (dict(save_conv="yes"), TypeError, ["save_conv", "None or a bool"]),
    (dict(x=torch.randn(2, 3, 0, 5)), ValueError, ["x", "non-empty"]),
    (dict(x=torch.randn(2, 3, 5, 5).to_sparse()), TypeError, ["x", "strided"]),
    (dict(bias=torch.randn(3).to_sparse()), TypeError, ["bias", "strided"]),
])
def test_bad_inputs_raise_clear_errors(over, exc, words):
    with pytest.raises(exc) as e:
        _call(**over)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_wrong_device_is_named():
    meta = torch.randn(3, 1, 3, 3, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        _call(weight=meta)


@pytest.mark.parametrize("backend", ["cuda_emu", "triton", "cuda"])
def test_kernel_backends_refuse_float64_and_huge_k(backend):
    # each kernel backend on the tensors it runs on: the emulator on CPU tensors, Triton on
    # CUDA tensors (CPU tensors in the interpreter), the CUDA library on CUDA tensors
    device = "cpu" if backend == "cuda_emu" else DEVICE
    if backends.backend_reason(backend, device) is not None:
        pytest.skip(f"{backend} unavailable here: {backends.backend_reason(backend, device)}")
    args = _args(dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64"):
        _call(device, backend=backend,
              **{k: v for k, v in args.items() if k not in ("gamma", "beta")})
    with pytest.raises(ValueError, match="kernel_size up to 31"):
        _call(device, backend=backend, weight=torch.randn(3, 1, 33, 33, device=device))


def test_auto_runs_every_dtype_and_kernel_size():
    """Where no kernel backend applies (float64, k > 31), "auto" runs PyTorch's own ops."""
    a = _args(dtype=torch.float64)
    out = fused_dwconv_block(a["x"], a["weight"], a["bias"], a["gamma"].double(),
                             a["beta"].double(), backend="auto")
    assert out.dtype == torch.float64
    out = _call(backend="auto", weight=torch.randn(3, 1, 33, 33))
    assert out.shape == (2, 3, 5, 5)


def test_cuda_backend_on_cpu_tensors_is_refused():
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available"):
        _call(backend="cuda")


def test_env_override_of_auto(monkeypatch):
    monkeypatch.setenv("CONVMIXER_EXT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="CONVMIXER_EXT_BACKEND"):
        _call(backend="auto")
    monkeypatch.setenv("CONVMIXER_EXT_BACKEND", "torch")
    assert _call(backend="auto").shape == (2, 3, 5, 5)


def test_prefetch_switch_takes_0_or_1(monkeypatch):
    """CONVMIXER_EXT_CUDA_PREFETCH is 0 or 1 (or unset): "false" or "off" would otherwise
    leave the prefetches on without a word."""
    _emu_path()
    for bad in ("false", "off", "2"):
        monkeypatch.setenv("CONVMIXER_EXT_CUDA_PREFETCH", bad)
        with pytest.raises(ValueError, match="CONVMIXER_EXT_CUDA_PREFETCH must be 0 or 1"):
            _call(backend="cuda_emu")
    for good in ("0", "1", " 1 ", ""):
        monkeypatch.setenv("CONVMIXER_EXT_CUDA_PREFETCH", good)
        assert _call(backend="cuda_emu").shape == (2, 3, 5, 5)


def test_module_constructor_checks():
    with pytest.raises(ValueError, match="activation"):
        ConvMixerLayer(4, 3, activation="tanh")
    with pytest.raises(ValueError, match="backend"):
        ConvMixerLayer(4, 3, backend="fast")
    with pytest.raises(ValueError, match="kernel_size"):
        ConvMixerLayer(4, 0)
    with pytest.raises(TypeError, match="blocks"):
        convmixer_ext.convert(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="save_conv must be None or a bool"):
        ConvMixerLayer(4, 3, save_conv="no")
    with pytest.raises(TypeError, match="save_conv must be None or a bool"):
        convmixer_ext.ConvMixer(4, 1, 3, 2, 2, save_conv=1)


def test_convert_refuses_unfusable_layer():
    from convmixer_ext.reference import conv_mixer_layer
    layer = conv_mixer_layer(4, 3)
    layer[0].fn[1] = torch.nn.SiLU()
    model = torch.nn.Module()
    model.blocks = torch.nn.Sequential(layer)
    with pytest.raises(ValueError, match="cannot fuse activation"):
        convmixer_ext.convert(model)


def test_triton_on_cpu_without_interpreter_is_refused():
    code = ("import torch, convmixer_ext as cx\n"
            "x = torch.randn(1, 2, 4, 4)\n"
            "try:\n"
            "    cx.fused_dwconv_block(x, torch.randn(2,1,3,3), torch.randn(2), torch.ones(2),"
            " torch.zeros(2), backend='triton')\n"
            "except cx.BackendUnavailableError as e:\n"
            "    print('REFUSED', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert "REFUSED" in r.stdout and "TRITON_INTERPRET=1" in r.stdout, r.stdout + r.stderr


def _emu_path():
    lib, why = backends.library("emulation")
    if lib is None:
        pytest.skip(f"the emulation library is not available here: {why}")
    return lib.path


def test_library_with_other_abi_or_ids_is_refused(monkeypatch):
    """A library whose C ABI version or activation ids differ from the package's is refused
    with the reason, never called."""
    path = _emu_path()
    monkeypatch.setattr(_cmx_lib, "ABI_VERSION", _cmx_lib.ABI_VERSION + 1)
    with pytest.raises(_cmx_lib.LibraryError, match="ABI version .* reinstall"):
        _cmx_lib.Library(path, {"gelu": 0})
    monkeypatch.undo()
    with pytest.raises(_cmx_lib.LibraryError, match="activation id 1 .*'gelu'"):
        _cmx_lib.Library(path, {"gelu": 1})
    with pytest.raises(_cmx_lib.LibraryError, match="cannot load"):
        _cmx_lib.Library(path + ".missing", {"gelu": 0})


def test_missing_library_names_the_build_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(_cmx_lib, "LIBRARY_FILES", {"cuda": "nothing.so", "emulation": "x.so"})
    backends.library.cache_clear()
    try:
        lib, why = backends.library("cuda")
        assert lib is None and "were not built" in why and "nvcc" in why
    finally:
        monkeypatch.undo()
        backends.library.cache_clear()


def test_zero_and_huge_kernel_sizes():
    with pytest.raises(ValueError, match=r"weight must be a depthwise kernel of shape \(3, 1, k, k\)"):
        _call(weight=torch.randn(3, 1, 0, 0))
    with pytest.raises(ValueError, match="kernel_size must be a positive int"):
        ConvMixerLayer(3, -1)


def test_library_checks_what_python_would_never_pass():
    """The C side refuses what the Python boundary never passes (unknown ids, a kernel size
    beyond its limit, NULL pointers) with a message naming the argument, as a Python
    ValueError, instead of reading memory wrongly."""
    _emu_path()
    from convmixer_ext.cuda_kernels import Launchers
    launch = Launchers(backends.library("emulation")[0], "cpu")
    x, w, b = torch.randn(2, 3, 5, 5), torch.randn(3, 1, 3, 3), torch.randn(3)
    with pytest.raises(ValueError, match="kernel size must be in"):
        launch.k_stats(x, torch.randn(3, 1, 33, 33), b, None, None, 0)
    with pytest.raises(ValueError, match="unknown activation id 7"):
        launch.k_stats(x, w, b, None, None, 7)
    with pytest.raises(ValueError, match="unknown dtype id"):
        launch.k_stats(x.double(), w.double(), b.double(), None, None, 0)
    with pytest.raises(ValueError, match="in_shift is NULL"):
        launch.k_stats(x, w, b, torch.ones(3), None, 0)
    with pytest.raises(ValueError, match="gamma is NULL"):
        launch.k_apply(x, w, b, torch.zeros(3), torch.ones(3), None, torch.zeros(3), None,
                       None, 0)
