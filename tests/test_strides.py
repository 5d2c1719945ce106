"""Every tensor argument is read correctly at any stride and storage offset, on every backend
(interpreter and emulator included): for each argument in turn, a strided view with a
storage offset holding the same values must give the results of the dense tensor, in
training and eval, forward and backward, and strided running buffers are updated in place.
"""
import pytest
import torch

from conftest import DEVICE, all_backends
from convmixer_ext import fused_dwconv_block
from convmixer_ext.pointwise import fused_pointwise_block
from convmixer_ext.backends import backend_reason

DW_ARGS = ["x", "weight", "bias", "gamma", "beta", "running_mean", "running_var", "in_scale",
           "in_shift", "dout"]


def strided(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` in a view with storage offset 1 and every stride doubled (not
    dense, not channels_last): a kernel indexing it as if dense reads the wrong elements."""
    buf = torch.full([2 * s + 1 for s in t.shape], float("nan"), dtype=t.dtype,
                     device=t.device)
    v = buf[tuple(slice(1, None, 2) for _ in t.shape)]
    v.copy_(t)
    assert v.storage_offset() > 0 and not v.is_contiguous()
    return v


def _dw_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    C = 4
    return dict(x=r(2, C, 7, 6), weight=r(C, 1, 3, 3) / 3, bias=0.3 * r(C), gamma=1 + 0.3 * r(C),
                beta=0.2 * r(C), running_mean=0.1 * r(C), running_var=1 + 0.2 * r(C).abs(),
                in_scale=1 + 0.2 * r(C), in_shift=0.5 * r(C), dout=r(2, C, 7, 6))


def _run_dw(t, backend, training):
    """Output, gradients of every differentiable input, and the running buffers after.
    Every tensor is a fresh copy (strided ones stay strided, in a fresh storage)."""
    grad_args = ("x", "weight", "bias", "gamma", "beta", "in_scale", "in_shift")
    leaves = {}
    for n, v in t.items():
        v = strided(v.detach()) if not v.is_contiguous() else v.detach().clone()
        leaves[n] = v.requires_grad_() if n in grad_args else v
    rm, rv = leaves["running_mean"], leaves["running_var"]
    nbt = torch.zeros((), dtype=torch.long, device=DEVICE)
    out = fused_dwconv_block(leaves["x"], leaves["weight"], leaves["bias"], leaves["gamma"],
                             leaves["beta"], rm, rv, nbt,
                             training=training, backend=backend,
                             in_affine=(leaves["in_scale"], leaves["in_shift"]))
    out.backward(leaves["dout"])
    grads = {n: leaves[n].grad for n in grad_args}
    return out.detach(), grads, rm.clone(), rv.clone()


@pytest.mark.parametrize("arg", DW_ARGS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", all_backends())
def test_strided_argument_reads_like_dense(backend, training, arg):
    dense = _dw_inputs()
    base = _run_dw(dict(dense), backend, training)
    t = dict(dense)
    t[arg] = strided(dense[arg])
    got = _run_dw(t, backend, training)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], base[0], **tol, msg=f"output with strided {arg}")
    for n, g in base[1].items():
        torch.testing.assert_close(got[1][n], g, **tol, msg=f"grad of {n} with strided {arg}")
    torch.testing.assert_close(got[2], base[2], **tol, msg=f"running_mean, strided {arg}")
    torch.testing.assert_close(got[3], base[3], **tol, msg=f"running_var, strided {arg}")


@pytest.mark.parametrize("backend", all_backends())
def test_strided_running_buffers_are_updated_in_place(backend):
    t = _dw_inputs()
    rm, rv = strided(t["running_mean"]), strided(t["running_var"])
    base_rm, base_rv = t["running_mean"].clone(), t["running_var"].clone()
    nbt = torch.zeros((), dtype=torch.long, device=DEVICE)
    fused_dwconv_block(t["x"], t["weight"], t["bias"], t["gamma"], t["beta"], rm, rv, nbt,
                       training=True, backend=backend, momentum=None)
    ref_rm, ref_rv = base_rm.clone(), base_rv.clone()
    fused_dwconv_block(t["x"], t["weight"], t["bias"], t["gamma"], t["beta"], ref_rm, ref_rv,
                       torch.zeros((), dtype=torch.long, device=DEVICE), training=True,
                       backend=backend, momentum=None)
    assert int(nbt) == 1
    assert not torch.equal(rm, base_rm)  # written through the view, into its storage
    torch.testing.assert_close(rm, ref_rm, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, ref_rv, rtol=1e-6, atol=1e-7)


PW = ["torch", "eager"] + (["triton"] if backend_reason("triton", DEVICE) is None else [])
PW_ARGS = ["y", "weight", "bias", "gamma", "beta", "dout"]


def _run_pw(backend, training, arg):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    vals = dict(y=r(2, 6, 5, 4), weight=r(5, 6, 1, 1) / 3, bias=0.2 * r(5), gamma=1 + 0.2 * r(5),
                beta=0.1 * r(5), dout=r(2, 5, 5, 4))
    if arg is not None:
        vals[arg] = strided(vals[arg])
    conv, bn = torch.nn.Conv2d(6, 5, 1).to(DEVICE), torch.nn.BatchNorm2d(5).to(DEVICE)
    conv.weight, conv.bias = (torch.nn.Parameter(vals[n]) for n in ("weight", "bias"))
    bn.weight, bn.bias = (torch.nn.Parameter(vals[n]) for n in ("gamma", "beta"))
    y = vals["y"].requires_grad_()
    out = fused_pointwise_block(y, conv, bn, training, "gelu", backend)
    out.backward(vals["dout"])
    return [out.detach(), y.grad, conv.weight.grad, conv.bias.grad, bn.weight.grad,
            bn.bias.grad, bn.running_mean.clone(), bn.running_var.clone()]


@pytest.mark.parametrize("arg", PW_ARGS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", PW)
def test_pointwise_strided_argument_reads_like_dense(backend, training, arg):
    base, got = _run_pw(backend, training, None), _run_pw(backend, training, arg)
    names = ["out", "y.grad", "weight.grad", "bias.grad", "gamma.grad", "beta.grad",
             "running_mean", "running_var"]
    for n, a, b in zip(names, got, base):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{n} with strided {arg}")
